"""An OAuth upstream's credential: the one owner of its tokens (TOK-1), and its login.

- `headers()` gives the current access token; with none, calls fail at once with `NeedsLogin`.
- After a 401, `renew()` refreshes only if the rejected token is still the current one, and every concurrent
  caller shares that one refresh (TOK-2). A rotated refresh token is stored before the new access token is
  used. `invalid_grant` re-reads the store (someone may have rotated already) before giving up; network errors
  never delete anything (TOK-5).
- A background task refreshes ahead of expiry, so agents rarely meet a 401 at all.
- `begin_login()` runs discovery and registration, starts the loopback redirect listener and returns the
  authorization URL; `finish_login()` takes what the browser landed on (or a pasted URL or code), redeems the
  code and stores the tokens. Two logins at once share one flow.
- `oauth_client_credentials` upstreams get tokens with the client credentials grant, no login needed.
Registrations and tokens are keyed by issuer and resource: a change of either discards them (SEP-2352).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver
from aiohttp.resolver import DefaultResolver

from mcpx.auth.oauth import egress, endpoints
from mcpx.auth.oauth.callback import CallbackListener
from mcpx.auth.oauth.endpoints import Client, EndpointUnreachable, TokenEndpointError
from mcpx.auth.oauth.flow import (
    DEVICE_CODE_GRANT,
    AuthorizationFailed,
    DeviceAuthorization,
    PendingAuthorization,
    code_from_response,
    device_grant_supported,
    next_device_interval,
    parse_device_authorization,
    start_authorization,
)
from mcpx.auth.oauth.metadata import (
    Challenge,
    DiscoveryError,
    ResourceMetadata,
    ServerMetadata,
    canonical_resource,
    choose_scopes,
    merge_scopes,
)
from mcpx.auth.oauth.store import StoreError, TokenStore, open_store
from mcpx.config.model import OAuthAuth, OAuthClientCredentialsAuth, UpstreamConfig
from mcpx.errors import CredentialRejected, NeedsLogin, UpstreamUnavailable
from mcpx.log import get_logger
from mcpx.redact import fingerprint, register_secret

_log = get_logger("mcpx.oauth")

LOGIN_TIMEOUT: Final = 300.0
# A browser login's state and listener live this long at most, whether or not anyone waits for it (SEC-2).
BROWSER_LOGIN_LIFETIME: Final = 600.0
DEVICE_CODE_EXPIRED: Final = "the code expired before the login was approved"
# The longest pause between device login polls after network failures (RFC 8628 §3.5: back off exponentially).
MAX_POLL_BACKOFF: Final = 60.0
# Step-up re-authorizations allowed for one set of scopes before mcpx stops asking (SEC-14).
MAX_STEP_UPS: Final = 2
# An `expires_in` beyond this is taken as this (ten years): a number too large for a date is a server's mistake.
MAX_TOKEN_LIFETIME: Final = 10 * 365 * 86400.0
# The shortest time from getting tokens to refreshing them ahead of expiry: a server that hands out tokens living a
# moment would otherwise be asked again at once, over and over (a token expired meanwhile is refreshed when used).
MIN_PROACTIVE_REFRESH: Final = 1.0


class LoginError(Exception):
    """A login could not be completed; the message says why and is safe to show."""


@dataclass
class OAuthContext:
    """What every OAuth credential shares: the token store (opened on first use: probing the keyring costs) and
    the HTTP clients for OAuth endpoints, one per upstream host (where their fetches may connect depends on it:
    see `egress`)."""

    state_dir: Path
    store_choice: str = "auto"
    # The name lookups under every OAuth fetch (a test gives its own); else aiohttp's default resolver.
    resolver: AbstractResolver | None = None
    _store: TokenStore | None = field(default=None, init=False)
    _http: dict[str, aiohttp.ClientSession] = field(default_factory=dict, init=False)
    _default_resolver: AbstractResolver | None = field(default=None, init=False)

    async def store(self) -> TokenStore:
        if self._store is None:
            self._store = await open_store(self.state_dir, self.store_choice)
        return self._store

    @property
    def backend(self) -> str | None:
        return self._store.backend if self._store is not None else None

    @property
    def storage_note(self) -> str | None:
        """Why tokens are kept where they are, when that is not what `token_store` asked for (the keyring)."""
        return self._store.note if self._store is not None else None

    def http(self, upstream_url: str) -> aiohttp.ClientSession:
        """The HTTP client of the OAuth fetches of the upstream at `upstream_url`."""
        host = egress.upstream_host(upstream_url)
        session = self._http.get(host)
        if session is None or session.closed:
            lookups = self.resolver
            if lookups is None:
                lookups = self._default_resolver = self._default_resolver or DefaultResolver()
            session = self._http[host] = egress.client_session(upstream_url, lookups)
        return session

    async def keep_only(self, upstream_urls: Iterable[str]) -> None:
        """Close the HTTP clients of hosts that no upstream at `upstream_urls` is on (a reload removed them); a host
        that is needed again later gets a new one."""
        hosts = {egress.upstream_host(url) for url in upstream_urls}
        for host in [host for host in self._http if host not in hosts]:
            await self._http.pop(host).close()

    async def close(self) -> None:
        for session in self._http.values():
            await session.close()
        self._http.clear()
        if self._default_resolver is not None:
            await self._default_resolver.close()
            self._default_resolver = None


@dataclass
class LoginFlow:
    """One login of an upstream, in progress or the last one. A browser login (`pending`, `listener`) waits for
    where the browser lands; a device login (`device`) polls the token endpoint. `answer` is what the user hands
    over (the redirect, or a pasted code); it is done once the flow no longer waits for the user, and an error set
    on it ends the flow with that error (see `_abort`)."""

    server: ServerMetadata
    client: Client
    answer: asyncio.Future[str]
    pending: PendingAuthorization | None = None
    listener: CallbackListener | None = None
    device: DeviceAuthorization | None = None
    # The client was registered for this login (it replaces the stored registration if the login succeeds).
    registered: bool = False
    result: asyncio.Task[None] | None = None
    # Callers of `wait_login` waiting now: they take over what `on_login` would do (see `wait_login`).
    waiters: int = 0
    # Why the flow was ended early (replaced by another login, a waiter's timeout), for its other waiters.
    ended: str | None = None
    started_at: float = field(default_factory=time.monotonic)

    @property
    def kind(self) -> str:
        return "device" if self.device is not None else "browser"

    @property
    def expires_at(self) -> float:
        """When the flow expires (`time.monotonic()`): a device login's code, or a browser login's state."""
        lifetime = self.device.expires_in if self.device is not None else BROWSER_LOGIN_LIFETIME
        return self.started_at + lifetime

    @property
    def offers_device_grant(self) -> bool:
        """Whether the authorization server offers the device grant (so `mcpxctl` can suggest it)."""
        return device_grant_supported(self.server)


def _succeeded(task: asyncio.Task[None]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None


def _finite(value: object) -> float | None:
    """`value` as a float, if it is a finite number (a boolean is not one; an integer too large for a float is not
    finite)."""
    if type(value) is not int and type(value) is not float:
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def token_lifetime(expires_in: object) -> float | None:
    """The seconds a token lives, from a token response's `expires_in` (RFC 6749 §5.1: a positive number); None when
    it is anything else (absent, zero, negative, not finite, a string, a boolean): the token's expiry is unknown."""
    seconds = _finite(expires_in)
    return min(seconds, MAX_TOKEN_LIFETIME) if seconds is not None and seconds > 0 else None


