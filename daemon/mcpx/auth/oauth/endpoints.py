"""The HTTP side of OAuth: fetching discovery documents, registering the client, and token requests.

aiohttp, off the hot path. Every fetch is bounded in time and size and never follows redirects (a redirect
could carry the request to an address the document's checks did not see); every URL has passed
`metadata.check_url`, and the session (made by `egress`) connects only where the upstream's own address allows.
Errors carry no secrets: bodies of failed token requests are reduced to the OAuth `error` code and description.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote

import aiohttp

from mcpx import IMPLEMENTATION, jsonrpc
from mcpx.auth.oauth.metadata import (
    Challenge,
    DiscoveryError,
    ResourceMetadata,
    ServerMetadata,
    authorization_server_urls,
    check_url,
    origin_of,
    parse_bearer_challenge,
    protected_resource_urls,
    validate_resource_metadata,
    validate_server_metadata,
)
from mcpx.errors import ParseError
from mcpx.redact import redact

_MAX_DOCUMENT: Final = 1024 * 1024
_TIMEOUT: Final = 15.0
# The MCP version of the probe and of discovery requests: upstream/http.py's latest handshake version (not
# imported from there: upstream/ imports auth/, not the other way round).
_PROTOCOL_VERSION: Final = "2025-11-25"


class TokenEndpointError(Exception):
    """The token endpoint (or the device authorization or registration endpoint) answered with an OAuth error
    (`code` is e.g. `invalid_grant`; `description` is the server's `error_description`, redacted and cut short)."""

    def __init__(self, code: str, description: str = "") -> None:
        super().__init__(f"{code}: {description}".rstrip(": "))
        self.code = code
        self.description = description


class EndpointUnreachable(Exception):
    """A network failure or a server error: nothing is known about the credential, so nothing is deleted."""


@dataclass(frozen=True, slots=True)
class Client:
    """A registration at one authorization server (RFC 7591 response, pre-registration or CIMD)."""

    client_id: str
    client_secret: str | None = None
    auth_method: str = "none"  # none | client_secret_post | client_secret_basic | private_key_jwt
    # The grant types a dynamic registration was granted (empty: not known, e.g. configured clients).
    grant_types: tuple[str, ...] = ()

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "auth_method": self.auth_method,
        }
        if self.grant_types:
            record["grant_types"] = list(self.grant_types)
        return record

    @classmethod
    def from_record(cls, record: Any) -> Client | None:
        if not isinstance(record, dict) or not isinstance(record.get("client_id"), str):
            return None
        secret = record.get("client_secret")
        method = record.get("auth_method")
        grants = record.get("grant_types")
        return cls(
            record["client_id"],
            secret if isinstance(secret, str) else None,
            str(method or "none"),
            tuple(grant for grant in grants if isinstance(grant, str)) if isinstance(grants, list) else (),
        )


async def _get_json(http: aiohttp.ClientSession, url: str) -> Any | None:
    """A JSON document, or None when the server has none there (4xx). Raises `EndpointUnreachable`."""
    headers = {"Accept": "application/json", "MCP-Protocol-Version": _PROTOCOL_VERSION}
    try:
        async with (
            asyncio.timeout(_TIMEOUT),
            http.get(url, allow_redirects=False, headers=headers) as response,
        ):
            if 400 <= response.status < 500 or 300 <= response.status < 400:
                return None
            if response.status != 200:
                raise EndpointUnreachable(f"{url} answered HTTP {response.status}")
            body = await response.content.read(_MAX_DOCUMENT + 1)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise EndpointUnreachable(f"cannot fetch {url}: {type(exc).__name__}") from None
    if len(body) > _MAX_DOCUMENT:
        raise DiscoveryError(f"{url} is larger than {_MAX_DOCUMENT} bytes")
    try:
        return jsonrpc.loads(body)
    except ParseError:
        raise DiscoveryError(f"{url} is not JSON") from None


async def probe_challenge(http: aiohttp.ClientSession, url: str) -> Challenge:
    """Ask the MCP server without a token, to read its 401 challenge (scope, resource_metadata)."""
    body = jsonrpc.dumps(
        jsonrpc.request(
            0,
            "initialize",
            {
                "protocolVersion": _PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": IMPLEMENTATION,
            },
        )
    )
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    try:
        async with (
            asyncio.timeout(_TIMEOUT),
            http.post(url, data=body, headers=headers, allow_redirects=False) as response,
        ):
            if response.status in (401, 403):
                return parse_bearer_challenge(response.headers.get("WWW-Authenticate"))
            return Challenge()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise EndpointUnreachable(f"cannot reach {url}: {type(exc).__name__}") from None


