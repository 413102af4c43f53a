"""Keeps one upstream connected: connect, list its tools and prompts, watch for failure, reconnect with capped
backoff.

A `ManagedUpstream` is what the router talks to. Calls made while the upstream is down fail at once with an
error naming it and why; nothing waits for a reconnect, but for one case: a session that died on its own (a stdio
server's process exited) is reconnected at once, and calls wait (bounded) for that one attempt. A session lost
before it had been up for `reconnect_max` seconds is reconnected only after the backoff delay, so a server that
keeps crashing is restarted ever more slowly. The last known lists are kept while it is down, so agents do not
see tools flicker; fresh lists replace them when the upstream comes back (agents are told only when they
changed), and a `notifications/{tools,prompts}/list_changed` from the upstream refreshes the list it names.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from mcpx.auth.credentials import CredentialProvider, credentials_for
from mcpx.auth.oauth.credential import OAuthContext, OAuthCredential
from mcpx.config.model import DaemonConfig, UpstreamConfig
from mcpx.errors import (
    CredentialRejected,
    McpxError,
    NeedsLogin,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamUnavailable,
)
from mcpx.jsonrpc import Message
from mcpx.log import get_logger
from mcpx.upstream.h1 import HttpClient
from mcpx.upstream.peer import ClientSide, Settled, UpstreamSession, first_of
from mcpx.upstream.transports import open_session

_log = get_logger("mcpx.upstream")

# A hostile or broken upstream must not make mcpx page forever.
_MAX_LIST_PAGES = 100

# What mcpx aggregates, by the attribute that holds it; each from upstreams that announce the capability.
TOOLS: Final = "tools"
PROMPTS: Final = "prompts"
RESOURCES: Final = "resources"
TEMPLATES: Final = "templates"


@dataclass(frozen=True)
class _ListKind:
    capability: str
    method: str
    key: str  # the result's array
    identity: str  # the field every entry must have as a non-empty string


LISTS: Final = {
    TOOLS: _ListKind("tools", "tools/list", "tools", "name"),
    PROMPTS: _ListKind("prompts", "prompts/list", "prompts", "name"),
    RESOURCES: _ListKind("resources", "resources/list", "resources", "uri"),
    TEMPLATES: _ListKind("resources", "resources/templates/list", "resourceTemplates", "uriTemplate"),
}
# An upstream's list_changed notification → the lists it makes stale.
_STALE_AFTER: Final = {
    "notifications/tools/list_changed": (TOOLS,),
    "notifications/prompts/list_changed": (PROMPTS,),
    "notifications/resources/list_changed": (RESOURCES, TEMPLATES),
}


class UpstreamHooks(Protocol):
    """What an upstream tells its owner (the router)."""

    def lists_changed(self) -> None:
        """One of the upstream's lists changed."""
        ...

    def connected(self, upstream: str) -> None:
        """The upstream has a (new) session: what lived in the old one (resource subscriptions) must be renewed."""
        ...

    def server_notification(self, upstream: str, message: Message) -> None:
        """A notification that belongs to no agent's call (other than list_changed, handled here)."""
        ...

    async def server_request(
        self, upstream: str, method: str, params: dict[str, Any] | None, timeout: float
    ) -> dict[str, Any]:
        """A request to the client that belongs to no agent's call: `{"result": …}` or `{"error": …}`."""
        ...


