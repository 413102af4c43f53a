"""One agent connection: parsed JSON-RPC messages in, responses and notifications out.

Transport-free: the socket layer feeds it lines and gives it a `send` function. Every agent request that goes
upstream runs as a task owned by this session, keyed by the agent's own request id, so a response carries
exactly the id the agent sent and `notifications/cancelled` can stop it. Control requests from `mcpxctl`
(`mcpx/status`, `mcpx/tools`, `mcpx/reload`, `mcpx/login`, `mcpx/logout`) arrive on the same socket and are
answered here too.

Both protocol eras are served, per request as a dual-era server does (2026-07-28 `basic/versioning`): a request
with a 2026-07-28 `_meta` envelope is served statelessly (`downstream/modern.py`), anything else as in the
handshake era. An agent that never sent `initialize` hears only what its `subscriptions/listen` streams ask for.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final, Protocol

from mcpx import IMPLEMENTATION, jsonrpc
from mcpx.audit import timestamp as audit_timestamp
from mcpx.downstream import modern
from mcpx.downstream.peercred import PeerCredentials
from mcpx.errors import (
    INTERNAL_ERROR,
    AgentError,
    InvalidParams,
    InvalidRequest,
    McpxError,
    MethodNotFound,
    NeedsLogin,
    UpstreamError,
    UpstreamRpcError,
    jsonrpc_error,
    tool_error_result,
    unanswered,
)
from mcpx.jsonrpc import Message, RequestId
from mcpx.log import get_logger
from mcpx.redact import scrub
from mcpx.router.router import LIST_METHODS, Router, list_response
from mcpx.upstream.peer import (
    CLIENT_CAPABILITIES_KEY,
    HANDSHAKE_VERSIONS,
    LATEST_HANDSHAKE_VERSION,
    MRTR_METHODS,
    PROTOCOL_VERSION_KEY,
    STATELESS_VERSION,
)

_log = get_logger("mcpx.agent")

_LIST_CHANGED: Final = {
    kind: jsonrpc.dumps(jsonrpc.notification(f"notifications/{kind}/list_changed"))
    for kind in ("tools", "prompts", "resources")
}


class Control(Protocol):
    """What the daemon offers `mcpxctl` (implemented by `mcpx.daemon.Daemon`)."""

    def status(self) -> dict[str, Any]: ...

    def reload(self) -> Awaitable[dict[str, Any]]:
        """Start re-reading and applying the config: the work is the daemon's and ends even when whoever asked has
        gone away; the awaitable gives its outcome."""
        ...

    async def logout(self, upstream: str) -> dict[str, Any]: ...

    async def login(
        self, upstream: str, action: str, response: str | None, timeout: object = None
    ) -> dict[str, Any]: ...


class AgentSession:
    def __init__(self, router: Router, control: Control, send: Callable[[bytes], None], peer: PeerCredentials) -> None:
        self._router = router
        self._control = control
        self._send = send
        self.peer = peer
        self.initialized = False
        self.client_info: dict[str, Any] = {}
        self.protocol_version: str | None = None
        self._client_capabilities: dict[str, Any] = {}
        # Requests in flight: a task, or the future of a tool call that runs without one (the upstream's fast path).
        self._in_flight: dict[RequestId, asyncio.Future[Any]] = {}
        # mcpx's own requests to the agent (an upstream's elicitation, sampling, roots) awaiting its answer
        self._asks: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._ask_ids = itertools.count(1)
        self._closed = False
        # Protocol 2026-07-28: whether the agent has sent such a request; its calls that wait for its retry with
        # answers (by requestState); its subscriptions/listen streams, and how many of them name each resource.
        self._modern = False
        self._suspended: dict[str, modern.ModernCall] = {}
        self._listens: dict[RequestId, modern.Listen] = {}
        self._listened_uris: Counter[str] = Counter()

    # --- input ---------------------------------------------------------------------------------------------------

    def on_line(self, line: bytes) -> None:
        try:
            parsed = jsonrpc.loads(line)
        except AgentError as exc:
            self.send_message(jsonrpc.error_response(None, jsonrpc_error(exc)))
            return
        try:
            message = jsonrpc.validate_message(parsed)
        except AgentError as exc:
            # A request whose id can be read is answered under it (JSON-RPC 2.0 §5: null only when it cannot be),
            # else its caller would wait for that id forever.
            request_id = parsed.get("id") if isinstance(parsed, dict) and "method" in parsed else None
            self.send_message(
                jsonrpc.error_response(request_id if jsonrpc.is_request_id(request_id) else None, jsonrpc_error(exc))
            )
            return
        method = message.get("method")
        if method is None:
            self._on_answer(message)
        elif "id" in message:
            self._on_request(message["id"], method, message.get("params") or {})
        else:
            self._on_notification(method, message.get("params") or {})

    def on_oversized(self, limit: int) -> None:
        error = InvalidRequest(f"message larger than the {limit}-byte limit was dropped")
        self.send_message(jsonrpc.error_response(None, jsonrpc_error(error)))

    def close(self) -> None:
        """The connection is gone: stop its calls and its notifications."""
        self._closed = True
        self._router.unsubscribe(self._on_catalog_changed)
        self._router.agent_left(self)  # (an agent may call tools without the handshake: its state goes too)
        for task in self._in_flight.values():
            task.cancel()
        self._in_flight.clear()
        self._let_go_of_suspended()
        self._listens.clear()
        for future in self._asks.values():
            if not future.done():  # the upstream gets an answer now rather than waiting out its deadline
                future.set_result(unanswered("request", "the agent has disconnected", code=INTERNAL_ERROR))
        self._asks.clear()

    # --- requests ------------------------------------------------------------------------------------------------

    def _on_request(self, request_id: RequestId, method: str, params: dict[str, Any]) -> None:
        if self._closed:
            return  # (the rest of a batch read before the connection closed: no one to answer, nothing to start)
        if request_id in self._in_flight or request_id in self._listens:
            error = InvalidRequest(f"request id {request_id!r} is already in use by a request in flight")
            self.send_message(jsonrpc.error_response(request_id, jsonrpc_error(error)))
            return
        try:
            envelope = modern.envelope(params)
            if envelope is not None:
                self._on_modern_request(request_id, method, params, envelope)
            elif method == "tools/call":
                self._call_tool_at_once(request_id, params)
            elif method in LIST_METHODS:
                self._list(request_id, method, params.get("cursor"))
            elif method in self._ROUTED:
                route = getattr(self._router, self._ROUTED[method])
                self._spawn_forward(request_id, functools.partial(route, params, self))
            elif method == "logging/setLevel":
                if not isinstance(params.get("level"), str):
                    raise InvalidParams('logging/setLevel needs a string "level"')
                self._spawn_forward(request_id, functools.partial(self._router.set_log_level, params, self))
            elif method == "ping":
                self._reply(request_id, {})
            elif method == "initialize":
                self._answer_once_settled(request_id, lambda: self._reply(request_id, self._initialize(params)))
            elif method == "server/discover":
                raise InvalidParams(
                    f"server/discover needs the {STATELESS_VERSION} envelope in _meta "
                    f"('{PROTOCOL_VERSION_KEY}', '{CLIENT_CAPABILITIES_KEY}')"
                )
            elif method == "mcpx/status":
                self._reply(request_id, {**self._control.status()})
            elif method == "mcpx/tools":
                routes = self._router.catalog.routes.items()
                self._reply(request_id, {"routes": {n: {"upstream": r.upstream, "tool": r.tool} for n, r in routes}})
            elif method == "mcpx/reload":
                reload = self._control.reload()  # (started now: a requester gone at once does not stop it)
                self._spawn_forward(request_id, lambda: asyncio.shield(reload))
            elif method == "mcpx/logout":
                upstream = params.get("upstream")
                if not isinstance(upstream, str):
                    raise InvalidParams('mcpx/logout needs a string "upstream"')
                self._spawn_forward(request_id, functools.partial(self._control.logout, upstream))
            elif method == "mcpx/login":
                upstream, action, response = (
                    params.get("upstream"),
                    params.get("action", "start"),
                    params.get("response"),
                )
                if not isinstance(upstream, str) or not isinstance(action, str):
                    raise InvalidParams('mcpx/login needs a string "upstream" and "action"')
                if response is not None and not isinstance(response, str):
                    raise InvalidParams('mcpx/login "response" must be a string')
                login = functools.partial(self._control.login, upstream, action, response, params.get("timeout"))
                self._spawn_forward(request_id, login)
            else:
                raise MethodNotFound(f"method not found: {method}")
        except McpxError as exc:
            self.send_message(jsonrpc.error_response(request_id, jsonrpc_error(exc)))
        except Exception:  # noqa: BLE001 - a bug in mcpx: the agent still gets an answer, the session goes on
            self._internal_error(request_id)

    # --- protocol 2026-07-28 ----------------------------------------------------------------------------------

    def _on_modern_request(
        self, request_id: RequestId, method: str, params: dict[str, Any], envelope: modern.Envelope
    ) -> None:
        """Serve one request that carries a 2026-07-28 envelope (raises `AgentError`s for `_on_request`)."""
        modern.refuse_removed(method)
        if not self._modern:
            self._modern = True
            if not self.client_info:
                self.client_info = envelope.client_info
            self._join()
        params = modern.without_envelope(params)
        if method == "server/discover":
            self._answer_once_settled(request_id, lambda: self._reply(request_id, self._discover()))
        elif method == "subscriptions/listen":
            listen = modern.listen_request(request_id, params, self._router.capabilities())
            self._spawn(request_id, functools.partial(self._open_listen, listen))
        elif method in LIST_METHODS:
            self._list(request_id, method, params.get("cursor"), modern.LIST_EXTRA)
        elif method in MRTR_METHODS:
            # (the answers and the state are mcpx's, not the upstream's)
            state, answers = params.pop("requestState", None), params.pop("inputResponses", None)
            if state is not None:
                self._resume(request_id, method, state, answers)
                return
            waiting = modern.ModernCall(
                method,
                request_id,
                envelope,
                send=self._send_message_now,
                unrelated=self._deliver_listened,
                on_suspend=self._suspend,
            )
            if method == "tools/call":
                self._call_tool_at_once(request_id, params, waiting)
                return
            route = getattr(self._router, self._ROUTED[method])
            cacheable = method == "resources/read"
            call = functools.partial(route, params, self, waiting)
            self._spawn_forward(request_id, call, stateless=True, cacheable=cacheable, waiting=waiting)
            waiting.future = self._in_flight[request_id]
        elif method == "completion/complete":
            self._spawn_forward(request_id, functools.partial(self._router.complete, params, self), stateless=True)
        else:
            raise MethodNotFound(f"method not found: {method}")

    def _discover(self) -> dict[str, Any]:
        return modern.discover_result(self._router.capabilities(), self._router.instructions())

    def _suspend(self, call: modern.ModernCall, request_id: RequestId) -> None:
        """`call` answered the agent's request `request_id` with input requests: it waits for the agent's retry."""
        if self._in_flight.get(request_id) is call.future:
            del self._in_flight[request_id]
        if len(self._suspended) >= modern.MAX_SUSPENDED:
            self._suspended.pop(next(iter(self._suspended))).cancel()
        self._suspended[call.state] = call

    def _let_go_of_suspended(self) -> None:
        """Cancel the calls that wait for the agent's retry (no answer is owed: the agent has its input_required)."""
        for call in self._suspended.values():
            call.cancel()
        self._suspended.clear()

    def _resume(self, request_id: RequestId, method: str, state: object, answers: object) -> None:
        """The agent sent a request again with the answers to the input requests mcpx gave it."""
        call = self._suspended.get(state) if isinstance(state, str) else None
        if call is None or call.method != method:
            raise InvalidParams(f"{method}: requestState is unknown or expired; send the request again without it")
        del self._suspended[call.state]
        if call.future is not None and not call.future.done():
            self._in_flight[request_id] = call.future
        call.resume(request_id, answers if isinstance(answers, dict) else {})

    def _finish_waiting(self, call: modern.ModernCall, answer: Callable[[RequestId], None]) -> None:
        """The upstream has answered a 2026-07-28 call: answer the agent's request that waits for it, or keep the
        answer for the agent's retry (`HELD_ANSWER_SECONDS`)."""
        request_id = call.answer_id
        if call.finish(answer):
            if request_id is not None and self._in_flight.get(request_id) is call.future:
                del self._in_flight[request_id]
            return
        loop = asyncio.get_running_loop()
        loop.call_later(modern.HELD_ANSWER_SECONDS, lambda: self._suspended.pop(call.state, None))

    async def _open_listen(self, listen: modern.Listen) -> None:
        """Open a `subscriptions/listen` stream: subscribe to the resources it names, acknowledge what it will get,
        then deliver (`_on_catalog_changed`, `send_message`). It lasts until the agent cancels it or goes."""
        honored: set[str] = set()
        try:
            for uri in sorted(listen.uris):
                if self._listened_uris[uri] == 0:
                    try:
                        await self._router.subscribe_resource({"uri": uri}, self)
                    except McpxError as exc:
                        _log.debug("a listen's resource subscription failed", uri=uri, error=str(exc))
                        continue
                self._listened_uris[uri] += 1
                honored.add(uri)
        except asyncio.CancelledError:  # cancelled, or the agent went, while subscribing: let go of what it holds
            self._stop_listening_to(honored)
            raise
        listen.uris = frozenset(honored)
        self._listens[listen.request_id] = listen
        self._send_message_now(listen.acknowledgement())

    def _close_listen(self, request_id: RequestId) -> None:
        listen = self._listens.pop(request_id, None)
        if listen is not None:
            self._stop_listening_to(listen.uris)

    def _stop_listening_to(self, uris: Iterable[str]) -> None:
        """A listen stream no longer hears of `uris`: the upstream subscriptions no other stream needs end (after
        `close`, the router has let go of all of the agent's)."""
        for uri in uris:
            self._listened_uris[uri] -= 1
            if self._listened_uris[uri] <= 0:
                del self._listened_uris[uri]
                if not self._closed:
                    self._router.unsubscribe_in_background(uri, self)

    # Agent requests answered by one router method, called with (params, this session).
    _ROUTED: Final = {
        "resources/read": "read_resource",
        "resources/subscribe": "subscribe_resource",
        "resources/unsubscribe": "unsubscribe_resource",
        "prompts/get": "get_prompt",
        "completion/complete": "complete",
    }

    def _initialize(self, params: dict[str, Any]) -> dict[str, Any]:
        requested = params.get("protocolVersion")
        self.protocol_version = requested if requested in HANDSHAKE_VERSIONS else LATEST_HANDSHAKE_VERSION
        client_info, capabilities = params.get("clientInfo"), params.get("capabilities")
        self.client_info = client_info if isinstance(client_info, dict) else {}
        self._client_capabilities = capabilities if isinstance(capabilities, dict) else {}
        if not self.initialized:
            self.initialized = True
            self._join()
        result: dict[str, Any] = {
            "protocolVersion": self.protocol_version,
            "capabilities": self._router.capabilities(),
            "serverInfo": IMPLEMENTATION,
        }
        instructions = self._router.instructions()
        if instructions is not None:
            result["instructions"] = instructions
        return result

    def _join(self) -> None:
        """The agent introduced itself (its first `initialize`, or its first 2026-07-28 request): called as the
        first of the two sets its flag."""
        if self.initialized and self._modern:
            return  # (joined already, in the other era)
        self._router.subscribe(self._on_catalog_changed)
        self._router.agent_joined(self)
        _log.info("agent connected", client=self.client_info.get("name"), pid=self.peer.pid)

    def _answer_once_settled(self, request_id: RequestId, answer: Callable[[], None]) -> None:
        """Run `answer()`, which sends the request's response, once the upstreams have settled (what it tells of,
        capabilities or lists, is theirs): at once, or after a bounded wait for their first attempts in the
        request's task, where an `McpxError` it raises is answered as `_on_request` answers one."""
        if self._router.settled:
            answer()
            return

        async def when_settled() -> None:
            await self._router.wait_settled(self._router.config.daemon.connect_timeout)
            try:
                answer()
            except McpxError as exc:
                self.send_message(jsonrpc.error_response(request_id, jsonrpc_error(exc)))

        self._spawn(request_id, when_settled)

    def _list(self, request_id: RequestId, method: str, cursor: object, extra: bytes = b"") -> None:
        """Answer one of the `LIST_METHODS` (`extra`: see `list_response`), once the upstreams have settled."""
        self._answer_once_settled(
            request_id, lambda: self._send(list_response(request_id, method, self._router, cursor, extra))
        )

    async def _forward(
        self,
        request_id: RequestId,
        call: Awaitable[Any],
        *,
        stateless: bool = False,
        cacheable: bool = False,
        waiting: modern.ModernCall | None = None,
    ) -> None:
        """Answer with the upstream's result, or with its JSON-RPC error, or with mcpx's own error. A 2026-07-28
        request (`stateless`) gets a 2026-07-28 result; one that may have asked the agent for input (`waiting`) is
        answered under the id of the agent's latest retry."""
        answer: Callable[[RequestId], None]
        try:
            result = await call
        except McpxError as exc:
            error = jsonrpc_error(exc)
            answer = lambda answer_id: self.send_message(jsonrpc.error_response(answer_id, error))  # noqa: E731
        else:
            result = {} if result is None else result
            if stateless:
                result = modern.complete(result, cacheable=cacheable)
            answer = functools.partial(self._reply, result=result)
        if waiting is None:
            answer(request_id)
        else:
            self._finish_waiting(waiting, answer)

    def _call_tool_at_once(
        self, request_id: RequestId, params: dict[str, Any], waiting: modern.ModernCall | None = None
    ) -> None:
        """Start `tools/call` (without a task where the router can); it is answered the moment it ends."""
        call = _ToolCall(self, request_id, params, waiting)
        future = self._router.start_call_tool(params, self, call.settled, waiting)
        if not call.ended:
            call.future = self._in_flight[request_id] = future
            if waiting is not None:
                waiting.future = future

    def _answer_call(
        self,
        request_id: RequestId,
        params: dict[str, Any],
        started: float,
        result: Any,
        error: BaseException | None,
        *,
        stateless: bool = False,
    ) -> None:
        """Answer a tool call and audit it. Upstream failures become tool errors the model can read; the agent's
        own mistakes and the upstream's JSON-RPC errors are JSON-RPC errors. Anything else is raised."""
        if error is None:
            outcome = "ok"
            self._reply(request_id, modern.complete(result) if stateless else result)
        elif isinstance(error, UpstreamRpcError):
            outcome = "upstream_rpc_error"
            self.send_message(jsonrpc.error_response(request_id, jsonrpc_error(error)))
        elif isinstance(error, NeedsLogin | UpstreamError):
            outcome = "needs_login" if isinstance(error, NeedsLogin) else "upstream_error"
            failure = tool_error_result(error)
            self._reply(request_id, modern.complete(failure) if stateless else failure)
        elif isinstance(error, AgentError):
            outcome = "agent_error"
            self.send_message(jsonrpc.error_response(request_id, jsonrpc_error(error)))
        else:
            self._audit(params, "internal_error", time.monotonic() - started, None)
            raise error
        self._audit(params, outcome, time.monotonic() - started, result)

    def _audit(self, params: dict[str, Any], outcome: str, seconds: float, result: Any) -> None:
        audit = self._router.audit
        if audit is None:
            return
        if outcome == "ok" and jsonrpc.top_level_field(result, "isError") is True:
            outcome = "tool_error"
        name = params.get("name")
        route = self._router.catalog.routes.get(name) if isinstance(name, str) else None
        entry: dict[str, Any] = {
            "time": audit_timestamp(),
            "agent": self.client_info.get("name"),
            "pid": self.peer.pid,
            "upstream": route.upstream if route is not None else None,
            "tool": name,
            "ms": round(seconds * 1000, 1),
            "outcome": outcome,
        }
        if self._router.config.daemon.audit_arguments:
            entry["arguments"] = params.get("arguments")
        audit.record(entry)

    def _spawn(self, request_id: RequestId, make: Callable[[], Awaitable[None]]) -> None:
        """Run `make()` as the request's task. The work is made inside the task: a task cancelled before its first
        step (an agent that sends a request and its cancellation, or its request and its end, in one write) then
        leaves no coroutine never awaited, and does nothing."""

        async def run() -> None:
            try:
                await make()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - task top: one bad request must not end the session
                self._internal_error(request_id)
            finally:
                if self._in_flight.get(request_id) is asyncio.current_task():
                    del self._in_flight[request_id]  # (not a later request that reuses the id)

        self._in_flight[request_id] = asyncio.get_running_loop().create_task(run())

    def _spawn_forward(
        self,
        request_id: RequestId,
        make_call: Callable[[], Awaitable[Any]],
        *,
        stateless: bool = False,
        cacheable: bool = False,
        waiting: modern.ModernCall | None = None,
    ) -> None:
        """`_spawn` of `_forward` of the call `make_call()` makes."""
        self._spawn(
            request_id,
            lambda: self._forward(request_id, make_call(), stateless=stateless, cacheable=cacheable, waiting=waiting),
        )

    def _internal_error(self, request_id: RequestId) -> None:
        """Answer a request that failed on a bug in mcpx (logged with its traceback: call from an except block)."""
        _log.exception("request failed unexpectedly", id=request_id)
        error = {"code": -32603, "message": "internal error in mcpx (see the daemon log)"}
        self.send_message(jsonrpc.error_response(request_id, error))

    # --- mcpx's requests to the agent (an upstream's elicitation, sampling and roots requests) --------------------

    @property
    def client_capabilities(self) -> dict[str, Any]:
        return self._client_capabilities

    async def ask(self, method: str, params: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
        """Put a request to the agent under an id of mcpx's own; its answer (result or error) comes back as is."""
        if self._closed:
            return unanswered(method, "the agent has disconnected", code=INTERNAL_ERROR)
        request_id = f"mcpx-{next(self._ask_ids)}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._asks[request_id] = future
        self.send_message(jsonrpc.request(request_id, method, params))
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            self._cancel_ask(request_id, "timed out")
            return unanswered(method, f"the agent did not answer within {timeout:g} s", code=INTERNAL_ERROR)
        except asyncio.CancelledError:
            self._cancel_ask(request_id, "cancelled by the server")
            raise
        finally:
            self._asks.pop(request_id, None)

    def _cancel_ask(self, request_id: str, reason: str) -> None:
        if not self._closed:
            self.send_message(
                jsonrpc.notification("notifications/cancelled", {"requestId": request_id, "reason": reason})
            )

    def _on_answer(self, message: Message) -> None:
        future = self._asks.get(message["id"]) if isinstance(message.get("id"), str) else None
        if future is None or future.done():
            _log.debug("ignoring a response to no request of mcpx", id=message.get("id"))
        elif isinstance(message.get("error"), dict):
            future.set_result({"error": message["error"]})
        elif "result" in message:
            future.set_result({"result": message["result"]})
        else:
            future.set_result(
                unanswered("response", "the agent answered with neither result nor error", code=INTERNAL_ERROR)
            )

    # --- notifications -------------------------------------------------------------------------------------------

    def _on_notification(self, method: str, params: dict[str, Any]) -> None:
        if method == "notifications/cancelled":
            request_id = params.get("requestId")
            if not jsonrpc.is_request_id(request_id):
                return
            task = self._in_flight.pop(request_id, None)  # type: ignore[arg-type]
            if task is not None:
                task.cancel()  # MCP: no response is sent for a cancelled request
            self._close_listen(request_id)  # type: ignore[arg-type]
        elif method == "notifications/roots/list_changed":
            self._router.roots_changed(self)
        elif method != "notifications/initialized":
            _log.debug("agent notification ignored", method=method)

    def _on_catalog_changed(self, kind: str) -> None:
        if self._closed:
            return
        if self.initialized:
            self._send(_LIST_CHANGED[kind])
        for listen in self._listens.values():
            if kind in listen.kinds:
                self._send_message_now(listen.tagged(jsonrpc.notification(f"notifications/{kind}/list_changed")))

    # --- output --------------------------------------------------------------------------------------------------

    def _reply(self, request_id: RequestId, result: Any) -> None:
        self.send_message(jsonrpc.result_response(request_id, result))

    def send_message(self, message: Message) -> None:
        """Send a response, or a server notification that belongs to no call of a 2026-07-28 request. An agent that
        never sent `initialize` gets such a notification only on a listen stream that asked for it."""
        if self._modern and not self.initialized and "method" in message and "id" not in message:
            self._deliver_listened(message)
            return
        self._send_message_now(message)

    def _send_message_now(self, message: Message) -> None:
        if not self._closed:
            self._send(scrub(jsonrpc.dumps(message)))

    def _deliver_listened(self, message: Message) -> None:
        params = message.get("params")
        uri = params.get("uri") if isinstance(params, dict) else None
        if message.get("method") != "notifications/resources/updated" or not isinstance(uri, str):
            return  # (log messages need a request's log level; progress and the rest belong to requests)
        for listen in self._listens.values():
            if uri in listen.uris:
                self._send_message_now(listen.tagged(message))

    async def drain(self, timeout: float) -> int:
        """The daemon is stopping (the caller no longer hands this session new requests): wait up to `timeout`
        seconds for the requests in flight, then cancel those still running and answer each with a JSON-RPC error,
        so that no request goes unanswered. Returns how many were cut short."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._in_flight and (left := deadline - loop.time()) > 0:
            await asyncio.wait(list(self._in_flight.values()), timeout=left)
        for listen in self._listens.values():
            self._send_message_now(listen.ended())
        self._listens.clear()
        self._let_go_of_suspended()
        cut = list(self._in_flight.items())
        for _, task in cut:
            task.cancel()
        if cut:
            await asyncio.wait([task for _, task in cut], timeout=1.0)
        error = jsonrpc_error(McpxError(f"mcpx is stopping and this request did not finish within {timeout:g} s"))
        for request_id, _ in cut:
            if not self._closed:
                self._send(scrub(jsonrpc.dumps(jsonrpc.error_response(request_id, error))))
        return len(cut)


class _ToolCall:
    """One agent's `tools/call` in flight: answered and audited when the router says how it ended."""

    __slots__ = ("_session", "ended", "future", "params", "request_id", "started", "waiting")

    def __init__(
        self,
        session: AgentSession,
        request_id: RequestId,
        params: dict[str, Any],
        waiting: modern.ModernCall | None = None,
    ) -> None:
        self._session = session
        self.request_id = request_id
        self.params = params
        self.started = time.monotonic()
        self.future: asyncio.Future[Any] | None = None
        self.ended = False
        self.waiting = waiting  # (a 2026-07-28 call, answered under the id of the agent's latest retry)

    def settled(self, result: Any, error: BaseException | None) -> None:
        self.ended = True
        session = self._session
        if self.future is not None and session._in_flight.get(self.request_id) is self.future:
            del session._in_flight[self.request_id]
        if isinstance(error, asyncio.CancelledError):  # MCP: a cancelled request gets no response
            session._audit(self.params, "cancelled", time.monotonic() - self.started, None)
            if self.waiting is not None:
                session._suspended.pop(self.waiting.state, None)
            return
        if self.waiting is None:
            self._answer(self.request_id, result, error)
        else:
            session._finish_waiting(self.waiting, functools.partial(self._answer, result=result, error=error))

    def _answer(self, request_id: RequestId, result: Any, error: BaseException | None) -> None:
        session = self._session
        try:
            stateless = self.waiting is not None
            session._answer_call(request_id, self.params, self.started, result, error, stateless=stateless)
        except Exception:  # noqa: BLE001 - callback top: one bad request must not end the session
            session._internal_error(request_id)