async def discover(
    http: aiohttp.ClientSession, server_url: str, resource: str, challenge: Challenge
) -> tuple[ResourceMetadata | None, ServerMetadata]:
    """Protected resource metadata, then the authorization server's metadata (2026-07-28 discovery order).

    Servers of the 2025-03-26 era have no resource metadata: their origin is the authorization server, with
    RFC 8414 metadata or, lacking that, the default endpoints `/authorize`, `/token` and `/register`.
    """
    candidates = [check_url(challenge.resource_metadata, "resource_metadata")] if challenge.resource_metadata else []
    candidates += protected_resource_urls(server_url)
    root = candidates[-1]
    resource_metadata: ResourceMetadata | None = None
    for url in candidates:
        document = await _get_json(http, url)
        if document is not None:
            resource_metadata = validate_resource_metadata(document, resource, source=url, at_root=url == root)
            break
    if resource_metadata is None:
        return None, await _legacy_server_metadata(http, server_url)
    issuer = resource_metadata.authorization_servers[0]
    for url in authorization_server_urls(issuer):
        document = await _get_json(http, url)
        if document is not None:
            return resource_metadata, validate_server_metadata(document, issuer, source=url)
    raise DiscoveryError(f"no authorization server metadata found for {issuer}")


async def _legacy_server_metadata(http: aiohttp.ClientSession, server_url: str) -> ServerMetadata:
    origin = origin_of(server_url)
    document = await _get_json(http, f"{origin}/.well-known/oauth-authorization-server")
    if document is not None:
        return validate_server_metadata(document, origin, source=f"{origin}/.well-known/oauth-authorization-server")
    return validate_server_metadata(
        {
            "issuer": origin,
            "authorization_endpoint": f"{origin}/authorize",
            "token_endpoint": f"{origin}/token",
            "registration_endpoint": f"{origin}/register",
            # 2025-03-26 made PKCE mandatory for every server, so S256 is assumed here.
            "code_challenge_methods_supported": ["S256"],
        },
        origin,
        source="the 2025-03-26 default endpoints",
    )


async def register(
    http: aiohttp.ClientSession,
    server: ServerMetadata,
    *,
    redirect_uris: list[str],
    scopes: tuple[str, ...],
    grant_types: tuple[str, ...] = ("authorization_code", "refresh_token"),
) -> Client:
    """Dynamic client registration (RFC 7591) as a native public client: for the authorization code flow (with
    its loopback redirect URIs), or for the device grant (`grant_types` without `authorization_code`, no redirect
    URIs and no response types)."""
    if server.registration_endpoint is None:
        raise DiscoveryError(
            "the authorization server offers no client registration: set `client_id` for this upstream in the config"
        )
    metadata: dict[str, Any] = {
        "client_name": "mcpx",
        "redirect_uris": redirect_uris,
        "grant_types": list(grant_types),
        "response_types": ["code"] if "authorization_code" in grant_types else [],
        "token_endpoint_auth_method": "none",
        "application_type": "native",
    }
    if scopes:
        metadata["scope"] = " ".join(scopes)
    answer = await _post(http, server.registration_endpoint, json_body=metadata, expect=(200, 201))
    client_id = answer.get("client_id")
    if not isinstance(client_id, str) or not client_id:
        raise DiscoveryError("the registration response has no client_id")
    secret = answer.get("client_secret")
    method = answer.get("token_endpoint_auth_method", "none" if not secret else "client_secret_basic")
    granted = answer.get("grant_types", list(grant_types))
    if not isinstance(granted, list):
        granted = []
    return Client(
        client_id,
        secret if isinstance(secret, str) else None,
        str(method),
        tuple(grant for grant in granted if isinstance(grant, str)),
    )


def auth_method_for(server: ServerMetadata, client_secret: str | None) -> str:
    """How a configured client authenticates at the token endpoint: the first method both sides support."""
    if client_secret is None:
        return "none"
    for method in ("client_secret_basic", "client_secret_post"):
        if method in server.token_endpoint_auth_methods:
            return method
    return "client_secret_basic"


async def token_request(
    http: aiohttp.ClientSession,
    server: ServerMetadata,
    client: Client,
    form: dict[str, str],
    *,
    signing_key: Any = None,
    signing_algorithm: str = "RS256",
) -> dict[str, Any]:
    """POST to the token endpoint with the client's authentication; the parsed token response."""
    form, headers = _authenticated(server, client, form, signing_key, signing_algorithm)
    answer = await _post(http, server.token_endpoint, form=form, headers=headers, expect=(200,))
    if not isinstance(answer.get("access_token"), str) or not answer["access_token"]:
        raise TokenEndpointError("invalid_response", "the token response has no access_token")
    return answer


