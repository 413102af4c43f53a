"""An MCP client session over one two-way message channel: the base of the stdio and legacy HTTP+SSE transports.

On such a channel every message of the session shares one stream, so responses are matched to requests by id
(ids are mcpx's own, never an agent's), and the server's notifications and requests are related to an agent's
call only by what they carry: a progress token, or the fact that one agent alone has calls in flight.
A subclass opens and shuts the channel, sends one serialized message with `_send`, feeds every received
message to `_received`, and calls `_lost` when the channel dies; everything else is here.

What the server sends that is not a message is dropped with a warning, within a `LineBudget` (200 warnings at
once, then 20 a second); how many were left out is logged with the next one, or when the session closes.
"""

from __future__ import annotations

import abc
import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mcpx import jsonrpc
from mcpx.errors import (
    InvalidRequest,
    McpxError,
    ParseError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamRpcError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from mcpx.jsonrpc import Message
from mcpx.log import LineBudget, get_logger
from mcpx.redact import any_registered
from mcpx.upstream.peer import (
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


@dataclass
class _Pending:
    future: asyncio.Future[Any]
    related: ClientSide | None
    progress_token: object
    forward_raw: bool


class ChannelSession(abc.ABC):
    """The session logic over a message channel; subclasses provide the channel."""

    def __init__(
        self,
        name: str,
        *,
        timeout: float,
        client: ClientSide,
        on_lost: Callable[[str], None],
    ) -> None:
        self.name = name
        self._timeout = timeout
        self._client = client
        self._on_lost = on_lost
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._server_requests = ServerRequests(name, self._send, timeout)
        self._background: set[asyncio.Task[None]] = set()
        self._open = False
        self._unreadable = LineBudget()
        self.protocol_version: str | None = None
        self.server_info: dict[str, Any] = {}
        self.capabilities: dict[str, Any] = {}
        self.instructions: str | None = None

    # --- what a subclass provides ----------------------------------------------------------------------------------

    @abc.abstractmethod
    async def _start_channel(self) -> None:
        """Open the channel (spawn the process, open the stream). Raises an `UpstreamError` on failure."""

    @abc.abstractmethod
    async def _send(self, data: bytes, *, replayable: bool = True) -> None:
        """Send one serialized message. Raises `UpstreamUnavailable` when the channel is gone. `replayable`: the
        message may be sent once more when it is unknown whether it arrived (see `peer.is_replayable`)."""

    @abc.abstractmethod
    async def _stop_channel(self) -> None:
        """Close the channel (bounded; idempotent); after it no message is received."""

    # --- lifecycle -------------------------------------------------------------------------------------------------

    @property
    def asked_roots(self) -> bool:
        return self._server_requests.asked_roots

    @property
    def _handshake_timeout(self) -> float:
        """How long the server may take to answer `initialize` (a subclass whose server must first start, such as
        a child process, allows more)."""
        return self._timeout

    async def connect(self) -> None:
        await self._shut("reconnecting")  # also cleans up after a channel that died on its own
        await self._start_channel()
        self._open = True
        try:
            result = await self.request("initialize", initialize_params(), timeout=self._handshake_timeout)
            adopt_hello(self, accept_initialize(self.name, result))
            await self.notify("notifications/initialized")
        except BaseException:
            await self._shut("initialize failed")
            raise

    async def close(self) -> None:
        await self._shut("closed")

    async def _shut(self, reason: str) -> None:
        self._open = False
        for task in list(self._background):
            task.cancel()
        self._server_requests.close()
        self._fail_pending(UpstreamUnavailable(self.name, reason))
        await self._stop_channel()
        self._report_left_out()

    # --- requests --------------------------------------------------------------------------------------------------

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
        return None  # one channel: `request` is already a future and a write

    async def request(
        self,
        method: str,
        params: dict[str, Any] | None,
        *,
        timeout: float,
        on_related: ClientSide | None = None,
        forward_raw: bool = False,
    ) -> Any:
        if not self._open:
            raise UpstreamUnavailable(self.name, "not connected")
        request_id = next(self._ids)
        meta = params.get("_meta") if params is not None else None
        token = meta.get("progressToken") if isinstance(meta, dict) else None
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = _Pending(future, on_related, token, forward_raw)
        mark: int | None = None  # set once the request is sent
        try:
            # The deadline covers the send too: a channel that takes nothing (a child that stops reading its stdin)
            # fails the call in time instead of holding it.
            async with asyncio.timeout(timeout):
                await self._send(
                    jsonrpc.dumps(jsonrpc.request(request_id, method, params)), replayable=is_replayable(method)
                )
                mark = self._output_mark()
                return await future
        except TimeoutError:
            if mark is not None:
                self._cancel_upstream(request_id, "timed out")
            raise self._timed_out(method, timeout, mark) from None
        except asyncio.CancelledError:
            if mark is not None:
                self._cancel_upstream(request_id, "cancelled by the client")
            raise
        finally:
            self._pending.pop(request_id, None)
            if future.done() and not future.cancelled():
                future.exception()  # a failure told while the request was being sent: the send raised it already

    async def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        if not self._open:
            raise UpstreamUnavailable(self.name, "not connected")
        await self._send(jsonrpc.dumps(jsonrpc.notification(method, params)))

    def _output_mark(self) -> int:
        """How far the channel's output had got once a request was sent, for `_timed_out` (0: cannot be told)."""
        return 0

    def _timed_out(self, method: str, timeout: float, mark: int | None) -> UpstreamError:
        """The error of a request not answered within `timeout`; `mark` is None when it could not even be sent."""
        if mark is None:
            return UpstreamTimeout(self.name, f"{method} could not be sent within {timeout:g} s")
        return UpstreamTimeout(self.name, f"no answer to {method} within {timeout:g} s")

    def _cancel_upstream(self, request_id: int, reason: str) -> None:
        if self._open and request_id in self._pending:
            params = {"requestId": request_id, "reason": reason}
            self._spawn(self.notify("notifications/cancelled", params))

    def _spawn(self, work: Any) -> None:
        async def guarded() -> None:
            try:
                async with asyncio.timeout(5.0):
                    await work
            except (TimeoutError, McpxError) as exc:
                _log.debug("background send failed", upstream=self.name, error=str(exc))

        task = asyncio.get_running_loop().create_task(guarded())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- what the channel delivers -----------------------------------------------------------------------------------

    def _received(self, raw: bytes) -> None:
        """One message from the server (the subclass's framer has bounded it)."""
        try:
            message = jsonrpc.validate_message(jsonrpc.loads(raw))
        except (ParseError, InvalidRequest) as exc:
            self.unreadable("upstream sent something that is not JSON-RPC", error=str(exc))
            return
        if "method" not in message:
            self._response(message, raw)
            return
        route_incoming(message, related=self._related(message), default=self._client, requests=self._server_requests)

    def unreadable(self, event: str, **fields: Any) -> None:
        """Warn that the server sent something that is not a message (within the session's budget of warnings)."""
        if not self._unreadable.take():
            return
        self._report_left_out()
        _log.warning(event, upstream=self.name, **fields)

    def _report_left_out(self) -> None:
        if left_out := self._unreadable.left_out():
            _log.warning(
                "more of what the upstream sent was not a message; left out of the log",
                upstream=self.name,
                count=left_out,
            )

    def _response(self, message: Message, raw: bytes) -> None:
        request_id = message.get("id")
        pending = self._pending.get(request_id) if isinstance(request_id, int) else None
        if pending is None or pending.future.done():
            _log.debug("response to no request in flight", upstream=self.name)
            return
        if "error" in message:
            error = message["error"]
            if isinstance(error, dict):
                pending.future.set_exception(UpstreamRpcError(self.name, error))
            else:
                pending.future.set_exception(UpstreamProtocolError(self.name, "malformed JSON-RPC error"))
        elif "result" in message:
            spliced = (
                jsonrpc.spliced_result(raw, request_id, secrets_registered=any_registered())  # type: ignore[arg-type]
                if pending.forward_raw
                else None
            )
            pending.future.set_result(spliced if spliced is not None else message["result"])
        else:
            pending.future.set_exception(UpstreamProtocolError(self.name, "response has neither result nor error"))

    def _related(self, message: Message) -> ClientSide | None:
        """The agent a server message belongs to: the one whose progress token it names, else the only agent with
        calls in flight on this session; None when that cannot be told."""
        params = message.get("params")
        token = params.get("progressToken") if isinstance(params, dict) else None
        callers = [pending.related for pending in self._pending.values() if pending.related is not None]
        if token is not None:
            for pending in self._pending.values():
                if pending.progress_token == token and pending.related is not None:
                    return pending.related
            return None
        agents = {caller.agent for caller in callers}
        return callers[0] if len(agents) == 1 else None

    def _lost(self, reason: str) -> None:
        """The channel died on its own (the process exited, the stream ended)."""
        if not self._open:
            return
        self._open = False
        self._server_requests.close()
        self._fail_pending(UpstreamUnavailable(self.name, reason))
        self._on_lost(reason)

    def _fail_pending(self, error: UpstreamError) -> None:
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(error)
