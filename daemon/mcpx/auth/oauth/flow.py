"""Sans-I/O authorization flows. The authorization code flow: the PKCE pair and state, the authorization URL, and
the checks on what comes back to the redirect URI (state, RFC 9207 `iss`, errors) before any code is redeemed.
The device authorization grant (RFC 8628): whether a server offers it, the checks on its device authorization
response (the verification URIs like every authorization URL), and what each polling answer means.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
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


# --- the device authorization grant (RFC 8628) -------------------------------------------------------------------

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# RFC 8628 §3.2: without `interval`, clients poll every 5 s; §3.5: `slow_down` adds 5 s for every later poll.
DEFAULT_DEVICE_INTERVAL = 5.0
SLOW_DOWN_STEP = 5.0
# Polls are never closer than this, whatever the server says; and no device code is waited on for more than an hour.
MIN_DEVICE_INTERVAL = 0.05
MAX_DEVICE_WAIT = 3600.0
_MAX_USER_CODE = 64


@dataclass(frozen=True, slots=True)
class DeviceAuthorization:
    """A device authorization response (RFC 8628 §3.2), checked, with what the token requests must repeat."""

    issuer: str
    client_id: str
    resource: str
    scopes: tuple[str, ...]
    device_code: str = field(repr=False)
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_in: float
    interval: float


def device_grant_supported(server: ServerMetadata) -> bool:
    """The server has a device authorization endpoint and, if it lists its grant types, lists this one."""
    return server.device_authorization_endpoint is not None and (
        server.grant_types is None or DEVICE_CODE_GRANT in server.grant_types
    )


def parse_device_authorization(
    answer: Mapping[str, Any], *, issuer: str, client_id: str, resource: str, scopes: tuple[str, ...]
) -> DeviceAuthorization:
    """The checked device authorization response; raises `DiscoveryError` saying what is wrong with it."""
    device_code = answer.get("device_code")
    user_code = answer.get("user_code")
    if not isinstance(device_code, str) or not device_code:
        raise DiscoveryError("the device authorization response has no device_code")
    if not isinstance(user_code, str) or not user_code.strip():
        raise DiscoveryError("the device authorization response has no user_code")
    if len(user_code) > _MAX_USER_CODE or not user_code.isprintable() or not user_code.isascii():
        raise DiscoveryError("the device authorization response has a user_code that is not short printable text")
    # `verification_url` is the name of a draft some servers still send.
    uri = answer.get("verification_uri", answer.get("verification_url"))
    verification_uri = check_url(uri, "verification_uri in the device authorization response")
    complete = answer.get("verification_uri_complete")
    verification_uri_complete = (
        None
        if complete is None
        else check_url(complete, "verification_uri_complete in the device authorization response")
    )
    expires_in = answer.get("expires_in")
    if isinstance(expires_in, bool) or not isinstance(expires_in, (int, float)) or expires_in <= 0:
        raise DiscoveryError("the device authorization response has no valid expires_in")
    interval = answer.get("interval", DEFAULT_DEVICE_INTERVAL)
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or interval <= 0:
        interval = DEFAULT_DEVICE_INTERVAL
    return DeviceAuthorization(
        issuer=issuer,
        client_id=client_id,
        resource=resource,
        scopes=scopes,
        device_code=device_code,
        user_code=user_code,
        verification_uri=verification_uri,
        verification_uri_complete=verification_uri_complete,
        expires_in=min(float(expires_in), MAX_DEVICE_WAIT),
        interval=max(float(interval), MIN_DEVICE_INTERVAL),
    )


def next_device_interval(error: str, description: str, interval: float) -> float:
    """After a device-code token request answered with an OAuth error: the seconds to wait before the next poll,
    or `AuthorizationFailed` when polling must stop (RFC 8628 §3.5)."""
    if error == "authorization_pending":
        return interval
    if error == "slow_down":
        return interval + SLOW_DOWN_STEP
    if error == "access_denied":
        raise AuthorizationFailed("the authorization was denied at the authorization server (access_denied)")
    if error == "expired_token":
        raise AuthorizationFailed("the code expired before the login was approved (expired_token)")
    detail = f"{error}: {description}" if description else error
    raise AuthorizationFailed(f"the authorization server refused the device login: {detail}")