async def device_authorization(
    http: aiohttp.ClientSession, server: ServerMetadata, client: Client, form: dict[str, str]
) -> dict[str, Any]:
    """The device authorization request (RFC 8628 §3.1), authenticated as at the token endpoint; the response
    unchecked (see `flow.parse_device_authorization`)."""
    if server.device_authorization_endpoint is None:
        raise DiscoveryError("the authorization server has no device_authorization_endpoint")
    form, headers = _authenticated(server, client, form, None, "RS256")
    return await _post(http, server.device_authorization_endpoint, form=form, headers=headers, expect=(200,))


def _authenticated(
    server: ServerMetadata, client: Client, form: dict[str, str], signing_key: Any, signing_algorithm: str
) -> tuple[dict[str, str], dict[str, str]]:
    """The form and headers of a request authenticated as `client` (RFC 6749 §2.3)."""
    form = dict(form)
    headers: dict[str, str] = {}
    if client.auth_method == "client_secret_basic" and client.client_secret is not None:
        # RFC 6749 §2.3.1: both parts form-urlencoded before base64.
        pair = f"{quote(client.client_id, safe='')}:{quote(client.client_secret, safe='')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    elif client.auth_method == "client_secret_post" and client.client_secret is not None:
        form["client_id"] = client.client_id
        form["client_secret"] = client.client_secret
    elif client.auth_method == "private_key_jwt" and signing_key is not None:
        form["client_id"] = client.client_id
        form["client_assertion_type"] = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
        form["client_assertion"] = _client_assertion(client.client_id, server, signing_key, signing_algorithm)
    else:
        form["client_id"] = client.client_id
    return form, headers


def _client_assertion(client_id: str, server: ServerMetadata, key_pem: bytes, algorithm: str) -> str:
    """A private_key_jwt client assertion (RFC 7523 §2.2), valid for five minutes. Its audience is the
    authorization server's issuer identifier, as its only value (RFC 7523bis: with the token endpoint taken from
    metadata as audience, a malicious server could name another server's endpoint and get an assertion valid
    there)."""
    # Imported here: only machine-credential upstreams with a private key need it.
    from joserfc import jwt
    from joserfc.jwk import ECKey, RSAKey

    key = RSAKey.import_key(key_pem) if algorithm.startswith("RS") else ECKey.import_key(key_pem)
    now = int(time.time())
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": server.issuer,
        "iat": now,
        "exp": now + 300,
        "jti": str(uuid.uuid4()),
    }
    return jwt.encode({"alg": algorithm}, claims, key)


async def revoke(
    http: aiohttp.ClientSession,
    server: ServerMetadata,
    client: Client,
    token: str,
    hint: str,
    *,
    signing_key: Any = None,
    signing_algorithm: str = "RS256",
) -> None:
    """Token revocation (RFC 7009 §2.1), authenticated as at the token endpoint; nothing where the server has no
    revocation endpoint."""
    if server.revocation_endpoint is None:
        return
    form = {"token": token, "token_type_hint": hint}
    form, headers = _authenticated(server, client, form, signing_key, signing_algorithm)
    await _post(http, server.revocation_endpoint, form=form, headers=headers, expect=(200,))


async def _post(
    http: aiohttp.ClientSession,
    url: str,
    *,
    form: dict[str, str] | None = None,
    json_body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    expect: tuple[int, ...],
) -> dict[str, Any]:
    request_headers = {"Accept": "application/json", **(headers or {})}
    data: Any = form
    if json_body is not None:
        data = jsonrpc.dumps(json_body)
        request_headers["Content-Type"] = "application/json"
    try:
        async with (
            asyncio.timeout(_TIMEOUT),
            http.post(url, data=data, headers=request_headers, allow_redirects=False) as response,
        ):
            body = await response.content.read(_MAX_DOCUMENT)
            status = response.status
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise EndpointUnreachable(f"cannot reach {url}: {type(exc).__name__}") from None
    try:
        answer = jsonrpc.loads(body) if body else {}
    except ParseError:
        answer = None
    if status >= 500 or answer is None:
        raise EndpointUnreachable(f"{url} answered HTTP {status}")
    if status not in expect:
        error = answer.get("error") if isinstance(answer, dict) else None
        description = answer.get("error_description", "") if isinstance(answer, dict) else ""
        code = error if isinstance(error, str) else f"http_{status}"
        raise TokenEndpointError(code, redact(str(description))[:200])
    if not isinstance(answer, dict):
        raise TokenEndpointError("invalid_response", f"{url} did not answer with a JSON object")
    return answer
