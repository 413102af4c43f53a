"""A real OAuth 2.1 authorization server and an OAuth-protected MCP upstream, for tests.

`AuthServer` is an aiohttp.web app on 127.0.0.1 (ephemeral port) implementing, in memory: AS metadata (RFC 8414 or
OpenID discovery), dynamic client registration (RFC 7591), client ID metadata documents, the authorization code grant
with PKCE S256 (auto-approved: no UI), resource indicators (RFC 8707), the `iss` authorization response parameter
(RFC 9207), refresh tokens with strict rotation and family revocation on reuse, client credentials, the device
authorization grant (RFC 8628, for clients registered with it; its verification URI approves or denies a user code
over HTTP, as the user's browser would) and token revocation (RFC 7009). Knobs make it misbehave on purpose.

`ProtectedUpstream` is a real SDK `MCPServer` (via `tests.support.upstream.Upstream`) behind an ASGI wrapper that
demands an audience-bound bearer token from the `AuthServer` (401 with a `WWW-Authenticate` challenge otherwise),
serves Protected Resource Metadata (RFC 9728), and answers 403 `insufficient_scope` for `admin_reset` without
`mcp:admin`.

Token values are kept in memory only; nothing here prints or logs them (containers of tokens have redacted reprs).
"""

from __future__ import annotations

import base64
import hmac
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import aiohttp
from aiohttp import web
from authlib.common.security import generate_token  # type: ignore[import-untyped]
from authlib.oauth2.rfc7636 import create_s256_code_challenge  # type: ignore[import-untyped]
from mcp.server.mcpserver import Context, MCPServer
from starlette.types import ASGIApp, Receive, Scope, Send

from mcpx.auth.oauth.metadata import is_loopback
from tests.support.upstream import Upstream, read_ahead, reserve_port, respond

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
WRONG_ISSUER = "https://attacker.example"
CODE_TTL = 600
DEVICE_CODE_TTL = 600


def new_token() -> str:
    """An opaque random token (URL-safe characters only)."""
    return str(generate_token(48))


def s256(verifier: str) -> str:
    """The PKCE S256 code challenge for a verifier (RFC 7636)."""
    return str(create_s256_code_challenge(verifier))


class RedactedSet(set[str]):
    """A set of secrets whose repr never shows its members (safe in assertion failure output)."""

    def __repr__(self) -> str:
        return f"<{len(self)} redacted>"


def redirect_uri_matches(registered: str, presented: str) -> bool:
    """Exact match, except that loopback http redirect URIs match on any port (RFC 8252 section 7.3)."""
    if registered == presented:
        return True
    reg, pres = urlsplit(registered), urlsplit(presented)
    if reg.scheme != "http" or pres.scheme != "http" or not is_loopback(reg.hostname):
        return False
    return (reg.hostname, reg.path or "/", reg.query) == (pres.hostname, pres.path or "/", pres.query)


def add_query(url: str, params: dict[str, str]) -> str:
    parts = urlsplit(url)
    query = f"{parts.query}&{urlencode(params)}" if parts.query else urlencode(params)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


@dataclass(frozen=True)
class AccessInfo:
    """What an access token grants. `family_id` names the grant (all tokens issued from one authorization)."""

    client_id: str
    scopes: tuple[str, ...]
    resource: str | None
    expires_at: float
    family_id: str


@dataclass
class Client:
    client_id: str
    client_secret: str | None = field(repr=False)
    redirect_uris: list[str]
    token_endpoint_auth_method: str
    grant_types: list[str]
    source: Literal["dcr", "pre_registered", "cimd"]

    @property
    def confidential(self) -> bool:
        return self.client_secret is not None


@dataclass
class _Code:
    client_id: str
    redirect_uri: str
    code_challenge: str
    resource: str | None
    scopes: tuple[str, ...]
    expires_at: float
    family_id: str | None = None  # set once redeemed: a replayed code revokes what it produced


@dataclass
class _Family:
    family_id: str
    client_id: str
    scopes: tuple[str, ...]
    resource: str | None
    current_refresh: str | None = field(default=None, repr=False)
    tokens: RedactedSet = field(default_factory=RedactedSet)
    revoked: bool = False


@dataclass
class _Device:
    device_code: str = field(repr=False)
    user_code: str
    client_id: str
    scopes: tuple[str, ...]
    resource: str | None
    expires_at: float
    status: Literal["pending", "approved", "denied", "used"] = "pending"
    polls: int = 0


class OAuthError(Exception):
    """An RFC 6749 error response."""

    def __init__(self, error: str, description: str = "", status: int = 400) -> None:
        super().__init__(error)
        self.error = error
        self.description = description
        self.status = status


class AuthorizationFailed(Exception):
    """The authorization endpoint refused (error redirect or an HTTP error page)."""

    def __init__(self, error: str, description: str = "", location: str | None = None) -> None:
        super().__init__(f"{error}: {description}" if description else error)
        self.error = error
        self.description = description
        self.location = location


class _Served:
    """`async with` starts the server and stops it on exit; a server that fails to start is stopped (its reserved
    socket closed) before the error propagates."""

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


