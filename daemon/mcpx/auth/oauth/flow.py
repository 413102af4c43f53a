"""Sans-I/O authorization code flow: the PKCE pair and state, the authorization URL, and the checks on what
comes back to the redirect URI (state, RFC 9207 `iss`, errors) before any code is redeemed.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from mcpx.auth.oauth.metadata import DiscoveryError, ServerMetadata, check_url


class AuthorizationFailed(Exception):
    """The authorization response was an error, or failed a check; the message is safe to show."""


@dataclass(frozen=True, slots=True)
class PendingAuthorization:
    """Everything the flow must remember between sending the user to the server and redeeming the code. The
    issuer is recorded with the verifier (RFC 9207 mix-up defence)."""

    issuer: str
    client_id: str
    redirect_uri: str
    resource: str
    scopes: tuple[str, ...]
    state: str
    code_verifier: str
    url: str


def start_authorization(
    server: ServerMetadata, *, client_id: str, redirect_uri: str, resource: str, scopes: tuple[str, ...]
) -> PendingAuthorization:
    if server.authorization_endpoint is None:
        raise DiscoveryError("the authorization server has no authorization_endpoint")
    if not server.s256:
        # 2026-07-28 authorization: if code_challenge_methods_supported is absent, clients MUST refuse.
        raise DiscoveryError("the authorization server does not advertise PKCE S256; refusing to proceed")
    endpoint = check_url(server.authorization_endpoint, "authorization_endpoint")
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    state = secrets.token_urlsafe(24)
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "state": state,
        "resource": resource,
    }
    if scopes:
        params["scope"] = " ".join(scopes)
    parts = urlsplit(endpoint)
    query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    # Re-serialized from the parsed form (SEC-12): what reaches a browser is a URL we built.
    url = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))
    return PendingAuthorization(server.issuer, client_id, redirect_uri, resource, scopes, state, verifier, url)


def code_from_response(pending: PendingAuthorization, server: ServerMetadata, pasted: str) -> str:
    """The authorization code from where the browser landed (a full redirect URL or its query), checked against
    `state` and `iss`. A bare code is accepted only for the headless paste flow, where the user copied it."""
    text = pasted.strip()
    if "?" not in text and "=" not in text:
        if not text:
            raise AuthorizationFailed("nothing was pasted")
        return text
    query = urlsplit(text).query if "?" in text else text
    params = dict(parse_qsl(query, keep_blank_values=True))
    issuer = params.get("iss")
    # RFC 9207 §2.4: compare by simple string comparison; when the server advertises the parameter it must be there.
    if issuer is not None and issuer != pending.issuer:
        raise AuthorizationFailed("the authorization response came from a different issuer (iss mismatch); ignored")
    if issuer is None and server.iss_parameter_supported:
        raise AuthorizationFailed("the authorization response lacks the iss parameter its server promised")
    if params.get("state") != pending.state:
        raise AuthorizationFailed("the authorization response does not match this login (state mismatch)")
    if "error" in params:
        description = params.get("error_description", "")
        raise AuthorizationFailed(f"the authorization server refused: {params['error']} {description}".strip())
    code = params.get("code")
    if not code:
        raise AuthorizationFailed("the authorization response carries no code")
    return code
