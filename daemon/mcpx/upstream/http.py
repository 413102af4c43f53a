"""MCP client session over streamable HTTP, handshake era (protocol 2025-11-25 `basic/transports`).

One `HttpSession` per configured upstream, shared by every agent. Each request is its own POST, answered by one
JSON body or by an SSE stream that ends with the response, so responses can never reach the wrong caller.
What it handles: `Mcp-Session-Id` and `MCP-Protocol-Version`, re-initialize and retry once when the server
forgot the session (404), re-read the credential and retry once on 401, the per-call deadline (with
`notifications/cancelled` sent upstream, since over HTTP a disconnect is not a cancellation), DELETE on close.

Streams (SSE) and their resumption:
- A POST's SSE stream that ends or breaks before the response, after the server gave it an event id (a priming
  event, SEP-1699 polling), is resumed with GET + `Last-Event-ID` once the server's `retry` has passed, as often
  as needed within the call's deadline.
- After initialize, a standalone GET stream carries the server's messages that belong to no request (list
  changes, log messages, requests to the client, which are answered by POST). 405 means the server has none.
  When it drops it is reopened with `Last-Event-ID`, after the server's `retry` or a capped backoff. It is owned
  by the session (replaced on re-initialize, cancelled on close) and never delays a call.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections.abc import Callable, Coroutine
from typing import Any, Final, NamedTuple, TypeVar

from mcpx import jsonrpc
from mcpx.auth.credentials import CredentialProvider
from mcpx.config.model import UpstreamConfig
from mcpx.errors import (
    FrameTooLarge,
    McpxError,
    NeedsLogin,
    SessionExpired,
    UpstreamError,
    UpstreamHTTPError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from mcpx.framing.sse import SSEDecoder
from mcpx.jsonrpc import Message
from mcpx.log import get_logger
from mcpx.upstream.h1 import Deadline, HttpClient, HttpClientError, Response, Sent
from mcpx.upstream.httpbase import (
    Answer,
    EventStream,
    HttpPeer,
    Listen,
    connection_failure,
    reconnect_delay,
    response_result,
    stream_message,
)
from mcpx.upstream.peer import (
    STATELESS_ERA_CODES,
    STATELESS_VERSION,
    ClientSide,
    ServerRequests,
    Settled,
    accept_initialize,
    adopt_hello,
    initialize_params,
    is_replayable,
    route_incoming,
)

_log = get_logger("mcpx.upstream")
_T = TypeVar("_T")


class HttpSession:
    """The MCP session mcpx holds with one streamable-HTTP upstream."""

    def __init__(
        self,
        config: UpstreamConfig,
        http: HttpClient,
        credentials: CredentialProvider,
        *,
        max_message_bytes: int,
        client: ClientSide,
        on_renewed: Callable[[], None] | None = None,
    ) -> None:
        """`on_renewed` is told when the session is replaced on its own: the server forgot it (404) and it was
        initialized anew, so that what lived in the old one (resource subscriptions) is renewed."""
        self.name = config.name
        self._config = config
        self._http = http
        self._peer = HttpPeer(config, http, credentials)
        self._target = self._peer.target
        self._credentials = credentials
        self._max_message_bytes = max_message_bytes
        self._client = client
        self._on_renewed = on_renewed
        self._server_requests = ServerRequests(config.name, self._post_expecting_accepted, config.timeout)
        self._ids = itertools.count(1)
        self._session_id: str | None = None
        self._generation = 0
        self._init_lock = asyncio.Lock()
        # Whether the last answer to a POST came whole at once (a JSON body, or an SSE stream that had ended by the
        # time its headers were read): the fast path, which takes only those, is tried while the server answers so.
        self._answers_at_once = True
        self._background: set[asyncio.Task[None]] = set()
        self._listener: asyncio.Task[None] | None = None
        self.protocol_version: str | None = None
        self.server_info: dict[str, Any] = {}
        self.capabilities: dict[str, Any] = {}
        self.instructions: str | None = None

    # --- lifecycle -----------------------------------------------------------------------------------------------

    async def connect(self) -> None:
        """(Re-)run the initialize handshake. Raises an `UpstreamError` subclass on failure."""
        async with self._init_lock:
            await self._credentials.prepare()
            try:
                await self._peer.with_auth_retry(self._initialize)
            except UpstreamHTTPError as exc:
                if exc.rpc_code not in STATELESS_ERA_CODES:
                    raise
                only = f"a server of protocol {STATELESS_VERSION} only"
                reason = f'{exc.reason} ({only}; `protocol = "handshake"` forbids speaking it)'
                raise UpstreamHTTPError(self.name, exc.status, reason, rpc_code=exc.rpc_code) from None

    async def close(self) -> None:
        """End the session: DELETE it on the server (best effort, bounded) and stop background work."""
        listener = self._listener
        self._stop_listener()
        if listener is not None:
            await asyncio.wait({listener}, timeout=1.0)  # it only releases its stream
        for task in list(self._background):
            task.cancel()
        self._server_requests.close()
        session_id, self._session_id = self._session_id, None
        if session_id is None:
            return
        try:
            async with asyncio.timeout(2.0):
                headers = self._headers()
                headers["Mcp-Session-Id"] = session_id
                (await self._http.request("DELETE", self._target, headers)).release()
        except (TimeoutError, HttpClientError, McpxError) as exc:  # e.g. NeedsLogin: no credential left
            _log.debug("session delete failed", upstream=self.name, error=str(exc))

    # --- requests ------------------------------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        params: dict[str, Any] | None,
        *,
        timeout: float,
        on_related: ClientSide | None = None,
        forward_raw: bool = False,
        started: _Started | None = None,
    ) -> Any:
        """Send one request and return its `result` (a `jsonrpc.RawJson` where `forward_raw` allows and the
        upstream's bytes can be forwarded untouched). `started`: the request is already on its way (the fast path
        hands it over), its answer not yet read; `params` is then unused.

        Raises:
            UpstreamRpcError: the upstream answered with a JSON-RPC error.
            UpstreamError: any other failure (unreachable, timeout, HTTP error, garbage, credential rejected).
        """
        if started is None:
            request_id = next(self._ids)
            body = jsonrpc.dumps(jsonrpc.request(request_id, method, params))
            sent = None
        else:
            request_id, body, sent = started
        try:
            with Deadline(timeout):  # asyncio.timeout's rules, for a third of its work per call
                return await self._request_with_recovery(
                    request_id, body, on_related, forward_raw, sent, replayable=is_replayable(method)
                )
        except TimeoutError:
            self._cancel_upstream(request_id, "timed out")
            raise UpstreamTimeout(self.name, f"no answer to {method} within {timeout:g} s") from None
        except asyncio.CancelledError:
            self._cancel_upstream(request_id, "cancelled by the client")
            raise

    def start_request(
        self,
        method: str,
        params: dict[str, Any] | None,
        *,
        timeout: float,
        on_related: ClientSide | None = None,
        forward_raw: bool = False,
        on_settled: Settled,
    ) -> asyncio.Future[Any] | None:
        """`request` without a task where it can start at once (an idle pooled connection, no re-initialize
        under way, a server that answers in JSON): see `UpstreamSession.start_request`."""
        if self._init_lock.locked() or not self._answers_at_once:
            return None
        request_id = next(self._ids)
        body = jsonrpc.dumps(jsonrpc.request(request_id, method, params))
        try:
            sent = self._http.send_now("POST", self._target, self._headers(), body, replayable=is_replayable(method))
        except (HttpClientError, McpxError):
            return None  # `request` meets the same error and reports it
        if sent is None:
            return None
        call = _FastCall(
            self,
            sent,
            request_id,
            method,
            body,
            timeout=timeout,
            on_related=on_related,
            forward_raw=forward_raw,
            on_settled=on_settled,
        )
        return call.future

    async def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        body = jsonrpc.dumps(jsonrpc.notification(method, params))
        await self._post_expecting_accepted(body)

    async def _request_with_recovery(
        self,
        request_id: int,
        body: bytes,
        on_related: ClientSide | None,
        forward_raw: bool,
        sent: Sent | None,
        *,
        replayable: bool,
    ) -> Any:
        """The exchange, retried once with a renewed credential after a 401 and once in a new session after a 404.
        `sent`: the request is already on its way (the fast path handed it over), its answer not yet read."""
        expired_once = False
        while True:
            if self._init_lock.locked() and sent is None:
                async with self._init_lock:
                    pass  # a re-initialize is under way (say the GET stream's): send with the session it makes
            generation = self._generation
            try:
                exchange: Callable[[], Coroutine[Any, Any, Any]]
                exchange = functools.partial(
                    self._exchange, request_id, body, on_related, forward_raw=forward_raw, replayable=replayable
                )
                if sent is not None:  # the request already on its way is read the first time; a retry sends anew
                    exchange = _first_then(functools.partial(exchange, sent=sent), exchange)
                    sent = None
                return await self._peer.with_auth_retry(exchange)
            except SessionExpired:
                if expired_once:
                    raise
                expired_once = True
                _log.info("upstream session expired, re-initializing", upstream=self.name)
                await self._reinitialize(generation)

    async def _reinitialize(self, seen_generation: int) -> None:
        async with self._init_lock:
            if self._generation != seen_generation:
                return  # another caller already re-initialized
            self._session_id = None
            await self._peer.with_auth_retry(self._initialize)
        if self._on_renewed is not None:
            try:
                self._on_renewed()
            except Exception:  # noqa: BLE001 - the owner's callback: the call or ping that renewed goes on
                _log.exception("a renewed session could not be handed on", upstream=self.name)

    @property
    def asked_roots(self) -> bool:
        return self._server_requests.asked_roots

    async def _initialize(self) -> None:
        request_id = next(self._ids)
        body = jsonrpc.dumps(jsonrpc.request(request_id, "initialize", initialize_params()))
        self._stop_listener()
        self._session_id = None
        adopt_hello(self, accept_initialize(self.name, await self._exchange(request_id, body, None, initializing=True)))
        self._generation += 1
        await self._post_expecting_accepted(jsonrpc.dumps(jsonrpc.notification("notifications/initialized")))
        self._listener = asyncio.get_running_loop().create_task(
            self._listen(self._generation), name=f"upstream:{self.name}:get-stream"
        )

    # --- one HTTP exchange ---------------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        headers = self._peer.headers()
        headers["Accept"] = "application/json, text/event-stream"
        headers["Content-Type"] = "application/json"
        if self._session_id is not None:
            headers["Mcp-Session-Id"] = self._session_id
        if self.protocol_version is not None:
            headers["MCP-Protocol-Version"] = self.protocol_version
        return headers

    def _stream_headers(self, last_event_id: str | None) -> dict[str, str]:
        """The headers of a GET that opens or resumes an SSE stream."""
        headers = self._peer.headers()
        headers["Accept"] = "text/event-stream"
        if self._session_id is not None:
            headers["Mcp-Session-Id"] = self._session_id
        if self.protocol_version is not None:
            headers["MCP-Protocol-Version"] = self.protocol_version
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        return headers

    async def _exchange(
        self,
        request_id: int,
        body: bytes,
        on_related: ClientSide | None,
        *,
        initializing: bool = False,
        forward_raw: bool = False,
        replayable: bool = True,
        sent: Sent | None = None,
    ) -> Any:
        headers = dict(sent.headers) if sent is not None else self._headers()
        sent_session = headers.get("Mcp-Session-Id")
        try:
            if sent is not None:
                response = await sent.response()
            else:
                response = await self._http.request("POST", self._target, headers, body, replayable=replayable)
        except HttpClientError as exc:
            raise connection_failure(self.name, exc) from None

        def on_head(head: Response) -> None:
            if initializing:
                session_id = head.headers.get("mcp-session-id")
                if session_id is not None and not _visible_ascii(session_id):
                    raise UpstreamProtocolError(self.name, "invalid Mcp-Session-Id")
                self._session_id = session_id
            self._answers_at_once = head.content_type == "application/json" or head.ended

        return await self._peer.answer(
            response,
            headers,
            request_id,
            lambda stream: self._read_stream(stream, request_id, on_related, forward_raw),
            max_bytes=self._max_message_bytes,
            forward_raw=forward_raw,
            session_sent=sent_session is not None,
            on_head=on_head,
        )

    async def _read_stream(
        self, response: Response, request_id: int, on_related: ClientSide | None, forward_raw: bool
    ) -> Any:
        """Read a POST's SSE stream up to the response, resuming it with GET + `Last-Event-ID` when it ends or
        breaks first after the server gave it an event id (the call's deadline bounds the whole)."""
        stream = EventStream(self._max_message_bytes)
        current = response
        resumed: Response | None = None
        fruitless = 0  # resumed streams in a row that brought nothing
        try:
            while True:
                chunks_before = stream.chunks
                try:
                    async for event in stream.events(current):
                        if (message := stream_message(self.name, event, request_id, forward_raw)) is None:
                            continue
                        if isinstance(message, Answer):
                            return message.result()
                        self._route_from_stream(message, request_id, on_related)
                except FrameTooLarge as exc:
                    raise UpstreamProtocolError(self.name, f"SSE event too large: {exc}") from None
                except HttpClientError:
                    if stream.last_event_id is None:
                        raise
                if stream.last_event_id is None:
                    raise UpstreamProtocolError(self.name, "the SSE stream ended before the response")
                # The server closed the stream (or it broke) before the response, but it can be resumed.
                if resumed is not None:
                    resumed.release()
                    resumed = None
                fruitless = 0 if current is response or stream.chunks > chunks_before else fruitless + 1
                await asyncio.sleep(reconnect_delay(stream.retry_ms, fruitless))
                resumed = current = await self._peer.with_auth_retry(
                    functools.partial(self._resume_stream, stream.last_event_id)
                )
        finally:
            if resumed is not None:
                resumed.release()

    def _route_from_stream(self, message: Message, request_id: int, on_related: ClientSide | None) -> None:
        # On a request's own stream, the server's messages belong to that request (SEP-2260).
        route_incoming(
            message, related=on_related, default=self._client, requests=self._server_requests, call=request_id
        )

    async def _resume_stream(self, last_event_id: str) -> Response:
        """GET + `Last-Event-ID`: the rest of a request's stream (2025-11-25 `basic/transports`, resumability)."""
        response = await self._peer.get(self._stream_headers(last_event_id))
        try:
            if response.status == 404 and self._session_id is not None:
                raise SessionExpired(self.name, "the upstream no longer knows our session")
            if response.status != 200:
                error = await self._peer.http_error(response)
                raise UpstreamUnavailable(self.name, f"the response stream could not be resumed: {error.reason}")
            if response.content_type != "text/event-stream":
                raise UpstreamProtocolError(self.name, "a resumed stream is not text/event-stream")
        except BaseException:
            response.release()
            raise
        return response

    async def _post_expecting_accepted(self, body: bytes) -> None:
        try:
            response = await self._http.request("POST", self._target, self._headers(), body)
            try:
                if response.status == 401:
                    raise self._peer.rejected()
                if response.status not in (200, 202, 204):
                    raise await self._peer.http_error(response)
            finally:
                response.release()
        except HttpClientError as exc:
            raise connection_failure(self.name, exc) from None

    # --- the standalone GET stream ---------------------------------------------------------------------------------

    def _stop_listener(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            self._listener = None

    async def _listen(self, generation: int) -> None:
        """Keep the session's GET stream open (task top: it ends only when there is none, or is cancelled)."""
        stream = EventStream(self._max_message_bytes)
        failures = 0
        opened_before = False
        try:
            while True:
                outcome = await self._listen_once(stream, generation, opened_before=opened_before)
                if outcome is Listen.STOP:
                    return
                if outcome is Listen.RECEIVED:
                    opened_before = True
                    failures = 0
                else:
                    failures += 1
                await asyncio.sleep(reconnect_delay(stream.retry_ms, failures))
        except Exception:  # noqa: BLE001 - task top: the GET stream must never take the session down
            _log.exception("GET stream failed", upstream=self.name)

    async def _listen_once(self, stream: EventStream, generation: int, *, opened_before: bool) -> Listen:
        try:
            headers = self._stream_headers(stream.last_event_id)
        except (UpstreamError, NeedsLogin) as exc:  # the credential cannot be read: calls will say why
            _log.debug("GET stream not opened", upstream=self.name, error=str(exc))
            return Listen.STOP
        try:
            async with asyncio.timeout(self._config.timeout):
                response = await self._http.request("GET", self._target, headers)
        except (TimeoutError, HttpClientError) as failure:
            _log.debug("GET stream could not be opened", upstream=self.name, error=str(failure))
            return Listen.FAILED

        def refused(status: int) -> Listen | None:
            if status == 405:
                _log.debug("upstream offers no GET stream", upstream=self.name)
                return Listen.STOP
            if status == 404 and self._session_id is not None:
                if opened_before and generation == self._generation:
                    # It had a GET stream in this session: the server forgot the session. A ping finds out and
                    # re-initializes (which opens a new GET stream).
                    _log.debug("GET stream: upstream session expired, checking", upstream=self.name)
                    self._check_session_soon()
                return Listen.STOP
            return None

        return await self._peer.read_stream(
            response, headers, stream, kind="GET", on_message=self._from_get_stream, refused=refused
        )

    def _from_get_stream(self, message: Message) -> bool:
        """Deliver one message of the GET stream (False: none ends it)."""
        if "method" not in message:
            _log.debug("ignoring a response on the GET stream", upstream=self.name)
            return False
        # Nothing relates a message on the standalone stream to a call: it goes to the session's client side.
        route_incoming(message, related=None, default=self._client, requests=self._server_requests)
        return False

    def _check_session_soon(self) -> None:
        """Ping in the background: a forgotten session makes the ping re-initialize (and reopen the GET stream)."""

        async def check() -> None:
            try:
                await self.request("ping", None, timeout=self._config.timeout)
            except McpxError as exc:
                _log.debug("session check failed", upstream=self.name, error=str(exc))

        task = asyncio.get_running_loop().create_task(check())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- background sends ----------------------------------------------------------------------------------------

    def _cancel_upstream(self, request_id: int, reason: str) -> None:
        self._server_requests.withdraw(request_id)
        if self._session_id is not None:
            params = {"requestId": request_id, "reason": reason}
            self._spawn(lambda: self.notify("notifications/cancelled", params))

    def _spawn(self, send: Callable[[], Coroutine[Any, Any, None]]) -> None:
        # A factory, not a coroutine: a task cancelled before it starts must not leave a never-awaited coroutine.
        async def guarded() -> None:
            try:
                async with asyncio.timeout(5.0):
                    await send()
            except (TimeoutError, HttpClientError, McpxError) as exc:
                _log.debug("background send failed", upstream=self.name, error=str(exc))

        task = asyncio.get_running_loop().create_task(guarded())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


class _Started(NamedTuple):
    """A request the fast path wrote, handed to `HttpSession.request` to read its answer."""

    request_id: int
    body: bytes
    sent: Sent


# A JSON answer up to this size is taken in the connection's callback; a larger one is read by the general path.
_FAST_BODY: Final = 64 * 1024


class _FastCall:
    """One request on the fast path (`HttpSession.start_request`): written at once on a pooled connection, its
    answer watched in the connection's own callback, and a complete JSON answer taken there and handed to
    `on_settled` at once: no task, no chain of coroutines, no turn of the loop between the answer's last byte and
    the caller. Anything else (an SSE stream, a 401 or 404, another status, a lost connection, a large body) is
    handed to the general path (`HttpSession.request`), which reads the response already on its way and applies
    every rule it has. Either way `on_settled` is told what `request` would return or raise, and `future` ends
    with it; `future.cancel()` cancels the call, upstream too."""

    __slots__ = (
        "_body",
        "_forward_raw",
        "_method",
        "_on_related",
        "_on_settled",
        "_request_id",
        "_sent",
        "_session",
        "_task",
        "_timeout",
        "_timer",
        "future",
    )

    def __init__(
        self,
        session: HttpSession,
        sent: Sent,
        request_id: int,
        method: str,
        body: bytes,
        *,
        timeout: float,
        on_related: ClientSide | None,
        forward_raw: bool,
        on_settled: Settled,
    ) -> None:
        self._session = session
        self._sent = sent
        self._request_id = request_id
        self._method = method
        self._body = body
        self._timeout = timeout
        self._on_related = on_related
        self._forward_raw = forward_raw
        self._on_settled = on_settled
        self._task: asyncio.Task[Any] | None = None
        loop = sent.loop
        self.future: asyncio.Future[Any] = loop.create_future()
        self._timer: asyncio.TimerHandle | None = loop.call_later(timeout, self._timed_out)
        self.future.add_done_callback(self._on_done)
        sent.watch(self._progress)

    def _progress(self) -> None:
        """The connection's news of the response (synchronous, outside the parser)."""
        headers_ready = self._sent.headers_ready
        if self.future.done() or not headers_ready.done():
            return
        if headers_ready.cancelled() or headers_ready.exception() is not None:
            self._hand_off()  # (a pooled connection closed before any answer is sent once more there)
            return
        response = headers_ready.result()
        length = response.content_length
        limit = min(_FAST_BODY, self._session._max_message_bytes)
        if response.status != 200:
            self._hand_off()
        elif response.content_type == "application/json":
            if length is None or length > limit:
                self._hand_off()
            elif response.ended:
                self._take(response)
        elif response.content_type == "text/event-stream" and response.ended:
            self._take_stream(response, limit)
        else:
            self._session._answers_at_once = False  # (an SSE stream that goes on: its events are read as they come)
            self._hand_off()

    def _take(self, response: Response) -> None:
        self._sent.watch(None)
        try:
            raw = response.read_now(_FAST_BODY)
        except HttpClientError:
            self._hand_off()  # the general path reports it as it always does
            return
        response.release()
        try:
            result = response_result(self._session.name, raw, self._request_id, self._forward_raw)
        except Exception as exc:  # noqa: BLE001 - the caller gets it as `request` would raise it
            self._settle(None, exc)
        else:
            self._settle(result, None)

    def _take_stream(self, response: Response, limit: int) -> None:
        """A whole SSE stream, already in: taken here when it holds the answer (the server's messages before it
        are routed first, as the general path would); else (a stream the server ended early, to be resumed) it
        goes, unread, to the general path."""
        session = self._session
        try:
            events = SSEDecoder(session._max_message_bytes).feed(response.peek(limit))
            messages = [stream_message(session.name, event, self._request_id, self._forward_raw) for event in events]
        except (HttpClientError, FrameTooLarge, UpstreamProtocolError):
            self._hand_off()  # the general path reports it, or resumes the stream
            return
        answer = next((message for message in messages if isinstance(message, Answer)), None)
        if answer is None:
            self._hand_off()
            return
        self._sent.watch(None)
        response.release()
        try:
            for message in messages:
                if isinstance(message, Answer):
                    break
                if message is not None:
                    session._route_from_stream(message, self._request_id, self._on_related)
        except Exception as exc:  # noqa: BLE001 - the caller gets it as `request` would raise it
            self._settle(None, exc)
            return
        self._settle(answer.value, answer.error)

    def _settle(self, result: Any, error: BaseException | None) -> None:
        self._cancel_timer()
        if self.future.done():
            return
        self.future.set_result(None)  # (the outcome is `on_settled`'s: the future only ends, or is cancelled)
        try:
            self._on_settled(result, error)
        except Exception:  # noqa: BLE001 - a callback top (the connection's): the upstream is not to blame
            _log.exception("a call's outcome could not be handed on", upstream=self._session.name)

    def _hand_off(self) -> None:
        self._sent.watch(None)
        timer = self._timer
        loop = self._sent.loop
        left = self._timeout if timer is None else max(timer.when() - loop.time(), 0.0)
        self._cancel_timer()
        work = self._session.request(
            self._method,
            None,
            timeout=left,
            on_related=self._on_related,
            forward_raw=self._forward_raw,
            started=_Started(self._request_id, self._body, self._sent),
        )
        self._task = loop.create_task(work)
        self._task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            if not self.future.done():
                self.future.cancel()  # (its callback reports it)
        elif (error := task.exception()) is not None:
            self._settle(None, error)
        else:
            self._settle(task.result(), None)

    def _timed_out(self) -> None:
        self._timer = None
        if not self.future.done():
            self._abandon("timed out")
            error = UpstreamTimeout(self._session.name, f"no answer to {self._method} within {self._timeout:g} s")
            self._settle(None, error)

    def _on_done(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled():
            self._abandon("cancelled by the client")
            self._on_settled(None, asyncio.CancelledError())

    def _abandon(self, reason: str) -> None:
        self._cancel_timer()
        if self._task is not None:
            self._task.cancel()  # the general path cancels upstream itself
            return
        self._sent.abort()
        self._session._cancel_upstream(self._request_id, reason)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _first_then(first: Callable[[], _T], then: Callable[[], _T]) -> Callable[[], _T]:
    """A callable that calls `first` the first time and `then` every time after."""
    calls = iter((first,))

    def call() -> _T:
        return next(calls, then)()

    return call


def _visible_ascii(value: str) -> bool:
    return bool(value) and all(0x21 <= ord(char) <= 0x7E for char in value)
