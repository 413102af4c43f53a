"""What every upstream transport shares: the session interface the supervisor and router use, the client side an
upstream's own messages go to, the initialize handshake's two halves, and the upstream's requests to the client.

Transport-free. A transport (streamable HTTP, legacy HTTP+SSE, a stdio child) parses what the server sends and
hands every server→client message to `route_incoming`; the answers to the server's requests come back through
the transport's `reply` function.

Routing rule for the server's messages (protocol 2025-11-25 `basic/transports`, and SEP-2260: sampling,
elicitation and roots requests belong to a client request):
- a message that arrives on the stream of an agent's request, or that names that request's progress token, goes
  to that agent (`related`);
- with no such link, it goes to the session's `default` client side: the owning agent for a per-agent session,
  else the router's rule (see `Router.ask_any`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from mcpx import IMPLEMENTATION, jsonrpc
from mcpx.errors import (
    INVALID_REQUEST,
    UNSUPPORTED_PROTOCOL_VERSION,
    UpstreamError,
    UpstreamHTTPError,
    UpstreamProtocolError,
    UpstreamRpcError,
    unanswered,
)
from mcpx.jsonrpc import Message, RequestId
from mcpx.log import get_logger

LATEST_HANDSHAKE_VERSION: Final = "2025-11-25"
HANDSHAKE_VERSIONS: Final = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
STATELESS_VERSION: Final = "2026-07-28"
# The `_meta` keys of protocol 2026-07-28: a request's envelope (`basic/index`, per-request protocol fields), a
# result's server, and the listen stream a notification came on (`basic/patterns/subscriptions`).
PROTOCOL_VERSION_KEY: Final = "io.modelcontextprotocol/protocolVersion"
CLIENT_CAPABILITIES_KEY: Final = "io.modelcontextprotocol/clientCapabilities"
CLIENT_INFO_KEY: Final = "io.modelcontextprotocol/clientInfo"
LOG_LEVEL_KEY: Final = "io.modelcontextprotocol/logLevel"
SERVER_INFO_KEY: Final = "io.modelcontextprotocol/serverInfo"
SUBSCRIPTION_ID_KEY: Final = "io.modelcontextprotocol/subscriptionId"
# The requests a 2026-07-28 server may answer with `input_required` (`basic/patterns/mrtr`).
MRTR_METHODS: Final = frozenset({"tools/call", "resources/read", "prompts/get"})
# The routing headers disagree with the body (`basic/transports/streamable-http`: HTTP 400 with this error).
HEADER_MISMATCH: Final = -32020
# JSON-RPC error codes only a 2026-07-28 server sends (HeaderMismatch, MissingRequiredClientCapability,
# UnsupportedProtocolVersion). An HTTP 400/404/405 whose body holds one comes from such a server, which a client
# must not take for a legacy HTTP+SSE one (2026-07-28 `basic/transports`, backwards compatibility).
STATELESS_ERA_CODES: Final = frozenset({HEADER_MISMATCH, -32021, UNSUPPORTED_PROTOCOL_VERSION})

# Requests whose effects a second copy could repeat (a tool may create, send or pay). Every other request mcpx sends
# reads, or sets what a second copy sets again, so it may be sent once more when a connection fails before any
# answer (RFC 9110 §9.2.2).
_NOT_REPLAYABLE: Final = frozenset({"tools/call"})

# What mcpx declares to upstreams: it bridges these to the agents that declare them.
CLIENT_CAPABILITIES: Final = {"roots": {"listChanged": True}, "sampling": {}, "elicitation": {"form": {}, "url": {}}}

# Server notifications that belong to one client request when they name it (progress by its token).
RELATED_NOTIFICATIONS: Final = frozenset({"notifications/progress", "notifications/message"})

# At most this many of one session's requests to the client wait for an answer; more get an error at once.
_MAX_PENDING_SERVER_REQUESTS: Final = 64

_log = get_logger("mcpx.upstream")


def asks_for_stateless(exc: UpstreamError) -> bool:
    """Whether a server's refusal of `initialize` says it speaks protocol 2026-07-28 and not the handshake: an
    HTTP 4xx whose body is an error only such a server sends (2026-07-28 `basic/transports`), or the JSON-RPC
    error UnsupportedProtocolVersion listing 2026-07-28 and no handshake version (`basic/versioning`)."""
    if isinstance(exc, UpstreamHTTPError):
        return 400 <= exc.status < 500 and exc.rpc_code in STATELESS_ERA_CODES
    if isinstance(exc, UpstreamRpcError) and exc.error.get("code") == UNSUPPORTED_PROTOCOL_VERSION:
        data = exc.error.get("data")
        supported = data.get("supported") if isinstance(data, dict) else None
        return (
            isinstance(supported, list)
            and STATELESS_VERSION in supported
            and not any(version in HANDSHAKE_VERSIONS for version in supported)
        )
    return False


def is_replayable(method: str) -> bool:
    """Whether a request of `method` may be sent once more when it is unknown whether the server took it."""
    return method not in _NOT_REPLAYABLE


class ClientSide(Protocol):
    """Where an upstream's messages to the client go."""

    @property
    def agent(self) -> object:
        """The agent this reaches (any hashable identity), or None when it is not one agent."""
        ...

    def notify(self, message: Message) -> None:
        """Deliver a server notification (the client side maps what it owns, e.g. progress tokens)."""
        ...

    async def ask(self, method: str, params: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
        """Put a server request to the client; return `{"result": …}` or `{"error": …}`. Never raises but
        `CancelledError`."""
        ...


NotificationHandler = Callable[[Message], None]
# Told, synchronously, how a started request ended: (result, None), or (None, the error; CancelledError if cancelled).
Settled = Callable[[Any, BaseException | None], None]


class UpstreamSession(Protocol):
    """One MCP client session with one upstream, over whatever transport it speaks."""

    name: str
    protocol_version: str | None
    server_info: dict[str, Any]
    capabilities: dict[str, Any]
    instructions: str | None

    async def connect(self) -> None:
        """(Re-)run the initialize handshake. Raises an `UpstreamError` subclass (or `NeedsLogin`) on failure."""
        ...

    async def close(self) -> None:
        """End the session (bounded, best effort)."""
        ...

    async def request(
        self,
        method: str,
        params: dict[str, Any] | None,
        *,
        timeout: float,
        on_related: ClientSide | None = None,
        forward_raw: bool = False,
    ) -> Any:
        """Send one request; return its result (a `jsonrpc.RawJson` where `forward_raw` allows)."""
        ...

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
        """The same request started without a task where the transport can (its fast path): tells `on_settled` how
        it ended (what `request` returns or raises) the moment it ends, and returns a future that ends then too
        (with None) and cancels the call, upstream as well, when cancelled. None where it cannot start so: then
        call `request`."""
        ...

    async def notify(self, method: str, params: dict[str, Any] | None = None) -> None: ...

    @property
    def asked_roots(self) -> bool:
        """Whether the server ever asked for `roots/list` (it then hears of the agents' root changes)."""
        ...


def settle_in_task(make: Callable[[], Awaitable[Any]], on_settled: Settled) -> asyncio.Task[None]:
    """Run `make()` in a task of its own and tell `on_settled` how it ended, from inside the task: no turn of the
    loop between the end and the one told. The task ends with None, or cancelled (which is told too). The work is
    made inside the task, so a task cancelled before its first step makes none (no coroutine is left never
    awaited) and is told it was cancelled when it ends."""
    started = False

    async def run() -> None:
        nonlocal started
        started = True
        try:
            result = await make()
        except asyncio.CancelledError as cancelled:
            on_settled(None, cancelled)
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the one told, who answers for it
            on_settled(None, exc)
        else:
            on_settled(result, None)

    def ended(_: asyncio.Task[None]) -> None:
        if not started:
            on_settled(None, asyncio.CancelledError())

    task = asyncio.get_running_loop().create_task(run())
    task.add_done_callback(ended)
    return task


# --- the handshake ---------------------------------------------------------------------------------------------------


def initialize_params() -> dict[str, Any]:
    return {
        "protocolVersion": LATEST_HANDSHAKE_VERSION,
        "capabilities": CLIENT_CAPABILITIES,
        "clientInfo": IMPLEMENTATION,
    }


@dataclass(frozen=True)
class ServerHello:
    """What an upstream's `InitializeResult` tells mcpx."""

    protocol_version: str
    capabilities: dict[str, Any]
    server_info: dict[str, Any]
    instructions: str | None


def accept_initialize(upstream: str, result: object) -> ServerHello:
    """Check an `InitializeResult`. Raises `UpstreamProtocolError` when mcpx cannot use it."""
    if not isinstance(result, dict):
        raise UpstreamProtocolError(upstream, "initialize result is not an object")
    version = result.get("protocolVersion")
    if version not in HANDSHAKE_VERSIONS:
        raise UpstreamProtocolError(upstream, f"unsupported protocol version {version!r}")
    capabilities, server_info, instructions = (
        result.get("capabilities"),
        result.get("serverInfo"),
        result.get("instructions"),
    )
    return ServerHello(
        protocol_version=str(version),
        capabilities=capabilities if isinstance(capabilities, dict) else {},
        server_info=server_info if isinstance(server_info, dict) else {},
        instructions=instructions if isinstance(instructions, str) else None,
    )


def adopt_hello(session: UpstreamSession, hello: ServerHello) -> None:
    """Record on `session` what the server said about itself."""
    session.protocol_version = hello.protocol_version
    session.capabilities, session.server_info, session.instructions = (
        hello.capabilities,
        hello.server_info,
        hello.instructions,
    )


# --- the server's requests to the client -------------------------------------------------------------------------


class ServerRequests:
    """The requests one upstream session has put to the client and not had answered yet.

    `ping` is answered here; every other request is asked of a client side in a task owned by this object, and
    its answer is sent back with `reply`. The server's `notifications/cancelled` for one of them cancels the
    task (the agent is told in turn). `asked_roots` records whether the server ever asked `roots/list`, so that
    the agents' `notifications/roots/list_changed` reaches only servers that care.
    """

    def __init__(self, upstream: str, reply: Callable[[bytes], Awaitable[None]], timeout: float) -> None:
        self._upstream = upstream
        self._reply = reply
        self._timeout = timeout
        self._pending: dict[RequestId, asyncio.Task[None]] = {}
        # the client request each pending one arrived under (on that request's own stream), where known
        self._call_of: dict[RequestId, object] = {}
        self._answering: set[asyncio.Task[None]] = set()
        self.asked_roots = False

    def handle(self, message: Message, client: ClientSide, call: object = None) -> None:
        request_id: RequestId = message["id"]
        method: str = message["method"]
        params = message.get("params")
        if method == "ping":
            self._answer(request_id, {"result": {}})
            return
        if method == "roots/list":
            self.asked_roots = True
        if request_id in self._pending or len(self._pending) >= _MAX_PENDING_SERVER_REQUESTS:
            why = "too many requests to the client in flight, or a reused id"
            self._answer(request_id, unanswered(method, why, code=INVALID_REQUEST))
            return
        task = asyncio.get_running_loop().create_task(
            self._ask(request_id, method, params if isinstance(params, dict) else None, client)
        )
        self._pending[request_id] = task
        if call is not None:
            self._call_of[request_id] = call
        task.add_done_callback(lambda _: self._forget(request_id))

    def _forget(self, request_id: RequestId) -> None:
        self._pending.pop(request_id, None)
        self._call_of.pop(request_id, None)

    def withdraw(self, call: object) -> None:
        """The client request `call` ended without its answer (cancelled, timed out): the requests the server
        made under it can no longer be answered, so the agent stops being asked."""
        for request_id in [request_id for request_id, owner in self._call_of.items() if owner == call]:
            task = self._pending.pop(request_id, None)
            if task is not None:
                task.cancel()

    def cancelled(self, params: object) -> bool:
        """The server cancelled one of its requests (`notifications/cancelled`); True when it was one of ours."""
        request_id = params.get("requestId") if isinstance(params, dict) else None
        task = self._pending.pop(request_id, None) if jsonrpc.is_request_id(request_id) else None  # type: ignore[arg-type]
        if task is None:
            return False
        task.cancel()
        return True

    def close(self) -> None:
        for task in (*self._pending.values(), *self._answering):
            task.cancel()
        self._pending.clear()

    async def _ask(self, request_id: RequestId, method: str, params: dict[str, Any] | None, client: ClientSide) -> None:
        answer = await client.ask(method, params, self._timeout)
        await self._send(request_id, answer)

    def _answer(self, request_id: RequestId, answer: dict[str, Any]) -> None:
        if len(self._answering) >= _MAX_PENDING_SERVER_REQUESTS:
            # A server that floods (pings, or requests past the limit) faster than its answers go out: each answer
            # is a POST, maybe on a connection of its own. It gets no more until some have gone.
            _log.debug("answer to a server request dropped: too many in flight", upstream=self._upstream)
            return
        task = asyncio.get_running_loop().create_task(self._send(request_id, answer))
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def _send(self, request_id: RequestId, answer: dict[str, Any]) -> None:
        try:
            async with asyncio.timeout(10.0):
                await self._reply(jsonrpc.dumps({"jsonrpc": jsonrpc.JSONRPC_VERSION, "id": request_id, **answer}))
        except Exception as exc:  # noqa: BLE001 - task top: a lost answer must not end the session
            _log.debug("answer to a server request not delivered", upstream=self._upstream, error=str(exc))


def route_incoming(
    message: Message,
    *,
    related: ClientSide | None,
    default: ClientSide,
    requests: ServerRequests,
    call: object = None,
) -> None:
    """Deliver one message the server sent to the client (a request or a notification, never a response).
    `call` is the client request on whose stream it arrived, if any."""
    method = message["method"]
    if "id" in message:
        requests.handle(message, related if related is not None else default, call)
    elif method == "notifications/cancelled" and requests.cancelled(message.get("params")):
        return
    elif related is not None and method in RELATED_NOTIFICATIONS:
        related.notify(message)
    else:
        default.notify(message)


async def first_of(*events: asyncio.Event) -> None:
    """Return as soon as any of `events` is set."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