class OAuthCredential:
    def __init__(
        self, upstream: UpstreamConfig, auth: OAuthAuth | OAuthClientCredentialsAuth, context: OAuthContext
    ) -> None:
        self.name = upstream.name
        self._auth = auth
        self._context = context
        self._server_url = upstream.http_url
        # What the login is stored under, and what the protected resource metadata must name.
        self.resource = auth.resource or canonical_resource(upstream.http_url)
        # The server's own name for itself from that metadata, when it may differ (see `resource_indicator`).
        self._named_resource: str | None = None
        self._record: dict[str, Any] = {}
        self._loaded = False
        self._refreshing: asyncio.Task[bool] | None = None
        self._proactive: asyncio.Task[None] | None = None
        self._login: LoginFlow | None = None
        self._login_lock = asyncio.Lock()
        # Moved on by every logout and login: a refresh that began before one drops what it got (it belongs to
        # the grant the user ended or replaced).
        self._grant = 0
        self._challenge = Challenge()
        self._step_ups: dict[tuple[str, ...], int] = {}
        # Run after a successful login that nobody waits for (the supervisor reconnects); see `wait_login`.
        self.on_login: list[Callable[[], None]] = []

    @property
    def logged_in(self) -> bool:
        return self._tokens() is not None

    @property
    def machine(self) -> bool:
        return isinstance(self._auth, OAuthClientCredentialsAuth)

    @property
    def resource_indicator(self) -> str:
        """The RFC 8707 `resource` of authorization and token requests: the configured `resource`, else the
        `resource` of the server's protected resource metadata (checked to name this server or, at the root
        well-known URL, its origin), else the canonical URI of the server."""
        return self._named_resource or self.resource

    def login_command(self) -> str:
        return f"mcpxctl login {self.name}"

    def _http(self) -> aiohttp.ClientSession:
        return self._context.http(self._server_url)

    # --- CredentialProvider ------------------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Load the stored login once; get a token if a machine credential has none; refresh one that expired."""
        if not self._loaded:
            await self._load()
        tokens = self._tokens()
        if (tokens is None or self._expired(tokens)) and self._refreshable(tokens):
            await self._single_flight_refresh()

    def headers(self) -> dict[str, str]:
        tokens = self._tokens()
        if tokens is None:
            raise NeedsLogin(self.name, self.login_command())
        return {"Authorization": f"Bearer {tokens['access_token']}"}

    async def renew(self, rejected: Mapping[str, str], challenge: Challenge) -> bool:
        """After a 401: True when a retry with the (new) current token is worth making."""
        self._challenge = challenge
        tokens = self._tokens()
        if tokens is None:
            raise NeedsLogin(self.name, self.login_command())
        if rejected.get("Authorization") != f"Bearer {tokens['access_token']}":
            return True  # someone else refreshed already: just retry with the current token
        if not self._refreshable(tokens):
            await self._forget_tokens()
            raise NeedsLogin(self.name, self.login_command())
        return await self._single_flight_refresh()

    def insufficient_scope(self, challenge: Challenge) -> NeedsLogin | CredentialRejected:
        """A 403 `insufficient_scope`: remember the scopes needed, and say what gets them (SEC-14, bounded)."""
        self._challenge = challenge
        granted = tuple(str(self._record.get("scopes", "")).split())
        wanted = merge_scopes(granted, challenge.scope)
        self._record["wanted_scopes"] = " ".join(wanted)
        attempts = self._step_ups.get(wanted, 0)
        if attempts >= MAX_STEP_UPS:
            return CredentialRejected(
                self.name, f"still not permitted after {attempts} re-authorizations (scopes {' '.join(wanted)})"
            )
        self._step_ups[wanted] = attempts + 1
        return NeedsLogin(self.name, self.login_command())

    def fix_hint(self) -> str:
        return f"log in again with `{self.login_command()}`"

    def describe(self) -> str:
        tokens = self._tokens()
        return f"oauth ({fingerprint(tokens['access_token']) if tokens else 'not logged in'})"

    def status(self) -> dict[str, Any]:
        tokens = self._tokens()
        expires_at = _finite(tokens.get("expires_at")) if tokens else None
        return {
            "logged_in": tokens is not None,
            "storage": self._context.backend,
            "storage_note": self._context.storage_note,
            "issuer": self._record.get("issuer"),
            "expires_at": expires_at,
            "expires_in": round(expires_at - time.time()) if expires_at is not None else None,
            "scopes": self._record.get("scopes") or None,
        }

    async def close(self) -> None:
        for task in (self._proactive, self._refreshing):
            if task is not None:
                task.cancel()
        if self._login is not None:
            await self._end_login(self._login)

    # --- tokens ------------------------------------------------------------------------------------------------

    def _tokens(self) -> dict[str, Any] | None:
        tokens = self._record.get("tokens")
        if isinstance(tokens, dict) and isinstance(tokens.get("access_token"), str):
            return tokens
        return None

    def _refreshable(self, tokens: Mapping[str, Any] | None) -> bool:
        """Whether new tokens can be had without the user: always for a machine credential (the client credentials
        grant), else with a refresh token."""
        refresh = tokens.get("refresh_token") if tokens is not None else None
        return self.machine or (isinstance(refresh, str) and bool(refresh))

    @staticmethod
    def _expired(tokens: Mapping[str, Any], margin: float = 0.0) -> bool:
        expires_at = _finite(tokens.get("expires_at"))
        return expires_at is not None and expires_at - margin <= time.time()

    async def _load(self) -> None:
        try:
            record = await (await self._context.store()).load(self.name)
        except StoreError as exc:
            raise CredentialRejected(self.name, f"cannot read the token store: {exc}") from None
        self._loaded = True
        if not self._adopt_record(record):
            self._record = {"resource": self.resource}

    def _adopt_record(self, record: dict[str, Any] | None) -> bool:
        """Make a stored record this credential's, if it is for this resource (SEP-2352): its secrets registered
        for redaction, its proactive refresh scheduled. False: not adopted, nothing changed."""
        if record is None or record.get("resource") != self.resource:
            return False
        self._record = record
        self._register_secrets()
        self._schedule_proactive_refresh()
        return True

    def _register_secrets(self) -> None:
        # Each rotates with refreshes and logins: a slot per kind keeps the registry from growing.
        tokens = self._tokens() or {}
        for kind, value in (
            ("access", tokens.get("access_token")),
            ("refresh", tokens.get("refresh_token")),
            ("client", (self._record.get("client") or {}).get("client_secret")),
        ):
            if isinstance(value, str):
                register_secret(value, slot=f"oauth:{self.name}:{kind}")

    async def _save(self) -> None:
        try:
            await (await self._context.store()).save(self.name, self._record)
        except StoreError as exc:
            _log.error("could not store OAuth tokens", upstream=self.name, error=str(exc))

    async def _forget_tokens(self) -> None:
        self._record.pop("tokens", None)
        await self._save()

    def _accept_tokens(self, answer: Mapping[str, Any], previous_refresh: str | None) -> None:
        access = str(answer["access_token"])
        refresh = answer.get("refresh_token")
        lifetime = token_lifetime(answer.get("expires_in"))
        tokens: dict[str, Any] = {
            "access_token": access,
            # Servers that do not rotate send no new refresh token: keep the one we had.
            "refresh_token": refresh if isinstance(refresh, str) else previous_refresh,
            "expires_at": time.time() + lifetime if lifetime is not None else None,
            "obtained_at": time.time(),
        }
        self._record["tokens"] = tokens
        if isinstance(answer.get("scope"), str):
            self._record["scopes"] = answer["scope"]
        self._register_secrets()

    async def _single_flight_refresh(self) -> bool:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
        return await asyncio.shield(self._refreshing)

    async def _refresh(self) -> bool:
        grant = self._grant
        server = await self._server_metadata()
        client = self._client(server)
        if client is None:
            raise NeedsLogin(self.name, self.login_command())
        tokens = self._tokens() or {}
        if self.machine:
            form = {"grant_type": "client_credentials", "resource": self.resource_indicator}
            scopes = self._requested_scopes(None)
            if scopes:
                form["scope"] = " ".join(scopes)
        else:
            refresh = tokens.get("refresh_token")
            if not isinstance(refresh, str):
                raise NeedsLogin(self.name, self.login_command())
            form = {"grant_type": "refresh_token", "refresh_token": refresh, "resource": self.resource_indicator}
        try:
            answer = await endpoints.token_request(
                self._http(),
                server,
                client,
                form,
                signing_key=self._signing_key(),
                signing_algorithm=self._signing_algorithm(),
            )
        except EndpointUnreachable as exc:
            raise UpstreamUnavailable(self.name, f"token refresh failed, will retry: {exc}") from None
        except TokenEndpointError as exc:
            if grant != self._grant:
                return self._overtaken(tokens)
            if exc.code == "invalid_grant" and not self.machine:
                return await self._after_invalid_grant(tokens)
            raise CredentialRejected(self.name, f"the authorization server refused the token request: {exc}") from None
        if grant != self._grant:
            # A logout or a new login came while the refresh was under way: its tokens belong to the grant that
            # was ended or replaced, and must neither come back into use nor be stored again.
            _log.info("a refresh that a logout or login overtook was dropped", upstream=self.name)
            return self._overtaken(tokens)
        self._accept_tokens(answer, tokens.get("refresh_token"))
        # The rotated refresh token is stored before the new access token is used (TOK-5).
        await self._save()
        _log.info("OAuth token refreshed", upstream=self.name)
        self._schedule_proactive_refresh()
        return True

    def _overtaken(self, refreshed: Mapping[str, Any]) -> bool:
        """What a refresh that a logout or a login overtook tells its callers: a retry is worth making only with
        the tokens of a login made since (a logout under way still holds the old ones)."""
        tokens = self._tokens()
        return tokens is not None and tokens is not refreshed

    async def _after_invalid_grant(self, sent: Mapping[str, Any]) -> bool:
        try:
            stored = await (await self._context.store()).load(self.name)
        except StoreError:
            stored = None
        stored_tokens = (stored or {}).get("tokens") or {}
        # Another writer rotated it (or logged in again): adopt theirs.
        if stored_tokens.get("refresh_token") not in (None, sent.get("refresh_token")) and self._adopt_record(stored):
            return True
        _log.warning("the refresh token was refused; a login is needed", upstream=self.name)
        await self._forget_tokens()
        raise NeedsLogin(self.name, self.login_command())

    def _schedule_proactive_refresh(self) -> None:
        tokens = self._tokens()
        if self._proactive is not None:
            self._proactive.cancel()
            self._proactive = None
        expires_at = _finite(tokens.get("expires_at")) if tokens is not None else None
        if tokens is None or expires_at is None or not self._refreshable(tokens):
            return
        obtained_at = _finite(tokens.get("obtained_at")) or time.time()
        lifetime = expires_at - obtained_at
        # Refresh when a fifth of the lifetime is left (at most five minutes before expiry), not too soon.
        at = max(expires_at - min(300.0, max(0.5, lifetime / 5)), obtained_at + MIN_PROACTIVE_REFRESH)
        self._proactive = asyncio.get_running_loop().create_task(self._refresh_at(at))

    async def _refresh_at(self, when: float) -> None:
        await asyncio.sleep(max(0.0, when - time.time()))
        current = self._proactive
        try:
            await self._single_flight_refresh()
        except (NeedsLogin, CredentialRejected, UpstreamUnavailable, DiscoveryError) as exc:
            _log.warning("proactive token refresh failed", upstream=self.name, error=str(exc))
        if self._proactive is current:
            self._proactive = None

    # --- discovery and registration --------------------------------------------------------------------------

    async def _server_metadata(self) -> ServerMetadata:
        return (await self._discover())[1]

    async def _discover(self) -> tuple[ResourceMetadata | None, ServerMetadata]:
        http = self._http()
        try:
            if self._challenge.resource_metadata is None and not self._challenge.scope:
                self._challenge = await endpoints.probe_challenge(http, self._server_url)
            resource, server = await endpoints.discover(http, self._server_url, self.resource, self._challenge)
        except EndpointUnreachable as exc:
            raise UpstreamUnavailable(self.name, f"OAuth discovery failed: {exc}") from None
        except DiscoveryError as exc:
            raise CredentialRejected(self.name, f"OAuth discovery failed: {exc}") from None
        known = self._record.get("issuer")
        if known not in (None, server.issuer):
            if resource is None:
                # No protected resource metadata this time (a 4xx while the server redeploys, a WAF's refusal): the
                # origin taken for the authorization server then is no evidence that it changed, and the login
                # must not be thrown away on such doubt (TOK-5).
                raise UpstreamUnavailable(
                    self.name, f"OAuth discovery found no resource metadata naming {known} now; will retry"
                )
            # Another authorization server now: nothing from the old one may be used with it (SEP-2352).
            _log.warning("the upstream's authorization server changed; registering again", upstream=self.name)
            self._record = {"resource": self.resource}
        self._record["issuer"] = server.issuer
        if self._auth.resource is None:
            self._named_resource = resource.resource if resource is not None else None
        return resource, server

    def _client(self, server: ServerMetadata, usable: Callable[[Client], bool] = lambda _: True) -> Client | None:
        """The client of every request to the authorization server (logins, refreshes, revocation): the configured
        one, used as is (the server says what it may do); else the stored registration, if `usable` for what is
        asked of it. None: there is none (a login registers one)."""
        configured = self._configured_client(server)
        if configured is not None:
            return configured
        stored = Client.from_record(self._record.get("client"))
        return stored if stored is not None and usable(stored) else None

    def _configured_client(self, server: ServerMetadata) -> Client | None:
        auth = self._auth
        secret = auth.client_secret
        if auth.client_secret_env is not None:
            secret = os.environ.get(auth.client_secret_env) or None
            if secret is None:
                raise CredentialRejected(self.name, f"environment variable {auth.client_secret_env} is not set")
        if secret is not None:
            register_secret(secret)
        if isinstance(auth, OAuthClientCredentialsAuth) and auth.private_key_file is not None:
            assert auth.client_id is not None
            return Client(auth.client_id, None, "private_key_jwt")
        if auth.client_id is not None:
            return Client(auth.client_id, secret, endpoints.auth_method_for(server, secret))
        if isinstance(auth, OAuthAuth) and auth.client_metadata_url is not None and server.client_id_metadata_documents:
            return Client(auth.client_metadata_url)
        return None

    def _signing_key(self) -> Any:
        auth = self._auth
        if isinstance(auth, OAuthClientCredentialsAuth) and auth.private_key_file is not None:
            try:
                return Path(auth.private_key_file).read_bytes()
            except OSError as exc:
                raise CredentialRejected(self.name, f"cannot read {auth.private_key_file}: {exc.strerror}") from None
        return None

    def _signing_algorithm(self) -> str:
        return self._auth.private_key_algorithm if isinstance(self._auth, OAuthClientCredentialsAuth) else "RS256"

    def _requested_scopes(self, resource: ResourceMetadata | None) -> tuple[str, ...]:
        chosen = choose_scopes(self._challenge, resource, self._auth.scopes)
        wanted = tuple(str(self._record.get("wanted_scopes", "")).split())
        return merge_scopes(chosen, wanted)

    # --- login -------------------------------------------------------------------------------------------------

    async def begin_login(self, *, device: bool = False) -> LoginFlow:
        """Start (or join) a login: a browser login (the flow's `pending.url` is what the user must open), or with
        `device` one by the device authorization grant (RFC 8628: the flow's `device` says which address to open
        on any device and which code to enter there; the daemon polls for the outcome).

        One flow per upstream: a login of the same kind started while one is pending joins it; one of the other
        kind ends the pending one (its waiters hear why) and takes its place."""
        if self.machine:
            raise LoginError(f"upstream '{self.name}' uses client credentials and needs no login")
        async with self._login_lock:
            current = self._login
            if current is not None and not current.answer.done():
                if (current.device is not None) == device:
                    return current
                self._abort(current, f"replaced by a {'device' if device else 'browser'} login started since")
            try:
                if not self._loaded:
                    await self._load()
                flow = await (self._start_device() if device else self._start_browser())
            except (UpstreamUnavailable, CredentialRejected) as exc:
                raise LoginError(exc.reason) from None
            self._login = flow
            complete = self._poll_device(flow) if device else self._complete(flow)
            flow.result = asyncio.get_running_loop().create_task(complete)
            # The outcome is read by `wait_login`; when nobody waits (the terminal went away), it is dropped.
            flow.result.add_done_callback(lambda task: task.cancelled() or task.exception())
            _log.info("login started", upstream=self.name, issuer=flow.server.issuer, kind=flow.kind)
            return flow

    async def _start_browser(self) -> LoginFlow:
        resource, server = await self._discover()
        listener = CallbackListener(port=self._listen_port())
        try:
            await listener.start()
        except OSError:
            listener = CallbackListener(port=0)
            await listener.start()
        try:
            client, registered = await self._client_for_login(server, listener.redirect_uri)
            pending = start_authorization(
                server,
                client_id=client.client_id,
                redirect_uri=listener.redirect_uri,
                resource=self.resource_indicator,
                scopes=self._requested_scopes(resource),
            )
            listener.state = pending.state
        except (DiscoveryError, EndpointUnreachable, TokenEndpointError) as exc:
            await listener.stop()
            raise LoginError(f"cannot start the login: {exc}") from None
        except BaseException:
            await listener.stop()
            raise
        return LoginFlow(server, client, listener.answer, pending=pending, listener=listener, registered=registered)

    async def _start_device(self) -> LoginFlow:
        """Ask the authorization server for a device code (with the RFC 8707 resource and the scopes) and check
        its answer; the client is the configured one, else a registration that includes the device grant."""
        resource, server = await self._discover()
        if not device_grant_supported(server):
            raise LoginError(
                f"the authorization server {server.issuer} does not offer the device authorization grant; log in "
                f"with a browser: `{self.login_command()}` (add --no-browser to paste where the browser lands)"
            )
        scopes = self._requested_scopes(resource)
        form = {"resource": self.resource_indicator}
        if scopes:
            form["scope"] = " ".join(scopes)
        try:
            client, registered = await self._client_for_device(server)
            answer = await endpoints.device_authorization(self._http(), server, client, form)
            device = parse_device_authorization(
                answer, issuer=server.issuer, client_id=client.client_id, resource=form["resource"], scopes=scopes
            )
        except TokenEndpointError as exc:
            raise LoginError(f"the authorization server refused to start a device login: {exc}") from None
        except (DiscoveryError, EndpointUnreachable) as exc:
            raise LoginError(f"cannot start the device login: {exc}") from None
        register_secret(device.device_code, slot=f"oauth:{self.name}:device")
        return LoginFlow(
            server, client, asyncio.get_running_loop().create_future(), device=device, registered=registered
        )

    async def _client_for_device(self, server: ServerMetadata) -> tuple[Client, bool]:
        """The client of a device login, and whether it was registered just now (see `_adopt_client`)."""
        existing = self._client(server, lambda stored: DEVICE_CODE_GRANT in stored.grant_types)
        if existing is not None:
            return existing, False
        client = await endpoints.register(
            self._http(),
            server,
            redirect_uris=[],
            scopes=self._requested_scopes(None),
            grant_types=(DEVICE_CODE_GRANT, "refresh_token"),
        )
        if DEVICE_CODE_GRANT not in client.grant_types:
            raise LoginError(
                "the authorization server registered mcpx without the device grant; log in with a browser "
                f"(`{self.login_command()}`), or configure a client_id that may use it"
            )
        if client.client_secret is not None:
            register_secret(client.client_secret, slot=f"oauth:{self.name}:registered")
        return client, True

    def _listen_port(self) -> int:
        """Where a browser login's redirect listener listens: the configured port, else the port of the stored
        registration's redirect URI (so that the registration is used again), else any free port."""
        if isinstance(self._auth, OAuthAuth) and self._auth.redirect_port is not None:
            return self._auth.redirect_port
        uris = self._record.get("redirect_uris")
        for uri in uris if isinstance(uris, list) else []:
            with contextlib.suppress(ValueError):  # a port that is not a number, or out of range
                port = urlsplit(uri).port if isinstance(uri, str) else None
                if port:
                    return port
        return 0

    async def _client_for_login(self, server: ServerMetadata, redirect_uri: str) -> tuple[Client, bool]:
        """The client of a browser login, and whether it was registered just now (see `_adopt_client`)."""
        existing = self._client(server, lambda _: redirect_uri in (self._record.get("redirect_uris") or []))
        if existing is not None:
            return existing, False
        client = await endpoints.register(
            self._http(), server, redirect_uris=[redirect_uri], scopes=self._requested_scopes(None)
        )
        if client.client_secret is not None:
            register_secret(client.client_secret, slot=f"oauth:{self.name}:registered")
        return client, True

    def _adopt_client(self, flow: LoginFlow) -> None:
        """A registration made for a login replaces the stored one when that login succeeds, not before: the
        stored tokens belong to the stored client, and a login abandoned half-way must not leave them orphaned
        (their refresh would fail and the login be lost)."""
        if not flow.registered:
            return
        self._record["client"] = flow.client.to_record()
        self._record["redirect_uris"] = [flow.pending.redirect_uri] if flow.pending is not None else []
        self._record.pop("redirect_port", None)  # kept beside the URI by earlier versions

    def current_login(self) -> LoginFlow | None:
        """The login in progress, or the last one (whose outcome `wait_login` then reports)."""
        return self._login

    def finish_login(self, pasted: str) -> None:
        """The headless path: what the user pasted (where the browser landed, or the code)."""
        flow = self._login
        if flow is None or flow.answer.done():
            raise LoginError(f"no login is in progress for '{self.name}'")
        if flow.device is not None:
            raise LoginError(
                f"the login in progress for '{self.name}' is a device login: enter the code "
                f"{flow.device.user_code} at {flow.device.verification_uri}; there is nothing to paste"
            )
        flow.answer.set_result(pasted)

    async def wait_login(self, flow: LoginFlow, timeout: float | None = None) -> None:
        """Return when the login has succeeded; raise `LoginError` otherwise, at the latest after `timeout` seconds
        (which then ends the flow). Without one: LOGIN_TIMEOUT for a browser login, the code's lifetime for a
        device login (whose polling ends then anyway, saying the code expired).

        A caller that returns from here takes over the `on_login` callbacks' job: it reconnects the upstream itself
        (the daemon's login does, and then reports the upstream's state), so the upstream is not woken twice, once
        by the login and once by the caller. A caller cancelled after the login succeeded runs them instead."""
        assert flow.result is not None
        if timeout is None:
            # A moment past the code's expiry, so that the poller's own "expired" is what the user reads.
            timeout = LOGIN_TIMEOUT if flow.device is None else flow.expires_at - time.monotonic() + 1.0
        flow.waiters += 1
        try:
            async with asyncio.timeout(timeout):
                await asyncio.wait({flow.result})
        except TimeoutError:
            if _succeeded(flow.result):
                return  # it succeeded as the time ran out
            what = "the device login was not approved" if flow.device is not None else "no answer from the browser"
            reason = f"{what} within {timeout:g} s; run the login again"
            self._abort(flow, reason)
            await self._end_login(flow)
            raise LoginError(reason) from None
        except asyncio.CancelledError:
            if _succeeded(flow.result):
                self._logged_in()
            raise
        finally:
            flow.waiters -= 1
        if flow.result.cancelled():
            raise LoginError(flow.ended or "the login was ended before it completed; run it again")
        error = flow.result.exception()
        if error is not None:
            raise error

    async def _complete(self, flow: LoginFlow) -> None:
        assert flow.pending is not None
        try:
            try:
                async with asyncio.timeout(flow.expires_at - time.monotonic()):
                    answer = await flow.answer
            except TimeoutError:
                minutes = BROWSER_LOGIN_LIFETIME / 60
                raise LoginError(f"the login expired: no answer from the browser within {minutes:g} minutes") from None
            code = code_from_response(flow.pending, flow.server, answer)
            form = {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": flow.pending.redirect_uri,
                "code_verifier": flow.pending.code_verifier,
                "resource": flow.pending.resource,
            }
            try:
                tokens = await endpoints.token_request(self._http(), flow.server, flow.client, form)
            except (TokenEndpointError, EndpointUnreachable) as exc:
                raise LoginError(f"the code could not be redeemed: {exc}") from None
            await self._store_login(flow, tokens, flow.pending.scopes)
        except AuthorizationFailed as exc:
            raise LoginError(str(exc)) from None
        finally:
            await self._end_login(flow, keep_result=True)
        if not flow.waiters:
            self._logged_in()

    async def _poll_device(self, flow: LoginFlow) -> None:
        """Poll the token endpoint for the outcome of a device login (RFC 8628 §3.4-3.5): every `interval`
        seconds, 5 s more after each `slow_down`, twice as long after a network failure; until the code expires,
        the user denies, or a waiter's login timeout ends the flow."""
        device = flow.device
        assert device is not None
        interval = device.interval
        form = {"grant_type": DEVICE_CODE_GRANT, "device_code": device.device_code, "resource": device.resource}
        try:
            while True:
                await self._pause(flow, min(interval, flow.expires_at - time.monotonic()))
                if time.monotonic() >= flow.expires_at:
                    raise LoginError(f"{DEVICE_CODE_EXPIRED}; run the login again")
                try:
                    tokens = await endpoints.token_request(self._http(), flow.server, flow.client, form)
                except EndpointUnreachable as exc:
                    interval = min(interval * 2, MAX_POLL_BACKOFF)
                    _log.warning("a device login poll failed; polling more slowly", upstream=self.name, error=str(exc))
                    continue
                except TokenEndpointError as exc:
                    interval = next_device_interval(exc.code, exc.description, interval)
                    continue
                break
            await self._store_login(flow, tokens, device.scopes)
        except AuthorizationFailed as exc:
            raise LoginError(f"{exc}; run the login again") from None
        finally:
            await self._end_login(flow, keep_result=True)
        if not flow.waiters:
            self._logged_in()

    @staticmethod
    async def _pause(flow: LoginFlow, seconds: float) -> None:
        """Wait `seconds`, or less if the flow is ended meanwhile (then raise why)."""
        if seconds > 0 and not flow.answer.done():
            await asyncio.wait({flow.answer}, timeout=seconds)
        if flow.answer.done():
            if flow.answer.cancelled():
                raise LoginError(flow.ended or "the login was ended before it completed; run it again")
            error = flow.answer.exception()
            raise error if error is not None else LoginError("the login was ended before it completed")

    async def _store_login(self, flow: LoginFlow, tokens: Mapping[str, Any], scopes: tuple[str, ...]) -> None:
        self._grant += 1
        self._adopt_client(flow)
        self._accept_tokens(tokens, None)
        if "scopes" not in self._record or not isinstance(tokens.get("scope"), str):
            self._record["scopes"] = " ".join(scopes)
        self._record["issuer"] = flow.server.issuer
        self._record.pop("wanted_scopes", None)
        await self._save()
        self._schedule_proactive_refresh()
        _log.info("login complete", upstream=self.name, kind=flow.kind)

    def _logged_in(self) -> None:
        for callback in self.on_login:
            callback()

    @staticmethod
    def _abort(flow: LoginFlow, reason: str) -> None:
        """End a pending flow with `reason`: its completion task fails with it, and so its waiters."""
        flow.ended = reason
        if not flow.answer.done():
            flow.answer.set_exception(LoginError(reason))
            flow.answer.exception()  # retrieved here: the flow's task may be cancelled before it looks

    async def _end_login(self, flow: LoginFlow, *, keep_result: bool = False) -> None:
        if not flow.answer.done():
            flow.answer.cancel()
        if flow.listener is not None:
            await flow.listener.stop()
        if not keep_result and flow.result is not None and not flow.result.done():
            flow.result.cancel()
            await asyncio.wait({flow.result})  # ended when this returns: no poll or redemption after it

    async def _revoke(self, tokens: Mapping[str, Any]) -> None:
        """Revoke the refresh token, then the access token, where the server can (RFC 7009): best effort, within
        five seconds; nothing is known or kept about the outcome."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                server = await self._server_metadata()
                client = self._client(server)
                for hint in ("refresh_token", "access_token"):
                    if client is not None and isinstance(tokens.get(hint), str):
                        await endpoints.revoke(
                            self._http(),
                            server,
                            client,
                            tokens[hint],
                            hint,
                            signing_key=self._signing_key(),
                            signing_algorithm=self._signing_algorithm(),
                        )

    async def logout(self) -> bool:
        """Forget this upstream's tokens and registration (revoking the tokens where the server can)."""
        if not self._loaded:
            with contextlib.suppress(CredentialRejected):
                await self._load()
        self._grant += 1
        refreshing = self._refreshing
        if refreshing is not None and not refreshing.done():
            # Its answer is dropped (see `_grant`); waiting for it means no store write of its can land after
            # the delete below (bounded by the token endpoint's and the store's own timeouts).
            await asyncio.wait({refreshing})
        tokens = self._tokens()
        if tokens is not None:
            await self._revoke(tokens)
        had = bool(self._record.get("tokens") or self._record.get("client"))
        self._record = {"resource": self.resource}
        if self._proactive is not None:
            self._proactive.cancel()
            self._proactive = None
        try:
            await (await self._context.store()).delete(self.name)
        except StoreError as exc:
            raise LoginError(f"could not delete the stored login: {exc}") from None
        return had