class _LoopbackWebApp(_Served):
    """An aiohttp application on a reserved 127.0.0.1 port; subclasses build it in `_app()`."""

    def __init__(self) -> None:
        self._sock = reserve_port()
        self.port: int = self._sock.getsockname()[1]
        self.origin = f"http://127.0.0.1:{self.port}"
        self._runner: web.AppRunner | None = None

    def _app(self) -> web.Application:
        raise NotImplementedError

    async def start(self) -> None:
        self._sock.listen(128)
        self._runner = web.AppRunner(self._app(), access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._sock.close()


class AuthServer(_LoopbackWebApp):
    """An in-memory OAuth 2.1 authorization server on 127.0.0.1; see the module docstring."""

    def __init__(
        self,
        *,
        issuer_path: str = "",
        metadata_style: Literal["oauth", "openid"] = "oauth",
        wrong_issuer_in_metadata: bool = False,
        advertise_s256: bool = True,
        iss_parameter: Literal["correct", "missing", "wrong"] = "correct",
        advertise_iss: bool = True,
        authorization_endpoint_override: str | None = None,
        dcr: bool = True,
        cimd: bool = False,
        pre_registered: dict[str, str | None] | None = None,
        pre_registered_redirect_uris: list[str] | None = None,
        scopes_supported: list[str] | None = None,
        grantable_scopes: list[str] | None = None,
        access_token_ttl: int = 3600,
        device_grant: bool = False,
        device_poll_interval: float = 1,
        device_code_ttl: float = DEVICE_CODE_TTL,
        device_slow_down: int = 0,
        device_verification_uri: str | None = None,
        client_credentials: bool = True,
        token_endpoint_failure: int | None = None,
        registration_auth_method: str | None = None,
    ) -> None:
        if issuer_path and (not issuer_path.startswith("/") or issuer_path.endswith("/")):
            raise ValueError("issuer_path must start with '/' and not end with '/'")
        self.issuer_path = issuer_path
        self.metadata_style = metadata_style
        self.wrong_issuer_in_metadata = wrong_issuer_in_metadata
        self.advertise_s256 = advertise_s256
        self.iss_parameter = iss_parameter
        self.advertise_iss = advertise_iss
        self.authorization_endpoint_override = authorization_endpoint_override
        self.dcr = dcr
        self.cimd = cimd
        self.scopes_supported = list(scopes_supported or ["mcp:read", "mcp:write"])
        self.grantable_scopes = set(grantable_scopes or [*self.scopes_supported, "mcp:admin"])
        self.access_token_ttl = access_token_ttl
        self.device_grant = device_grant
        # Seconds (fractions allowed, so tests poll fast) in the device authorization response's `interval`.
        self.device_poll_interval = device_poll_interval
        # The device code's lifetime (the response's `expires_in`, also enforced).
        self.device_code_ttl = device_code_ttl
        # The first this many polls of each device code are answered `slow_down`, whatever their timing.
        self.device_slow_down = device_slow_down
        # Replaces the verification URI (and drops verification_uri_complete), e.g. with one a client must refuse.
        self.device_verification_uri = device_verification_uri
        self.client_credentials = client_credentials
        # Replaces the token_endpoint_auth_method every registration asks for (the server decides: RFC 7591 §3.2.1),
        # e.g. "client_secret_basic": a confidential client with a secret, where mcpx asks to be a public one.
        self.registration_auth_method = registration_auth_method
        # Mutable at any time: while set, the token endpoint answers this HTTP status with a non-JSON body.
        self.token_endpoint_failure = token_endpoint_failure
        # Mutable at any time: while True, the authorization endpoint redirects with error=access_denied.
        self.deny_authorization = False

        super().__init__()
        self.issuer = self.origin + issuer_path

        self.clients: dict[str, Client] = {}
        for client_id, secret in (pre_registered or {}).items():
            self.clients[client_id] = Client(
                client_id=client_id,
                client_secret=secret,
                redirect_uris=list(pre_registered_redirect_uris or ["http://127.0.0.1/callback"]),
                token_endpoint_auth_method="none" if secret is None else "client_secret_basic",
                grant_types=["authorization_code", "refresh_token", "client_credentials", DEVICE_CODE_GRANT],
                source="pre_registered",
            )
        self._codes: dict[str, _Code] = {}
        self._families: dict[str, _Family] = {}
        self._access: dict[str, AccessInfo] = {}
        self._refresh: dict[str, str] = {}  # every refresh token ever issued -> family id
        self._devices: dict[str, _Device] = {}  # device_code -> record

        # Observations for tests.
        self.requests: list[tuple[str, str]] = []  # (method, path) of every HTTP request, in order
        self.token_requests: list[str] = []  # grant_type of every token request, in order
        self.refresh_count = 0  # successful refresh-token rotations
        self.invalid_grant_count = 0  # invalid_grant answers from the token endpoint
        self.token_errors: list[str] = []  # every error code the token endpoint answered, in order
        self.authorization_requests: list[dict[str, str]] = []  # query parameters of each authorization request
        self.registrations: list[dict[str, Any]] = []  # request body of each registration
        self.cimd_fetches: list[str] = []  # client ID metadata document URLs fetched
        self.device_user_codes: list[str] = []  # user codes issued, in order
        self.device_authorization_requests: list[dict[str, str]] = []  # form of each (client_secret removed)
        self.device_polls: list[float] = []  # time.monotonic() of each device_code token request, in order
        # token_type_hint of each revocation request from an authenticated client (others are answered 401)
        self.revocation_requests: list[str | None] = []
        self.revoked = RedactedSet()  # every token revoked (endpoint, family revocation or code replay)

    # ---- lifecycle

    @property
    def metadata_url(self) -> str:
        """Where this server's metadata is served (the RFC 8414 URL or the first OpenID location)."""
        if self.metadata_style == "oauth":
            return f"{self.origin}/.well-known/oauth-authorization-server{self.issuer_path}"
        return f"{self.origin}/.well-known/openid-configuration{self.issuer_path}"

    def endpoint(self, name: str) -> str:
        return f"{self.issuer}/{name}"

    def _app(self) -> web.Application:
        @web.middleware
        async def record(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
            self.requests.append((request.method, request.path))
            response: web.StreamResponse = await handler(request)
            return response

        app = web.Application(middlewares=[record])
        for path in self._metadata_paths():
            app.router.add_get(path, self._metadata)
        p = self.issuer_path
        app.router.add_get(f"{p}/authorize", self._authorize)
        app.router.add_post(f"{p}/token", self._token)
        app.router.add_post(f"{p}/revoke", self._revoke)
        if self.dcr:
            app.router.add_post(f"{p}/register", self._register)
        if self.device_grant:
            app.router.add_post(f"{p}/device_authorization", self._device_authorization)
            app.router.add_route("*", f"{p}/device", self._device_verification)
        if self.metadata_style == "openid":
            app.router.add_get(f"{p}/jwks", self._jwks)
        return app

    # ---- test helpers

    def verify(self, token: str) -> AccessInfo | None:
        """The grant behind a live access token; None when unknown, revoked or expired."""
        info = self._access.get(token)
        if info is None or token in self.revoked or info.expires_at <= time.time():
            return None
        return info

    def expire_access_tokens(self) -> None:
        """Make every access token issued so far expired (tokens issued later are unaffected)."""
        now = time.time()
        for token, info in self._access.items():
            self._access[token] = AccessInfo(info.client_id, info.scopes, info.resource, now - 1, info.family_id)

    def revoke_all_tokens(self) -> None:
        """Revoke every grant server-side, as if the user withdrew consent: refreshes then fail with invalid_grant."""
        for family in self._families.values():
            self._revoke_family(family)

    def is_revoked(self, token: str) -> bool:
        return token in self.revoked

    @property
    def families_revoked(self) -> int:
        return sum(1 for family in self._families.values() if family.revoked)

    def approve_device(self, user_code: str) -> None:
        """The user approves a device authorization: the next device_code poll gets tokens."""
        self._device_by_user_code(user_code).status = "approved"

    def deny_device(self, user_code: str) -> None:
        """The user denies a device authorization: the next poll gets access_denied."""
        self._device_by_user_code(user_code).status = "denied"

    def _device_by_user_code(self, user_code: str) -> _Device:
        """The pending device authorization with that user code (KeyError: none, or already answered)."""
        for device in self._devices.values():
            if device.user_code == user_code and device.status == "pending":
                return device
        raise KeyError(user_code)

    # ---- metadata

    def _metadata_paths(self) -> list[str]:
        p = self.issuer_path
        if self.metadata_style == "oauth":
            return [f"/.well-known/oauth-authorization-server{p}"]
        paths = [f"/.well-known/openid-configuration{p}"]
        if p:
            paths.append(f"{p}/.well-known/openid-configuration")
        return paths

    def metadata(self) -> dict[str, Any]:
        grant_types = ["authorization_code", "refresh_token"]
        if self.client_credentials:
            grant_types.append("client_credentials")
        if self.device_grant:
            grant_types.append(DEVICE_CODE_GRANT)
        doc: dict[str, Any] = {
            "issuer": WRONG_ISSUER if self.wrong_issuer_in_metadata else self.issuer,
            "authorization_endpoint": self.authorization_endpoint_override or self.endpoint("authorize"),
            "token_endpoint": self.endpoint("token"),
            "revocation_endpoint": self.endpoint("revoke"),
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": grant_types,
            "token_endpoint_auth_methods_supported": ["none", "client_secret_post", "client_secret_basic"],
            "revocation_endpoint_auth_methods_supported": ["none", "client_secret_post", "client_secret_basic"],
            "scopes_supported": self.scopes_supported,
        }
        if self.advertise_s256:
            doc["code_challenge_methods_supported"] = ["S256"]
        if self.advertise_iss:
            doc["authorization_response_iss_parameter_supported"] = True
        if self.dcr:
            doc["registration_endpoint"] = self.endpoint("register")
        if self.cimd:
            doc["client_id_metadata_document_supported"] = True
        if self.device_grant:
            doc["device_authorization_endpoint"] = self.endpoint("device_authorization")
        if self.metadata_style == "openid":
            doc["jwks_uri"] = self.endpoint("jwks")
            doc["subject_types_supported"] = ["public"]
            doc["id_token_signing_alg_values_supported"] = ["RS256"]
        return doc

    async def _metadata(self, request: web.Request) -> web.Response:
        return web.json_response(self.metadata())

    async def _jwks(self, request: web.Request) -> web.Response:
        return web.json_response({"keys": []})

    # ---- registration (RFC 7591)

    async def _register(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _error_response(OAuthError("invalid_client_metadata", "body is not JSON"))
        if not isinstance(body, dict):
            return _error_response(OAuthError("invalid_client_metadata", "body is not a JSON object"))
        self.registrations.append(body)
        grant_types = body.get("grant_types", ["authorization_code"])
        redirect_uris = body.get("redirect_uris", [])
        method = self.registration_auth_method or body.get("token_endpoint_auth_method", "none")
        if not isinstance(grant_types, list) or not all(isinstance(g, str) for g in grant_types):
            return _error_response(OAuthError("invalid_client_metadata", "grant_types"))
        if not isinstance(redirect_uris, list) or not all(isinstance(u, str) for u in redirect_uris):
            return _error_response(OAuthError("invalid_redirect_uri", "redirect_uris must be a list of strings"))
        if "authorization_code" in grant_types and not redirect_uris:
            return _error_response(OAuthError("invalid_redirect_uri", "redirect_uris required"))
        for uri in redirect_uris:
            parts = urlsplit(uri)
            if not parts.scheme or parts.fragment or (parts.scheme == "http" and not is_loopback(parts.hostname)):
                return _error_response(OAuthError("invalid_redirect_uri", "unacceptable redirect URI"))
        if method not in ("none", "client_secret_post", "client_secret_basic"):
            return _error_response(OAuthError("invalid_client_metadata", "token_endpoint_auth_method"))
        client = Client(
            client_id="dcr-" + generate_token(16),
            client_secret=None if method == "none" else new_token(),
            redirect_uris=list(redirect_uris),
            token_endpoint_auth_method=method,
            grant_types=list(grant_types),
            source="dcr",
        )
        self.clients[client.client_id] = client
        echoed = ("client_name", "application_type", "scope", "client_uri", "software_id")
        answer = {key: body[key] for key in echoed if key in body} | {
            "client_id": client.client_id,
            "client_id_issued_at": int(time.time()),
            "redirect_uris": client.redirect_uris,
            "grant_types": client.grant_types,
            "response_types": body.get("response_types", ["code"]),
            "token_endpoint_auth_method": method,
        }
        if client.client_secret is not None:
            answer["client_secret"] = client.client_secret
            answer["client_secret_expires_at"] = 0
        return web.json_response(answer, status=201, headers={"Cache-Control": "no-store"})

    # ---- client lookup (registered, pre-registered or a client ID metadata document)

    async def _client(self, client_id: str, redirect_uri: str | None = None) -> Client | None:
        if self.cimd and urlsplit(client_id).scheme in ("http", "https"):
            if client_id in self.clients and redirect_uri is None:
                return self.clients[client_id]
            return await self._fetch_cimd(client_id, redirect_uri)
        return self.clients.get(client_id)

    async def _fetch_cimd(self, url: str, redirect_uri: str | None) -> Client | None:
        if not is_loopback(urlsplit(url).hostname):
            return None  # tests stay on loopback
        self.cimd_fetches.append(url)
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
                session.get(url, allow_redirects=False) as response,
            ):
                if response.status != 200:
                    return None
                doc = await response.json(content_type=None)
        except (aiohttp.ClientError, ValueError, TimeoutError):
            return None
        if not isinstance(doc, dict) or doc.get("client_id") != url:
            return None
        uris = doc.get("redirect_uris")
        if not isinstance(uris, list) or not all(isinstance(u, str) for u in uris):
            return None
        if redirect_uri is not None and not any(redirect_uri_matches(u, redirect_uri) for u in uris):
            return None
        if doc.get("token_endpoint_auth_method", "none") != "none":
            return None  # only public CIMD clients here
        client = Client(
            client_id=url,
            client_secret=None,
            redirect_uris=list(uris),
            token_endpoint_auth_method="none",
            grant_types=list(doc.get("grant_types", ["authorization_code", "refresh_token"])),
            source="cimd",
        )
        self.clients[url] = client
        return client

    # ---- authorization endpoint

    def _iss_params(self) -> dict[str, str]:
        if self.iss_parameter == "correct":
            return {"iss": self.issuer}
        if self.iss_parameter == "wrong":
            return {"iss": WRONG_ISSUER}
        return {}

    def _scopes(self, requested: str | None, default: Iterable[str]) -> tuple[str, ...]:
        if requested is None or not requested.strip():
            return tuple(default)
        scopes = tuple(dict.fromkeys(requested.split()))
        unknown = [s for s in scopes if s not in self.grantable_scopes]
        if unknown:
            raise OAuthError("invalid_scope", f"unknown scope {' '.join(unknown)}")
        return scopes

    async def _authorize(self, request: web.Request) -> web.Response:
        query = dict(request.query)
        self.authorization_requests.append(query)
        client_id = query.get("client_id", "")
        redirect_uri = query.get("redirect_uri")
        if not client_id:
            return web.Response(status=400, text="invalid_request: client_id missing")
        if not redirect_uri:
            return web.Response(status=400, text="invalid_request: redirect_uri missing")
        client = await self._client(client_id, redirect_uri)
        if client is None:
            return web.Response(status=400, text="invalid_client: unknown client")
        if not any(redirect_uri_matches(u, redirect_uri) for u in client.redirect_uris):
            return web.Response(status=400, text="invalid_request: redirect_uri not registered")

        state = query.get("state")

        def redirect(params: dict[str, str]) -> web.Response:
            if state is not None:
                params["state"] = state
            params |= self._iss_params()
            return web.Response(status=302, headers={"Location": add_query(redirect_uri, params)})

        def fail(error: str, description: str) -> web.Response:
            return redirect({"error": error, "error_description": description})

        if query.get("response_type") != "code":
            return fail("unsupported_response_type", "response_type must be code")
        challenge = query.get("code_challenge")
        if not challenge:
            return fail("invalid_request", "code_challenge required")
        if query.get("code_challenge_method") != "S256":
            return fail("invalid_request", "code_challenge_method must be S256")
        try:
            scopes = self._scopes(query.get("scope"), self.scopes_supported)
        except OAuthError as exc:
            return fail(exc.error, exc.description)
        if self.deny_authorization:
            return fail("access_denied", "the user said no")
        code = new_token()
        self._codes[code] = _Code(
            client_id=client.client_id,
            redirect_uri=redirect_uri,
            code_challenge=challenge,
            resource=query.get("resource"),
            scopes=scopes,
            expires_at=time.time() + CODE_TTL,
        )
        return redirect({"code": code})

    # ---- token endpoint

    async def _authenticate(self, request: web.Request, form: dict[str, str]) -> Client:
        """The calling client: HTTP Basic or client_secret_post for confidential clients, client_id for public."""
        header = request.headers.get("Authorization", "")
        basic = header[:6].lower() == "basic "
        if basic:
            try:
                decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
                raw_id, _, raw_secret = decoded.partition(":")
            except (ValueError, UnicodeDecodeError) as exc:
                raise OAuthError("invalid_client", "malformed Basic credentials", 401) from exc
            client_id, secret = unquote(raw_id), unquote(raw_secret)
            if form.get("client_id", client_id) != client_id:
                raise OAuthError("invalid_request", "client_id disagrees with Basic credentials")
        else:
            client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        if not client_id:
            raise OAuthError("invalid_client", "no client authentication", 401)
        client = await self._client(client_id)
        if client is None:
            raise OAuthError("invalid_client", "unknown client", 401)
        if client.client_secret is not None and not hmac.compare_digest(secret.encode(), client.client_secret.encode()):
            raise OAuthError("invalid_client", "client authentication failed", 401)
        return client

    def _issue(self, family: _Family, *, refresh: bool = True) -> dict[str, Any]:
        access = new_token()
        info = AccessInfo(
            family.client_id, family.scopes, family.resource, time.time() + self.access_token_ttl, family.family_id
        )
        self._access[access] = info
        family.tokens.add(access)
        answer: dict[str, Any] = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": self.access_token_ttl,
            "scope": " ".join(family.scopes),
        }
        if refresh:
            rt = new_token()
            self._refresh[rt] = family.family_id
            family.tokens.add(rt)
            family.current_refresh = rt
            answer["refresh_token"] = rt
        return answer

    def _new_family(self, client_id: str, scopes: tuple[str, ...], resource: str | None) -> _Family:
        family = _Family("fam-" + generate_token(12), client_id, scopes, resource)
        self._families[family.family_id] = family
        return family

    def _revoke_family(self, family: _Family) -> None:
        family.revoked = True
        family.current_refresh = None
        self.revoked.update(family.tokens)

    async def _token(self, request: web.Request) -> web.Response:
        form = await _form(request)
        grant_type = form.get("grant_type", "")
        self.token_requests.append(grant_type)
        if self.token_endpoint_failure is not None:
            return web.Response(status=self.token_endpoint_failure, text="upstream trouble")
        try:
            if grant_type == "authorization_code":
                answer = await self._grant_code(request, form)
            elif grant_type == "refresh_token":
                answer = await self._grant_refresh(request, form)
            elif grant_type == "client_credentials" and self.client_credentials:
                answer = await self._grant_client_credentials(request, form)
            elif grant_type == DEVICE_CODE_GRANT and self.device_grant:
                answer = await self._grant_device(request, form)
            else:
                raise OAuthError("unsupported_grant_type", grant_type)
        except OAuthError as exc:
            self.token_errors.append(exc.error)
            if exc.error == "invalid_grant":
                self.invalid_grant_count += 1
            return _error_response(exc, basic=request.headers.get("Authorization", "")[:6].lower() == "basic ")
        return web.json_response(answer, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    async def _grant_code(self, request: web.Request, form: dict[str, str]) -> dict[str, Any]:
        client = await self._authenticate(request, form)
        code = self._codes.get(form.get("code", ""))
        if code is None or code.client_id != client.client_id:
            raise OAuthError("invalid_grant", "unknown authorization code")
        if code.family_id is not None:  # replayed: revoke everything the code produced (RFC 6749 section 4.1.2)
            self._revoke_family(self._families[code.family_id])
            raise OAuthError("invalid_grant", "authorization code already used")
        if code.expires_at <= time.time():
            raise OAuthError("invalid_grant", "authorization code expired")
        if form.get("redirect_uri") != code.redirect_uri:
            raise OAuthError("invalid_grant", "redirect_uri does not match the authorization request")
        verifier = form.get("code_verifier", "")
        if not verifier or not hmac.compare_digest(s256(verifier), code.code_challenge):
            raise OAuthError("invalid_grant", "PKCE verification failed")
        if form.get("resource") != code.resource:
            raise OAuthError("invalid_target", "resource differs from the authorization request")
        family = self._new_family(client.client_id, code.scopes, code.resource)
        code.family_id = family.family_id
        return self._issue(family)

    async def _grant_refresh(self, request: web.Request, form: dict[str, str]) -> dict[str, Any]:
        client = await self._authenticate(request, form)
        rt = form.get("refresh_token", "")
        family_id = self._refresh.get(rt)
        family = self._families.get(family_id) if family_id is not None else None
        if family is None or family.client_id != client.client_id:
            raise OAuthError("invalid_grant", "unknown refresh token")
        if family.revoked or rt in self.revoked:
            raise OAuthError("invalid_grant", "refresh token revoked")
        if rt != family.current_refresh:  # reuse of a rotated-out token: assume theft, kill the whole grant
            self._revoke_family(family)
            raise OAuthError("invalid_grant", "refresh token reused")
        resource = form.get("resource")
        if resource is not None and resource != family.resource:
            raise OAuthError("invalid_target", "resource differs from the grant")
        scopes = family.scopes
        if form.get("scope"):
            scopes = tuple(dict.fromkeys(form["scope"].split()))
            if not set(scopes) <= set(family.scopes):
                raise OAuthError("invalid_scope", "scope exceeds the grant")
        # Strict rotation: the presented token stops being current; a narrower scope applies to new tokens only.
        narrowed = _Family(family.family_id, family.client_id, scopes, family.resource, tokens=family.tokens)
        answer = self._issue(narrowed)
        family.current_refresh = narrowed.current_refresh
        self.refresh_count += 1
        return answer

    async def _grant_client_credentials(self, request: web.Request, form: dict[str, str]) -> dict[str, Any]:
        client = await self._authenticate(request, form)
        if not client.confidential:
            raise OAuthError("unauthorized_client", "client_credentials needs a confidential client")
        scopes = self._scopes(form.get("scope"), self.scopes_supported)
        family = self._new_family(client.client_id, scopes, form.get("resource"))
        return self._issue(family, refresh=False)

    async def _grant_device(self, request: web.Request, form: dict[str, str]) -> dict[str, Any]:
        client = await self._authenticate(request, form)
        self.device_polls.append(time.monotonic())
        device = self._devices.get(form.get("device_code", ""))
        if device is None or device.client_id != client.client_id:
            raise OAuthError("invalid_grant", "unknown device code")
        if device.expires_at <= time.time():
            raise OAuthError("expired_token", "device code expired")
        device.polls += 1
        if device.polls <= self.device_slow_down:
            raise OAuthError("slow_down", "polling too fast")
        if device.status == "pending":
            raise OAuthError("authorization_pending", "the user has not answered yet")
        if device.status == "denied":
            raise OAuthError("access_denied", "the user said no")
        if device.status == "used":
            raise OAuthError("invalid_grant", "device code already used")
        device.status = "used"
        family = self._new_family(client.client_id, device.scopes, device.resource)
        return self._issue(family)

    async def _device_authorization(self, request: web.Request) -> web.Response:
        form = await _form(request)
        self.device_authorization_requests.append({k: v for k, v in form.items() if k != "client_secret"})
        try:
            client = await self._authenticate(request, form)
            if DEVICE_CODE_GRANT not in client.grant_types:
                raise OAuthError("unauthorized_client", "this client may not use the device grant")
            scopes = self._scopes(form.get("scope"), self.scopes_supported)
        except OAuthError as exc:
            return _error_response(exc)
        device_code = new_token()
        user_code = f"{generate_token(4).upper()}-{generate_token(4).upper()}"
        self._devices[device_code] = _Device(
            device_code, user_code, client.client_id, scopes, form.get("resource"), time.time() + self.device_code_ttl
        )
        self.device_user_codes.append(user_code)
        verification = self.endpoint("device")
        answer: dict[str, Any] = {
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri": verification,
            "verification_uri_complete": add_query(verification, {"user_code": user_code}),
            "expires_in": self.device_code_ttl,
            "interval": self.device_poll_interval,
        }
        if self.device_verification_uri is not None:
            answer["verification_uri"] = self.device_verification_uri
            del answer["verification_uri_complete"]
        return web.json_response(answer, headers={"Cache-Control": "no-store"})

    async def _device_verification(self, request: web.Request) -> web.Response:
        """The verification URI, as the user's browser uses it (no UI): `user_code` (query or form) is approved,
        or denied with `decision=deny`."""
        params = dict(request.query)
        if request.method == "POST":
            params |= await _form(request)
        user_code = params.get("user_code", "").strip().upper()
        deny = params.get("decision", "approve") == "deny"
        try:
            (self.deny_device if deny else self.approve_device)(user_code)
        except KeyError:
            return web.Response(status=400, text="unknown or already answered code")
        return web.Response(text="denied" if deny else "approved", content_type="text/plain")

    # ---- revocation (RFC 7009)

    async def _revoke(self, request: web.Request) -> web.Response:
        form = await _form(request)
        try:
            client = await self._authenticate(request, form)
        except OAuthError as exc:
            return _error_response(exc, basic=request.headers.get("Authorization", "")[:6].lower() == "basic ")
        self.revocation_requests.append(form.get("token_type_hint"))
        token = form.get("token", "")
        if not token:
            return _error_response(OAuthError("invalid_request", "token missing"))
        family_id = self._refresh.get(token)
        if family_id is not None and self._families[family_id].client_id == client.client_id:
            self._revoke_family(self._families[family_id])  # a refresh token takes its access tokens with it
        elif (info := self._access.get(token)) is not None and info.client_id == client.client_id:
            self.revoked.add(token)
        return web.Response(status=200)


async def _form(request: web.Request) -> dict[str, str]:
    """The request's form fields (files, which no OAuth request has, are left out)."""
    return {key: value for key, value in (await request.post()).items() if isinstance(value, str)}


def _error_response(exc: OAuthError, *, basic: bool = False) -> web.Response:
    body = {"error": exc.error}
    if exc.description:
        body["error_description"] = exc.description
    headers = {"Cache-Control": "no-store"}
    if exc.status == 401 and basic:
        headers["WWW-Authenticate"] = 'Basic realm="oauth"'
    return web.json_response(body, status=exc.status, headers=headers)


class MetadataDocumentHost(_LoopbackWebApp):
    """A loopback web server publishing static JSON documents (e.g. client ID metadata documents)."""

    def __init__(self) -> None:
        super().__init__()
        self.documents: dict[str, dict[str, Any]] = {}
        self.fetches: list[str] = []

    def url(self, path: str) -> str:
        return self.origin + path

    def publish(self, path: str, document: dict[str, Any]) -> str:
        self.documents[path] = document
        return self.url(path)

    async def _serve(self, request: web.Request) -> web.Response:
        self.fetches.append(request.path)
        document = self.documents.get(request.path)
        if document is None:
            return web.Response(status=404)
        return web.json_response(document)

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._serve)
        return app


# ---- the protected MCP upstream

PRM_PATHS = {"path": "/.well-known/oauth-protected-resource/mcp", "root": "/.well-known/oauth-protected-resource"}


class ProtectedUpstream(Upstream, _Served):
    """A real SDK MCPServer (tools echo, add, ..., whoami, admin_reset) requiring bearer tokens from `auth`.

    Every request to /mcp needs a live token from `auth` whose `resource` is exactly `self.resource` (what its
    metadata names: `self.url` unless overridden) and which carries `required_scope`; otherwise 401 (no/bad token)
    or 403 (missing scope), with a `WWW-Authenticate` challenge.
    `tools/call` of `admin_reset` additionally needs `mcp:admin` (403 `insufficient_scope` otherwise).
    """

    def __init__(
        self,
        auth: AuthServer,
        *,
        name: str = "protected",
        json_response: bool = True,
        challenge_header: bool = True,
        prm_location: Literal["path", "root"] = "path",
        prm_resource_override: str | None = None,
        scopes_supported: list[str] | None = None,
        required_scope: str = "mcp:read",
        customize: Callable[[MCPServer], None] | None = None,
    ) -> None:
        self.auth = auth
        self.challenge_header = challenge_header
        self.prm_location = prm_location
        self.prm_resource_override = prm_resource_override
        self.prm_scopes = list(scopes_supported or auth.scopes_supported)
        self.required_scope = required_scope
        self._user_customize = customize
        super().__init__(name, json_response=json_response, tokens=None, customize=self._add_tools)
        self.prm_url = f"http://127.0.0.1:{self.port}{PRM_PATHS[prm_location]}"
        self.bearer_requests = 0  # requests that carried an `Authorization: Bearer` header
        self.rejected_401 = 0
        self.rejected_403 = 0
        self.prm_requests = 0
        # Set by a test: the metadata document answers 404 (as while the server redeploys), wherever it is asked.
        self.prm_missing = False
        self.admin_resets = 0

    @property
    def resource(self) -> str:
        return self.prm_resource_override or self.url

    def prm(self) -> dict[str, Any]:
        return {
            "resource": self.resource,
            "authorization_servers": [self.auth.issuer],
            "scopes_supported": self.prm_scopes,
            "bearer_methods_supported": ["header"],
        }

    def _add_tools(self, server: MCPServer) -> None:
        auth, name = self.auth, self.name

        def caller(ctx: Context[Any]) -> AccessInfo | None:
            header = (ctx.headers or {}).get("authorization", "")
            return auth.verify(header[7:].strip()) if header[:7].lower() == "bearer " else None

        @server.tool()
        def whoami(ctx: Context[Any]) -> str:
            """Who the bearer token says the caller is: `{server}:{client_id}:{space-separated scopes}`."""
            info = caller(ctx)
            if info is None:
                return f"{name}:anonymous:"
            return f"{name}:{info.client_id}:{' '.join(info.scopes)}"

        @server.tool()
        def admin_reset(ctx: Context[Any]) -> str:
            """Reset everything (needs scope mcp:admin)."""
            info = caller(ctx)
            if info is None or "mcp:admin" not in info.scopes:  # the HTTP layer already refused; belt and braces
                raise PermissionError("mcp:admin required")
            self.admin_resets += 1
            return f"{name}:reset"

        if self._user_customize is not None:
            self._user_customize(server)

    def _challenge(self, *, error: str | None = None, scope: str | None = None) -> str:
        if not self.challenge_header:
            return "Bearer"
        params = []
        if error is not None:
            params.append(f'error="{error}"')
        if error != "insufficient_scope":
            params.append(f'resource_metadata="{self.prm_url}"')
            params.append(f'scope="{scope or self.required_scope}"')
        else:
            params.append(f'scope="{scope}"')
            params.append(f'resource_metadata="{self.prm_url}"')
        return "Bearer " + ", ".join(params)

    def app(self) -> ASGIApp:
        inner = super().app()
        prm_path = PRM_PATHS[self.prm_location]

        async def insufficient_scope(send: Send, needed: str) -> None:
            self.rejected_403 += 1
            challenge = self._challenge(error="insufficient_scope", scope=needed)
            headers = {"WWW-Authenticate": challenge, "Content-Type": "application/json"}
            await respond(send, 403, b'{"error":"insufficient_scope"}', headers)

        async def protected(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await inner(scope, receive, send)
                return
            path: str = scope["path"]
            if path.startswith("/.well-known/"):
                if path == prm_path and scope["method"] == "GET" and not self.prm_missing:
                    self.prm_requests += 1
                    body = json.dumps(self.prm()).encode()
                    await respond(send, 200, body, {"Content-Type": "application/json"})
                else:
                    await respond(send, 404, b"not found", {"Content-Type": "text/plain"})
                return
            headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
            authorization = headers.get("authorization", "")
            token = authorization[7:].strip() if authorization[:7].lower() == "bearer " else None
            if token:
                self.bearer_requests += 1
            info = self.auth.verify(token) if token else None
            if info is None or info.resource != self.resource:
                self.rejected_401 += 1
                error = "invalid_token" if token else None
                challenge = self._challenge(error=error)
                body = json.dumps({"error": error or "unauthorized"}).encode()
                await respond(send, 401, body, {"WWW-Authenticate": challenge, "Content-Type": "application/json"})
                return
            if self.required_scope not in info.scopes:
                await insufficient_scope(send, self.required_scope)
                return
            if scope["method"] != "POST":
                await inner(scope, receive, send)
                return
            # Read the JSON-RPC body to spot admin_reset, then replay it to the SDK app.
            read = await read_ahead(receive)
            if read is None:
                return  # client went away
            body, replay = read
            if "mcp:admin" not in info.scopes and _calls_tool(body, "admin_reset"):
                await insufficient_scope(send, " ".join(dict.fromkeys([self.required_scope, "mcp:admin"])))
                return
            await inner(scope, replay, send)

        return protected


def _calls_tool(body: bytes, tool: str) -> bool:
    try:
        payload = json.loads(body)
    except ValueError:
        return False
    messages = payload if isinstance(payload, list) else [payload]
    for message in messages:
        if isinstance(message, dict) and message.get("method") == "tools/call":
            params = message.get("params")
            if isinstance(params, dict) and params.get("name") == tool:
                return True
    return False


# ---- a scripted browser


async def follow_authorization(url: str, *, allow_error: bool = False) -> str:
    """GET an authorization URL as a browser would (without following the redirect); return the Location.

    Raises AuthorizationFailed when the server answers with a page instead of a redirect, or (unless `allow_error`)
    when it redirects with `error=`.
    """
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(url, allow_redirects=False) as response,
    ):
        if response.status not in (301, 302, 303, 307, 308) or "Location" not in response.headers:
            text = await response.text()
            error, _, description = text.partition(": ")
            raise AuthorizationFailed(error or f"HTTP {response.status}", description)
        location = response.headers["Location"]
    params = dict(parse_qsl(urlsplit(location).query))
    if "error" in params and not allow_error:
        raise AuthorizationFailed(params["error"], params.get("error_description", ""), location)
    return location