class UpstreamState(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    DOWN = "down"
    AUTH_FAILED = "auth_failed"
    NEEDS_LOGIN = "needs_login"
    STOPPED = "stopped"


class _InFlight:
    """The requests in flight on one upstream's session, so that a reload that replaced it closes the session only
    once they have ended (they finish on the session they started on)."""

    __slots__ = ("_count", "_none")

    def __init__(self) -> None:
        self._count = 0
        self._none = asyncio.Event()
        self._none.set()

    def started(self) -> None:
        self._count += 1
        self._none.clear()

    def ended(self) -> None:
        self._count -= 1
        if not self._count:
            self._none.set()

    @property
    def none(self) -> bool:
        return not self._count

    async def ended_all(self, timeout: float) -> None:
        """Return once none is in flight, or after `timeout` seconds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._none.wait()


class ManagedUpstream:
    """One configured upstream, its session, its state and its last known tools."""

    def __init__(
        self,
        config: UpstreamConfig,
        daemon: DaemonConfig,
        http: HttpClient,
        oauth: OAuthContext,
        hooks: UpstreamHooks,
    ) -> None:
        self.config = config
        self.name = config.name
        self.daemon = daemon
        self._http = http
        self._hooks = hooks
        self.credentials: CredentialProvider = credentials_for(config, oauth)
        if isinstance(self.credentials, OAuthCredential):
            self.credentials.on_login.append(self.wake)
        self.session: UpstreamSession = self.open_session(self, on_lost=self._lost, on_renewed=self._renewed)
        self.state = UpstreamState.STARTING
        self.last_error: str | None = None
        self.retry_at: float | None = None
        self.tools: tuple[dict[str, Any], ...] = ()
        self.prompts: tuple[dict[str, Any], ...] = ()
        self.resources: tuple[dict[str, Any], ...] = ()
        self.templates: tuple[dict[str, Any], ...] = ()
        self._broken = asyncio.Event()
        self._wake = asyncio.Event()
        self._attempts_started = 0
        self._attempts_ended = 0
        self._attempt_changed = asyncio.Condition()
        # What the credential looked like when the upstream rejected it (a fingerprint, never the secret).
        self._rejected_credential: str | None = None
        # Set once the first connection attempt has ended, however it ended.
        self.first_attempt_done = asyncio.Event()
        # When the session last became ready, and the attempt that replaces a session that died on its own (calls
        # wait for it).
        self._ready_at = 0.0
        self._recovery_attempt: int | None = None
        self._reconnect_at_once = False
        self._keeper: asyncio.Task[None] | None = None
        self._refresh: asyncio.Task[None] | None = None
        self._stale: set[str] = set()
        self._login_needed: NeedsLogin | None = None
        self._in_flight = _InFlight()

    def open_session(
        self, client: ClientSide, *, on_lost: Callable[[str], None], on_renewed: Callable[[], None] | None = None
    ) -> UpstreamSession:
        """A new session with this upstream, with its credentials (for the shared one, and per-agent ones)."""
        return open_session(
            self.config,
            http=self._http,
            credentials=self.credentials,
            max_message_bytes=self.daemon.max_message_bytes,
            connect_timeout=self.daemon.connect_timeout,
            client=client,
            on_lost=on_lost,
            on_renewed=on_renewed,
        )

    # --- the client side of messages that belong to no call ------------------------------------------------------

    @property
    def agent(self) -> object:
        return None

    def notify(self, message: Message) -> None:
        method = message.get("method")
        stale = _STALE_AFTER.get(method) if isinstance(method, str) else None
        if stale is not None:
            self._schedule_refresh(stale)
        else:
            self._hooks.server_notification(self.name, message)

    async def ask(self, method: str, params: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
        return await self._hooks.server_request(self.name, method, params, timeout)

    # --- lifecycle -----------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._keeper = asyncio.get_running_loop().create_task(self._keep(), name=f"upstream:{self.name}")

    async def stop(self) -> None:
        for task in (self._keeper, self._refresh):
            if task is not None:
                task.cancel()
        for task in (self._keeper, self._refresh):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.session.close()
        self.state = UpstreamState.STOPPED

    async def _keep(self) -> None:
        delay = self.daemon.reconnect_initial
        while True:
            self._attempts_started += 1
            attempt = self._attempts_started
            # A wake-up from here on asks for one more attempt after this one (a login may finish meanwhile).
            self._wake.clear()
            try:
                async with asyncio.timeout(self.daemon.connect_timeout + self.config.timeout):
                    await self.session.connect()
                    lists = {kind: await self._list(kind) for kind in self._kinds()}
            except NeedsLogin as needs:
                self._needs_login(needs)
                await self._attempt_ended(attempt)
                # Nothing to retry until someone logs in (the login wakes this loop).
                await self._wake.wait()
                continue
            except (UpstreamError, TimeoutError) as exc:
                self._fail(
                    exc if isinstance(exc, UpstreamError) else UpstreamUnavailable(self.name, "connect timed out")
                )
            except Exception as bug:  # noqa: BLE001 - task top: an upstream must never take the daemon down
                _log.exception("unexpected error while connecting", upstream=self.name)
                self._fail(UpstreamProtocolError(self.name, f"unexpected error: {type(bug).__name__}"))
            else:
                self._broken.clear()
                self.state = UpstreamState.READY
                self.last_error = None
                self.retry_at = None
                self._ready_at = time.monotonic()
                _log.info(
                    "upstream ready",
                    upstream=self.name,
                    tools=len(lists[TOOLS]),
                    prompts=len(lists.get(PROMPTS, ())),
                    resources=len(lists.get(RESOURCES, ())),
                    protocol=self.session.protocol_version,
                )
                self._set_lists(lists)
                self._hooks.connected(self.name)
                await self._attempt_ended(attempt)
                # Connect again when a call finds the session broken, or when asked to (a new credential).
                await first_of(self._broken, self._wake)
                if self._wake.is_set() or self._reconnect_at_once:
                    delay = self.daemon.reconnect_initial
                else:  # lost soon after it came up (e.g. a stdio server that keeps crashing): back off first
                    await self._back_off(delay)
                    delay = min(delay * 2, self.daemon.reconnect_max)
                continue
            await self._attempt_ended(attempt)
            await self._back_off(delay)
            delay = min(delay * 2, self.daemon.reconnect_max)

    async def _back_off(self, delay: float) -> None:
        """Wait `delay` seconds before the next attempt, or less if woken."""
        self.retry_at = time.time() + delay
        try:
            async with asyncio.timeout(delay):
                await self._wake.wait()
        except TimeoutError:
            pass

    def _fail(self, exc: UpstreamError) -> None:
        state = UpstreamState.AUTH_FAILED if isinstance(exc, CredentialRejected) else UpstreamState.DOWN
        if state != self.state or exc.reason != self.last_error:
            _log.warning("upstream unavailable", upstream=self.name, state=state.value, error=exc.reason)
        if state is UpstreamState.AUTH_FAILED:
            self._rejected_credential = self.credentials.describe()
        self.state = state
        self.last_error = exc.reason

    def _needs_login(self, exc: NeedsLogin) -> None:
        if self.state is not UpstreamState.NEEDS_LOGIN:
            _log.warning("upstream needs a login", upstream=self.name, command=exc.command)
        self.state = UpstreamState.NEEDS_LOGIN
        self._login_needed = exc
        self.last_error = str(exc)
        self.retry_at = None

    async def _attempt_ended(self, attempt: int) -> None:
        self.first_attempt_done.set()
        async with self._attempt_changed:
            self._attempts_ended = attempt
            self._attempt_changed.notify_all()

    def wake(self) -> None:
        """Retry connecting now instead of waiting out the backoff."""
        self._wake.set()

    async def reconnect_now(self) -> None:
        """Start a fresh connection attempt and wait (bounded) until it has ended, however it ended."""
        wanted = self._attempts_started + 1
        self.wake()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.daemon.connect_timeout), self._attempt_changed:
                await self._attempt_changed.wait_for(lambda: self._attempts_ended >= wanted)

    # --- calls ---------------------------------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        params: dict[str, Any] | None,
        on_related: ClientSide | None,
        *,
        forward_raw: bool = False,
    ) -> Any:
        """Forward one request. Raises an `UpstreamError` (never hangs on a down upstream)."""
        if self.state is not UpstreamState.READY:
            await self.ensure_ready()
        self._in_flight.started()
        try:
            return await self.session.request(
                method, params, timeout=self.config.timeout, on_related=on_related, forward_raw=forward_raw
            )
        except McpxError as exc:
            self._call_failed(exc)
            raise
        finally:
            self._in_flight.ended()

    def start_request(
        self,
        method: str,
        params: dict[str, Any] | None,
        on_related: ClientSide | None,
        *,
        forward_raw: bool = False,
        on_settled: Settled,
    ) -> asyncio.Future[Any] | None:
        """`request` without a task where the session can start it at once (see `UpstreamSession.start_request`);
        None when it cannot (not ready, no idle connection, another transport): then call `request`."""
        if self.state is not UpstreamState.READY:
            return None

        def settled(result: Any, error: BaseException | None) -> None:
            if isinstance(error, McpxError):
                self._call_failed(error)
            self._in_flight.ended()
            on_settled(result, error)

        future = self.session.start_request(
            method,
            params,
            timeout=self.config.timeout,
            on_related=on_related,
            forward_raw=forward_raw,
            on_settled=settled,
        )
        if future is not None:
            self._in_flight.started()
        return future

    def _call_failed(self, error: McpxError) -> None:
        if isinstance(error, UpstreamUnavailable | CredentialRejected):
            self._mark_broken(error)
        elif isinstance(error, NeedsLogin):
            logged_out = isinstance(self.credentials, OAuthCredential) and not self.credentials.logged_in
            if logged_out and self.state is UpstreamState.READY:
                self._needs_login(error)
                self._broken.set()

    @property
    def idle(self) -> bool:
        """No request of an agent is in flight."""
        return self._in_flight.none

    async def retire(self) -> None:
        """Stop once the calls in flight have ended (bounded by the per-call timeout): a reload replaced this
        upstream, and its calls still finish on the session they started on."""
        await self._in_flight.ended_all(self.config.timeout)
        await self.stop()

    async def ensure_ready(self) -> None:
        """Return when calls can be made; raise why not otherwise. Waits (bounded) only where waiting helps: for
        the first connection attempt, for the reconnect of a session that died on its own, and for a reconnect
        when the user changed a rejected credential."""
        if self.state is UpstreamState.STARTING:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.daemon.connect_timeout):
                    await self.first_attempt_done.wait()
        recovery = self._recovery_attempt
        if self.state is UpstreamState.DOWN and recovery is not None and self._attempts_ended < recovery:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.daemon.connect_timeout), self._attempt_changed:
                    await self._attempt_changed.wait_for(lambda: self._attempts_ended >= recovery)
        if self.state is UpstreamState.AUTH_FAILED and self.credentials.describe() != self._rejected_credential:
            await self.reconnect_now()
        if self.state is not UpstreamState.READY:
            raise self.unavailable()

    def unavailable(self) -> UpstreamError | NeedsLogin:
        """Why calls to this upstream cannot be made right now."""
        if self.state is UpstreamState.AUTH_FAILED:
            return CredentialRejected(self.name, self.last_error or "credential rejected")
        if self.state is UpstreamState.NEEDS_LOGIN and self._login_needed is not None:
            return self._login_needed
        if self.state is UpstreamState.STARTING:
            return UpstreamUnavailable(self.name, "still connecting")
        retry = f"; retrying in {max(0, round(self.retry_at - time.time()))} s" if self.retry_at else ""
        return UpstreamUnavailable(self.name, f"{self.last_error or 'unavailable'}{retry}")

    def _mark_broken(self, exc: UpstreamError, *, on_its_own: bool = False) -> None:
        if self.state is UpstreamState.READY:
            self._fail(exc)
            # A session that had been up a while is replaced at once; one lost soon after it came up, after backoff.
            self._reconnect_at_once = time.monotonic() - self._ready_at >= self.daemon.reconnect_max
            if on_its_own and self._reconnect_at_once:
                self._recovery_attempt = self._attempts_started + 1
            self._broken.set()

    def _lost(self, reason: str) -> None:
        """The session died on its own (a stdio server's process exited, a stream ended)."""
        self._mark_broken(UpstreamUnavailable(self.name, reason), on_its_own=True)

    def _renewed(self) -> None:
        """The session was replaced on its own (the server forgot it, e.g. it restarted): the new one knows none
        of the old one's resource subscriptions, and the server may now list other things."""
        if self.state is not UpstreamState.READY:
            return  # the supervisor's own (re)connect renews and lists when it ends
        _log.info("upstream session renewed", upstream=self.name)
        self._hooks.connected(self.name)
        self._schedule_refresh(tuple(self._kinds()))

    # --- lists ---------------------------------------------------------------------------------------------------

    def _kinds(self) -> list[str]:
        capabilities = self.session.capabilities
        return [kind for kind, spec in LISTS.items() if kind == TOOLS or spec.capability in capabilities]

    async def _list(self, kind: str) -> tuple[dict[str, Any], ...]:
        """All pages of one list: the entries whose identifying field is a non-empty string."""
        spec = LISTS[kind]
        items: list[dict[str, Any]] = []
        cursor: str | None = None
        for _ in range(_MAX_LIST_PAGES):
            params = {"cursor": cursor} if cursor is not None else None
            result = await self.session.request(spec.method, params, timeout=self.config.timeout)
            page = result.get(spec.key) if isinstance(result, dict) else None
            if not isinstance(page, list):
                raise UpstreamProtocolError(self.name, f"{spec.method} result has no {spec.key} array")
            for item in page:
                if isinstance(item, dict) and isinstance(item.get(spec.identity), str) and item[spec.identity]:
                    items.append(item)
                else:
                    _log.warning("ignoring a malformed list entry", upstream=self.name, method=spec.method)
            next_cursor = result.get("nextCursor")
            if not isinstance(next_cursor, str):
                return tuple(items)
            cursor = next_cursor
        raise UpstreamProtocolError(self.name, f"{spec.method} did not end after {_MAX_LIST_PAGES} pages")

    def _set_lists(self, lists: dict[str, tuple[dict[str, Any], ...]]) -> None:
        changed = False
        for kind, items in lists.items():
            if items != getattr(self, kind):
                setattr(self, kind, items)
                changed = True
        if changed:
            self._hooks.lists_changed()

    def _schedule_refresh(self, kinds: tuple[str, ...]) -> None:
        self._stale.update(kinds)
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.get_running_loop().create_task(self._refresh_lists())

    async def _refresh_lists(self) -> None:
        # Notifications that arrive during a refresh are folded into one more pass.
        while self._stale:
            kinds, self._stale = self._stale, set()
            try:
                self._set_lists({kind: await self._list(kind) for kind in sorted(kinds)})
            except (UpstreamError, NeedsLogin) as exc:
                _log.warning("list refresh failed", upstream=self.name, error=str(exc))


class AgentUpstream:
    """One agent's own session with an upstream (`sharing = "per-agent"`): opened on the agent's first call to it,
    closed when the agent leaves or a reload replaces the upstream (once the agent's calls in flight have ended),
    dropped when it fails so that the next call opens a fresh one (a new child process for a stdio server). The
    shared `ManagedUpstream` keeps the catalog and the credential. The resources the agent subscribed to are
    remembered, and subscribed to again in a session that replaces the one they were made in (the server forgot
    it, it died and a new one was opened, or a reload replaced the upstream: `subscribed` carries them over)."""

    def __init__(self, shared: ManagedUpstream, client: ClientSide, *, subscribed: Iterable[str] = ()) -> None:
        self.shared = shared
        self._client = client
        self.session: UpstreamSession | None = None
        self._opening = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()
        self._subscribed: set[str] = set(subscribed)  # the upstream's own URIs
        self._renewing: set[asyncio.Task[None]] = set()
        self._closed = asyncio.Event()
        self._in_flight = _InFlight()

    async def request(
        self,
        method: str,
        params: dict[str, Any] | None,
        on_related: ClientSide | None,
        *,
        forward_raw: bool = False,
    ) -> Any:
        self._in_flight.started()
        try:
            session = await self._open()
            try:
                result = await session.request(
                    method, params, timeout=self.shared.config.timeout, on_related=on_related, forward_raw=forward_raw
                )
            except (UpstreamUnavailable, CredentialRejected):
                await self._drop(session)
                raise
        finally:
            self._in_flight.ended()
        uri = params.get("uri") if params is not None else None
        if method == "resources/subscribe" and isinstance(uri, str):
            self._subscribed.add(uri)
        elif method == "resources/unsubscribe" and isinstance(uri, str):
            self._subscribed.discard(uri)
        return result

    async def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        if self.session is not None:
            await self.session.notify(method, params)

    async def open(self) -> None:
        """Open the session now rather than on the agent's next call (it subscribes as it opens)."""
        await self._open()

    @property
    def subscribed(self) -> frozenset[str]:
        """The upstream's own URIs of the resources the agent is subscribed to."""
        return frozenset(self._subscribed)

    @property
    def idle(self) -> bool:
        """No request of the agent is in flight."""
        return self._in_flight.none

    async def retire(self) -> None:
        """Close once the agent's calls in flight have ended: a reload replaced the upstream, and its calls still
        finish on the session they started on. Bounded by the per-call timeout, plus the connect timeout, as a
        call may still be opening the session."""
        await self._in_flight.ended_all(self.shared.daemon.connect_timeout + self.shared.config.timeout)
        await self.close()

    async def close(self) -> None:
        """Close the session; one still opening is closed once it has opened (no session outlives this)."""
        self._closed.set()
        for task in list(self._renewing):
            task.cancel()
        if self.session is not None:
            await self._drop(self.session)
        for task in list(self._closing):
            await task

    async def _open(self) -> UpstreamSession:
        async with self._opening:
            if self._closed.is_set():
                raise UpstreamUnavailable(self.name, "the agent's session with it was closed")
            if self.session is not None:
                return self.session
            if self.shared.state is not UpstreamState.READY:
                await self.shared.ensure_ready()  # raises why calls cannot be made (down, needs a login, …)
            session = self.shared.open_session(
                self._client, on_lost=lambda _: self._forget(session), on_renewed=lambda: self._subscribe_again(session)
            )
            try:
                async with asyncio.timeout(self.shared.daemon.connect_timeout + self.shared.config.timeout):
                    await session.connect()
            except TimeoutError:
                await session.close()
                raise UpstreamUnavailable(self.name, "connect timed out") from None
            except BaseException:
                await session.close()
                raise
            if self._closed.is_set():
                await session.close()
                raise UpstreamUnavailable(self.name, "the agent's session with it was closed while it opened")
            self.session = session
            _log.info("per-agent session opened", upstream=self.name)
            self._subscribe_again(session)
            return session

    @property
    def name(self) -> str:
        return self.shared.name

    def _subscribe_again(self, session: UpstreamSession) -> None:
        """Subscribe `session`, new or renewed, to the resources the agent subscribed to (in the background)."""
        if not self._subscribed:
            return
        task = asyncio.get_running_loop().create_task(self._subscribe(session, sorted(self._subscribed)))
        self._renewing.add(task)
        task.add_done_callback(self._renewing.discard)

    async def _subscribe(self, session: UpstreamSession, uris: list[str]) -> None:
        for uri in uris:
            try:
                await session.request("resources/subscribe", {"uri": uri}, timeout=self.shared.config.timeout)
            except (UpstreamError, NeedsLogin) as exc:
                _log.warning("a resource subscription was not renewed", upstream=self.name, error=str(exc))
            except Exception:  # noqa: BLE001 - task top: the agent's session goes on
                _log.exception("a resource subscription was not renewed", upstream=self.name)

    def _forget(self, session: UpstreamSession) -> None:
        """The session died on its own: the next call opens a new one; this one is cleaned up now."""
        if self.session is session:
            self.session = None
            task = asyncio.get_running_loop().create_task(session.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _drop(self, session: UpstreamSession) -> None:
        if self.session is session:
            self.session = None
        await session.close()
