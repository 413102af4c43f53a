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
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp

from mcpx.auth.oauth import endpoints
from mcpx.auth.oauth.callback import CallbackListener
from mcpx.auth.oauth.endpoints import Client, EndpointUnreachable, TokenEndpointError
from mcpx.auth.oauth.flow import AuthorizationFailed, PendingAuthorization, code_from_response, start_authorization
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
# Step-up re-authorizations allowed for one set of scopes before mcpx stops asking (SEC-14).
MAX_STEP_UPS: Final = 2


class LoginError(Exception):
    """A login could not be completed; the message says why and is safe to show."""


@dataclass
class OAuthContext:
    """What every OAuth credential shares: the token store (opened on first use: probing the keyring costs) and
    one HTTP client for OAuth endpoints."""

    state_dir: Path
    store_choice: str = "auto"
    _store: TokenStore | None = field(default=None, init=False)
    _http: aiohttp.ClientSession | None = field(default=None, init=False)

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

    def http(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(trust_env=False)
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()


@dataclass
class LoginFlow:
    pending: PendingAuthorization
    server: ServerMetadata
    client: Client
    listener: CallbackListener | None
    answer: asyncio.Future[str]
    result: asyncio.Task[None] | None = None
    # Callers of `wait_login` waiting now: they take over what `on_login` would do (see `wait_login`).
    waiters: int = 0


def _succeeded(task: asyncio.Task[None]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None


class OAuthCredential:
    def __init__(
        self, upstream: UpstreamConfig, auth: OAuthAuth | OAuthClientCredentialsAuth, context: OAuthContext
    ) -> None:
        self.name = upstream.name
        self._auth = auth
        self._context = context
        self._server_url = upstream.url
        # What the login is stored under, and what the protected resource metadata must name.
        self.resource = auth.resource or canonical_resource(upstream.url)
        # The server's own name for itself from that metadata, when it may differ (see `resource_indicator`).
        self._named_resource: str | None = None
        self._record: dict[str, Any] = {}
        self._loaded = False
        self._refreshing: asyncio.Task[bool] | None = None
        self._proactive: asyncio.Task[None] | None = None
        self._login: LoginFlow | None = None
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

    # --- CredentialProvider ------------------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Load the stored login once; get a token if a machine credential has none; refresh one that expired."""
        if not self._loaded:
            await self._load()
        tokens = self._tokens()
        if (tokens is None and self.machine) or (
            tokens is not None and self._expired(tokens) and tokens.get("refresh_token")
        ):
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
        if not tokens.get("refresh_token") and not self.machine:
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
        expires_at = tokens.get("expires_at") if tokens else None
        return {
            "logged_in": tokens is not None,
            "storage": self._context.backend,
            "storage_note": self._context.storage_note,
            "issuer": self._record.get("issuer"),
            "expires_at": expires_at,
            "expires_in": round(expires_at - time.time()) if isinstance(expires_at, (int, float)) else None,
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

    @staticmethod
    def _expired(tokens: Mapping[str, Any], margin: float = 0.0) -> bool:
        expires_at = tokens.get("expires_at")
        return isinstance(expires_at, (int, float)) and expires_at - margin <= time.time()

    async def _load(self) -> None:
        try:
            record = await (await self._context.store()).load(self.name)
        except StoreError as exc:
            raise CredentialRejected(self.name, f"cannot read the token store: {exc}") from None
        self._loaded = True
        if record is None or record.get("resource") != self.resource:
            self._record = {"resource": self.resource}
            return
        self._record = record
        self._register_secrets()
        self._schedule_proactive_refresh()

    def _register_secrets(self) -> None:
        tokens = self._tokens() or {}
        for value in (
            tokens.get("access_token"),
            tokens.get("refresh_token"),
            (self._record.get("client") or {}).get("client_secret"),
        ):
            if isinstance(value, str):
                register_secret(value)

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
        expires_in = answer.get("expires_in")
        tokens: dict[str, Any] = {
            "access_token": access,
            # Servers that do not rotate send no new refresh token: keep the one we had.
            "refresh_token": refresh if isinstance(refresh, str) else previous_refresh,
            "expires_at": time.time() + float(expires_in) if isinstance(expires_in, (int, float)) else None,
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
        server = await self._server_metadata()
        client = Client.from_record(self._record.get("client")) or self._configured_client(server)
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
                self._context.http(),
                server,
                client,
                form,
                signing_key=self._signing_key(),
                signing_algorithm=self._signing_algorithm(),
            )
        except EndpointUnreachable as exc:
            raise UpstreamUnavailable(self.name, f"token refresh failed, will retry: {exc}") from None
        except TokenEndpointError as exc:
            if exc.code == "invalid_grant" and not self.machine:
                return await self._after_invalid_grant(tokens)
            raise CredentialRejected(self.name, f"the authorization server refused the token request: {exc}") from None
        self._accept_tokens(answer, tokens.get("refresh_token"))
        # The rotated refresh token is stored before the new access token is used (TOK-5).
        await self._save()
        _log.info("OAuth token refreshed", upstream=self.name)
        self._schedule_proactive_refresh()
        return True

    async def _after_invalid_grant(self, sent: Mapping[str, Any]) -> bool:
        try:
            stored = await (await self._context.store()).load(self.name)
        except StoreError:
            stored = None
        stored_tokens = (stored or {}).get("tokens") or {}
        if stored is not None and stored_tokens.get("refresh_token") not in (None, sent.get("refresh_token")):
            self._record = stored  # another writer rotated it: adopt theirs
            self._register_secrets()
            return True
        _log.warning("the refresh token was refused; a login is needed", upstream=self.name)
        await self._forget_tokens()
        raise NeedsLogin(self.name, self.login_command())

    def _schedule_proactive_refresh(self) -> None:
        tokens = self._tokens()
        if self._proactive is not None:
            self._proactive.cancel()
            self._proactive = None
        if tokens is None or not isinstance(tokens.get("expires_at"), (int, float)):
            return
        if not tokens.get("refresh_token") and not self.machine:
            return
        lifetime = tokens["expires_at"] - float(tokens.get("obtained_at") or time.time())
        # Refresh when a fifth of the lifetime is left (at most five minutes before expiry).
        at = tokens["expires_at"] - min(300.0, max(0.5, lifetime / 5))
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
        http = self._context.http()
        try:
            if self._challenge.resource_metadata is None and not self._challenge.scope:
                self._challenge = await endpoints.probe_challenge(http, self._server_url)
            resource, server = await endpoints.discover(http, self._server_url, self.resource, self._challenge)
        except EndpointUnreachable as exc:
            raise UpstreamUnavailable(self.name, f"OAuth discovery failed: {exc}") from None
        except DiscoveryError as exc:
            raise CredentialRejected(self.name, f"OAuth discovery failed: {exc}") from None
        if self._record.get("issuer") not in (None, server.issuer):
            # Another authorization server now: nothing from the old one may be used with it (SEP-2352).
            _log.warning("the upstream's authorization server changed; registering again", upstream=self.name)
            self._record = {"resource": self.resource}
        self._record["issuer"] = server.issuer
        if self._auth.resource is None:
            self._named_resource = resource.resource if resource is not None else None
        return resource, server

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

    async def begin_login(self) -> LoginFlow:
        """Start (or join) the login flow; the flow's `pending.url` is what the user must open."""
        if self.machine:
            raise LoginError(f"upstream '{self.name}' uses client credentials and needs no login")
        if self._login is not None and not self._login.answer.done():
            return self._login
        if not self._loaded:
            await self._load()
        try:
            resource, server = await self._discover()
        except (UpstreamUnavailable, CredentialRejected) as exc:
            raise LoginError(exc.reason) from None
        listener = CallbackListener(port=self._listen_port())
        try:
            await listener.start()
        except OSError:
            listener = CallbackListener(port=0)
            await listener.start()
        try:
            client = await self._client_for_login(server, listener.redirect_uri)
            pending = start_authorization(
                server,
                client_id=client.client_id,
                redirect_uri=listener.redirect_uri,
                resource=self.resource_indicator,
                scopes=self._requested_scopes(resource),
            )
        except (DiscoveryError, EndpointUnreachable, TokenEndpointError) as exc:
            await listener.stop()
            raise LoginError(f"cannot start the login: {exc}") from None
        flow = LoginFlow(pending, server, client, listener, listener.answer)
        self._login = flow
        flow.result = asyncio.get_running_loop().create_task(self._complete(flow))
        # The outcome is read by `wait_login`; when nobody waits (the terminal went away), it is only logged.
        flow.result.add_done_callback(lambda task: task.cancelled() or task.exception())
        _log.info("login started", upstream=self.name, issuer=server.issuer)
        return flow

    def _listen_port(self) -> int:
        if isinstance(self._auth, OAuthAuth) and self._auth.redirect_port is not None:
            return self._auth.redirect_port
        port = self._record.get("redirect_port")
        return port if isinstance(port, int) else 0

    async def _client_for_login(self, server: ServerMetadata, redirect_uri: str) -> Client:
        configured = self._configured_client(server)
        if configured is not None:
            return configured
        stored = Client.from_record(self._record.get("client"))
        if stored is not None and redirect_uri in (self._record.get("redirect_uris") or []):
            return stored
        client = await endpoints.register(
            self._context.http(), server, redirect_uris=[redirect_uri], scopes=self._requested_scopes(None)
        )
        self._record["client"] = client.to_record()
        self._record["redirect_uris"] = [redirect_uri]
        self._record["redirect_port"] = int(redirect_uri.rsplit(":", 1)[1].split("/", 1)[0])
        self._register_secrets()
        await self._save()
        return client

    def current_login(self) -> LoginFlow | None:
        """The login in progress, or the last one (whose outcome `wait_login` then reports)."""
        return self._login

    def finish_login(self, pasted: str) -> None:
        """The headless path: what the user pasted (where the browser landed, or the code)."""
        flow = self._login
        if flow is None or flow.answer.done():
            raise LoginError(f"no login is in progress for '{self.name}'")
        flow.answer.set_result(pasted)

    async def wait_login(self, flow: LoginFlow, timeout: float = LOGIN_TIMEOUT) -> None:
        """Return when the login has succeeded; raise `LoginError` otherwise.

        A caller that returns from here takes over the `on_login` callbacks' job: it reconnects the upstream itself
        (the daemon's login does, and then reports the upstream's state), so the upstream is not woken twice, once
        by the login and once by the caller. A caller cancelled after the login succeeded runs them instead."""
        assert flow.result is not None
        flow.waiters += 1
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(flow.result)
        except TimeoutError:
            if _succeeded(flow.result):
                return  # it succeeded as the time ran out
            await self._end_login(flow)
            raise LoginError(f"no answer from the browser within {timeout:g} s; run the login again") from None
        except asyncio.CancelledError:
            if _succeeded(flow.result):
                self._logged_in()
            raise
        finally:
            flow.waiters -= 1

    async def _complete(self, flow: LoginFlow) -> None:
        try:
            answer = await flow.answer
            code = code_from_response(flow.pending, flow.server, answer)
            form = {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": flow.pending.redirect_uri,
                "code_verifier": flow.pending.code_verifier,
                "resource": flow.pending.resource,
            }
            try:
                tokens = await endpoints.token_request(self._context.http(), flow.server, flow.client, form)
            except (TokenEndpointError, EndpointUnreachable) as exc:
                raise LoginError(f"the code could not be redeemed: {exc}") from None
            self._accept_tokens(tokens, None)
            if "scopes" not in self._record or not isinstance(tokens.get("scope"), str):
                self._record["scopes"] = " ".join(flow.pending.scopes)
            self._record["issuer"] = flow.server.issuer
            self._record.pop("wanted_scopes", None)
            await self._save()
            self._schedule_proactive_refresh()
            _log.info("login complete", upstream=self.name)
        except AuthorizationFailed as exc:
            raise LoginError(str(exc)) from None
        finally:
            await self._end_login(flow, keep_result=True)
        if not flow.waiters:
            self._logged_in()

    def _logged_in(self) -> None:
        for callback in self.on_login:
            callback()

    async def _end_login(self, flow: LoginFlow, *, keep_result: bool = False) -> None:
        if not flow.answer.done():
            flow.answer.cancel()
        if flow.listener is not None:
            await flow.listener.stop()
        if not keep_result and flow.result is not None and not flow.result.done():
            flow.result.cancel()

    async def logout(self) -> bool:
        """Forget this upstream's tokens and registration (revoking the tokens where the server can)."""
        if not self._loaded:
            with contextlib.suppress(CredentialRejected):
                await self._load()
        tokens = self._tokens()
        client = Client.from_record(self._record.get("client"))
        if tokens is not None and client is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    server = await self._server_metadata()
                    for key, hint in (("refresh_token", "refresh_token"), ("access_token", "access_token")):
                        if isinstance(tokens.get(key), str):
                            await endpoints.revoke(self._context.http(), server, client, tokens[key], hint)
        had = bool(self._record.get("tokens") or self._record.get("client"))
        self._record = {"resource": self.resource}
        if self._proactive is not None:
            self._proactive.cancel()
        try:
            await (await self._context.store()).delete(self.name)
        except StoreError as exc:
            raise LoginError(f"could not delete the stored login: {exc}") from None
        return had
