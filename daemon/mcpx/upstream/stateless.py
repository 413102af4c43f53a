"""MCP client session over streamable HTTP, protocol 2026-07-28 (stateless): no handshake, no session.

One `StatelessSession` per configured upstream, shared by every agent. `connect` asks `server/discover`; every
request is then a POST of its own that carries the protocol's envelope (`_meta` protocol version, client
capabilities and client info; `basic/index`) and the routing headers (`MCP-Protocol-Version`, `Mcp-Method`,
`Mcp-Name`, `Mcp-Param-*`; `basic/transports/streamable-http`), answered by one JSON body or by an SSE stream
that ends with the response. What the handshake era did otherwise is done here so that the rest of mcpx sees the
same session either way:
- requests for the client's input (MRTR, `basic/patterns/mrtr`): a result of `resultType` "input_required" is
  asked of the agent the call belongs to (as ordinary elicitation, sampling and roots requests) and the call is
  sent again with the answers;
- cancellation and timeouts close the response stream (the protocol's cancellation);
- `ping` is answered here, `logging/setLevel` is remembered and sent with every request, resource subscriptions
  are kept and carried by `subscriptions/listen`; client notifications are dropped (the protocol has none);
- server notifications outside calls arrive on one long-lived `subscriptions/listen` stream, owned by the
  session, reopened with backoff, and renewed when the resource subscriptions change; what it may have carried
  while it was down is made up for when it is back (every list it listens for taken as changed, every subscribed
  resource as updated);
- a tool call the server refuses for its headers (HeaderMismatch) is sent once more after the tool list, whose
  `x-mcp-header` annotations give those headers, has been read again.
There is no fast path (`start_request` returns None).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import itertools
import re
from typing import Any, Final

from mcpx import IMPLEMENTATION, jsonrpc
from mcpx.auth.credentials import CredentialProvider
from mcpx.config.model import UpstreamConfig
from mcpx.errors import (
    METHOD_NOT_FOUND,
    UNSUPPORTED_PROTOCOL_VERSION,
    FrameTooLarge,
    InputRefused,
    NeedsLogin,
    UpstreamError,
    UpstreamHTTPError,
    UpstreamInterrupted,
    UpstreamProtocolError,
    UpstreamRpcError,
    UpstreamTimeout,
)
from mcpx.jsonrpc import Message
from mcpx.log import get_logger
from mcpx.upstream.h1 import Deadline, HttpClient, HttpClientError, Response
from mcpx.upstream.httpbase import (
    Answer,
    EventStream,
    HttpPeer,
    Listen,
    connection_failure,
    reconnect_delay,
    stream_message,
)
from mcpx.upstream.peer import (
    CLIENT_CAPABILITIES,
    CLIENT_CAPABILITIES_KEY,
    CLIENT_INFO_KEY,
    HEADER_MISMATCH,
    LOG_LEVEL_KEY,
    MRTR_METHODS,
    PROTOCOL_VERSION_KEY,
    RELATED_NOTIFICATIONS,
    SERVER_INFO_KEY,
    STATELESS_VERSION,
    SUBSCRIPTION_ID_KEY,
    ClientSide,
    Settled,
    is_replayable,
)

_log = get_logger("mcpx.upstream")

_ENVELOPE: Final = {
    PROTOCOL_VERSION_KEY: STATELESS_VERSION,
    CLIENT_CAPABILITIES_KEY: CLIENT_CAPABILITIES,
    CLIENT_INFO_KEY: IMPLEMENTATION,
}

# The methods whose `Mcp-Name` header mirrors a parameter, and which one.
_NAMED_BY: Final = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}

# MRTR (`basic/patterns/mrtr`): the requests that may answer "input_required", what they may ask, and how far.
_INPUT_REQUESTS: Final = frozenset({"elicitation/create", "sampling/createMessage", "roots/list"})
MAX_INPUT_ROUNDS: Final = 16
_MAX_INPUTS_PER_ROUND: Final = 16

# Methods of the handshake era this protocol removed, answered here (see the module docstring).
_LOCAL: Final = frozenset({"ping", "logging/setLevel", "resources/subscribe", "resources/unsubscribe"})

# A broken or hostile upstream must not make mcpx page forever when it reads the tool list again.
_MAX_LIST_PAGES: Final = 100

# The list changes a listen stream carries: the server capability that offers one, its filter's field, and the
# notification that tells of one.
_LIST_CHANGES: Final = (
    ("tools", "toolsListChanged", "notifications/tools/list_changed"),
    ("prompts", "promptsListChanged", "notifications/prompts/list_changed"),
    ("resources", "resourcesListChanged", "notifications/resources/list_changed"),
)


class _StreamLost(Exception):
    """A response stream ended or broke before its answer (no resumption in 2026-07-28: the request is lost)."""


class _ListenAttempt:
    """One attempt at the listen stream: its request id, and whether the server took it (its first notification,
    the acknowledgement)."""

    __slots__ = ("established", "request_id")

    def __init__(self, request_id: int) -> None:
        self.request_id = request_id
        self.established = False


class StatelessSession:
    """The MCP client mcpx is to one streamable-HTTP upstream of protocol 2026-07-28."""

    def __init__(
        self,
        config: UpstreamConfig,
        http: HttpClient,
        credentials: CredentialProvider,
        *,
        max_message_bytes: int,
        client: ClientSide,
    ) -> None:
        self.name = config.name
        self._config = config
        self._http = http
        self._peer = HttpPeer(config, http, credentials)
        self._credentials = credentials
        self._max_message_bytes = max_message_bytes
        self._client = client
        self._ids = itertools.count(1)
        # Per tool, the `Mcp-Param-*` headers its arguments give: argument path → header name suffix.
        self._param_headers: dict[str, dict[tuple[str, ...], str]] = {}
        self._log_level: str | None = None
        self._subscribed: set[str] = set()  # the upstream's own URIs
        self._listener: asyncio.Task[None] | None = None
        self._listening: frozenset[str] | None = None  # the resource subscriptions the open listen carries
        self._stopped: set[asyncio.Task[None]] = set()  # listeners cancelled and not yet ended
        # A listen stream the server had taken has ended since: what it would have carried meanwhile is unknown.
        self._listen_gap = False
        self.protocol_version: str | None = None
        self.server_info: dict[str, Any] = {}
        self.capabilities: dict[str, Any] = {}
        self.instructions: str | None = None

    @property
    def asked_roots(self) -> bool:
        # The protocol has no `notifications/roots/list_changed`: roots are asked afresh with each call that needs them.
        return False

    # --- lifecycle -----------------------------------------------------------------------------------------------

    async def connect(self) -> None:
        """Ask `server/discover` and check that the server speaks 2026-07-28 (`server/discover`). Raises an
        `UpstreamError` subclass (or `NeedsLogin`) on failure."""
        await self._credentials.prepare()
        self._stop_listener()
        self.protocol_version = None
        try:
            result = await self._send("server/discover", None, on_related=None, forward_raw=False)
        except UpstreamHTTPError as exc:
            if exc.rpc_code != UNSUPPORTED_PROTOCOL_VERSION:
                raise
            reason = f"{exc.reason} (server/discover: the server does not take protocol {STATELESS_VERSION} either)"
            raise UpstreamHTTPError(self.name, exc.status, reason, rpc_code=exc.rpc_code) from None
        except UpstreamRpcError as exc:
            data = exc.error.get("data")
            supported = data.get("supported") if isinstance(data, dict) else None
            if supported is None:
                raise
            raise UpstreamProtocolError(
                self.name, f"server/discover refused: the server supports protocol versions {supported!r}"
            ) from None
        if not isinstance(result, dict):
            raise UpstreamProtocolError(self.name, "server/discover result is not an object")
        versions = result.get("supportedVersions")
        if not isinstance(versions, list) or STATELESS_VERSION not in versions:
            raise UpstreamProtocolError(
                self.name, f"the server does not support protocol {STATELESS_VERSION}; it supports {versions!r}"
            )
        capabilities, instructions, meta = result.get("capabilities"), result.get("instructions"), result.get("_meta")
        server_info = meta.get(SERVER_INFO_KEY) if isinstance(meta, dict) else None
        self.capabilities = capabilities if isinstance(capabilities, dict) else {}
        self.instructions = instructions if isinstance(instructions, str) else None
        self.server_info = server_info if isinstance(server_info, dict) else {}
        self._param_headers.clear()
        self.protocol_version = STATELESS_VERSION
        self._renew_listener()

    async def close(self) -> None:
        """Stop the listen stream (bounded). There is no session to end on the server."""
        self._stop_listener()
        self.protocol_version = None
        if self._stopped:
            await asyncio.wait(set(self._stopped), timeout=1.0)  # they only release their streams

    # --- requests ------------------------------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        params: dict[str, Any] | None,
        *,
        timeout: float,
        on_related: ClientSide | None = None,
        forward_raw: bool = False,
    ) -> Any:
        """Send one request and return its result, after the rounds of input the server asks for (MRTR).

        Raises:
            UpstreamRpcError: the upstream answered with a JSON-RPC error.
            InputRefused: the agent answered a request for input with an error.
            UpstreamError: any other failure (unreachable, timeout, HTTP error, garbage, credential rejected).
        """
        if method in _LOCAL:
            return self._answer_locally(method, params)
        try:
            with Deadline(timeout):
                return await self._rounds(method, params, timeout, on_related, forward_raw)
        except TimeoutError:
            # The response stream is closed on the way out: that is the cancellation (`basic/transports`).
            raise UpstreamTimeout(self.name, f"no answer to {method} within {timeout:g} s") from None

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
        """No fast path over this protocol yet: the caller uses `request`."""
        return None

    async def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        """The protocol defines no client notifications over HTTP (`notifications/initialized` and
        `notifications/roots/list_changed` are gone, cancellation closes the stream): dropped."""
        _log.debug("client notification not sent to a 2026-07-28 upstream", upstream=self.name, method=method)

    def _answer_locally(self, method: str, params: dict[str, Any] | None) -> dict[str, Any]:
        # `ping` checks a session, and there is none: each request stands alone, and its own outcome says whether
        # the server is there, so a round trip (a `server/discover`) would tell the caller nothing more.
        if method == "logging/setLevel":
            level = params.get("level") if params else None
            self._log_level = level if isinstance(level, str) else None
        elif method in ("resources/subscribe", "resources/unsubscribe"):
            resources = self.capabilities.get("resources")
            if not (isinstance(resources, dict) and resources.get("subscribe")):
                error = {"code": METHOD_NOT_FOUND, "message": "the server offers no resource subscriptions"}
                raise UpstreamRpcError(self.name, error)
            uri = params.get("uri") if params else None
            if isinstance(uri, str):
                (self._subscribed.add if method == "resources/subscribe" else self._subscribed.discard)(uri)
                self._renew_listener()
        return {}

    async def _rounds(
        self,
        method: str,
        params: dict[str, Any] | None,
        timeout: float,
        on_related: ClientSide | None,
        forward_raw: bool,
    ) -> Any:
        """The request, sent again with the client's input for as long as the server asks for some (MRTR)."""
        loop = asyncio.get_running_loop()
        ends = loop.time() + timeout
        # A tool list is read here (its header annotations), so it never travels as the upstream's bytes.
        raw = forward_raw and method != "tools/list"
        inputs: dict[str, Any] = {}
        for _ in range(MAX_INPUT_ROUNDS + 1):
            sent = {**params, **inputs} if params else inputs or None
            result = await self._send(method, sent, on_related=on_related, forward_raw=raw)
            if method not in MRTR_METHODS or jsonrpc.top_level_field(result, "resultType") != "input_required":
                return self._accept_tools(result) if method == "tools/list" else result
            if isinstance(result, jsonrpc.RawJson):
                result = jsonrpc.loads(result.data)
            inputs = await self._inputs(result, on_related, max(ends - loop.time(), 0.0))
        raise UpstreamProtocolError(self.name, f"{method} still asked for input after {MAX_INPUT_ROUNDS} rounds")

    async def _inputs(self, result: dict[str, Any], on_related: ClientSide | None, timeout: float) -> dict[str, Any]:
        """The fields of the next round: the answers to `inputRequests`, asked of the client side all at once, and
        `requestState` echoed as it came (only when it came)."""
        requests = result.get("inputRequests")
        state = result.get("requestState")
        if requests is None and state is None:
            raise UpstreamProtocolError(self.name, "an input_required result with neither inputRequests nor state")
        if requests is not None and not isinstance(requests, dict):
            raise UpstreamProtocolError(self.name, "inputRequests is not an object")
        if state is not None and not isinstance(state, str):
            raise UpstreamProtocolError(self.name, "requestState is not a string")
        asked = requests or {}
        if len(asked) > _MAX_INPUTS_PER_ROUND:
            raise UpstreamProtocolError(self.name, f"more than {_MAX_INPUTS_PER_ROUND} inputRequests at once")
        for key, item in asked.items():
            method = item.get("method") if isinstance(item, dict) else None
            params = item.get("params") if isinstance(item, dict) else None
            if method not in _INPUT_REQUESTS or not (params is None or isinstance(params, dict)):
                raise UpstreamProtocolError(self.name, f"input request {key!r} is not one a server may make")
        client = on_related if on_related is not None else self._client
        answers = await asyncio.gather(
            *(client.ask(item["method"], item.get("params"), timeout) for item in asked.values())
        )
        fields: dict[str, Any] = {}
        responses: dict[str, Any] = {}
        for (key, item), answer in zip(asked.items(), answers, strict=True):
            if "error" in answer:
                # The protocol carries results only: the call ends with the agent's error (as the SDK client does).
                raise InputRefused(item["method"], answer["error"])
            responses[key] = answer.get("result")
        if asked:
            fields["inputResponses"] = responses
        if state is not None:
            fields["requestState"] = state
        return fields

    async def _send(
        self, method: str, params: dict[str, Any] | None, *, on_related: ClientSide | None, forward_raw: bool
    ) -> Any:
        """One request (a new id each time), with the credential renewed and sent once more after a 401; a
        request whose response stream was lost is sent once more when that is harmless; a tool call refused for
        its headers is sent once more after the tool list has been read again."""
        exchange = functools.partial(self._exchange, method, params, on_related, forward_raw)
        lost_once = mismatched_once = False
        while True:
            try:
                return await self._peer.with_auth_retry(exchange)
            except _StreamLost as lost:
                if lost_once or not is_replayable(method):
                    raise UpstreamInterrupted(
                        self.name, f"{lost}; {method} was not sent again, since it may or may not have run"
                    ) from None
                lost_once = True
            except UpstreamHTTPError as exc:
                # `basic/transports/streamable-http` (custom headers): a server that reads the body MUST check the
                # routing headers against it and refuse a mismatch with HTTP 400 and HeaderMismatch; "the client
                # SHOULD re-fetch tools/list and retry". Sending a tool call again is safe here, unlike after a lost
                # stream: that answer means the server refused the request before running it. Only a tool call's
                # headers come from the tool list (`Mcp-Param-*`); any other request would go again unchanged.
                if exc.status != 400 or exc.rpc_code != HEADER_MISMATCH or method != "tools/call":
                    raise
                if mismatched_once:
                    raise UpstreamHTTPError(
                        self.name,
                        exc.status,
                        f"the server refused the request's headers (HeaderMismatch), also after mcpx read its tool "
                        f"list again: {exc.reason}",
                        rpc_code=exc.rpc_code,
                    ) from None
                mismatched_once = True
                _log.info("headers refused (HeaderMismatch): reading the tool list again", upstream=self.name)
                await self._relist_tools()

    async def _relist_tools(self) -> None:
        """Read every page of the tool list again, for the `x-mcp-header` annotations the next tool call's headers
        come from; when they changed, the list is taken as changed (the supervisor refreshes the catalog)."""
        before = dict(self._param_headers)
        cursor: str | None = None
        try:
            for _ in range(_MAX_LIST_PAGES):
                params = {"cursor": cursor} if cursor is not None else None
                page = self._accept_tools(await self._send("tools/list", params, on_related=None, forward_raw=False))
                next_cursor = page.get("nextCursor") if isinstance(page, dict) else None
                if not isinstance(next_cursor, str):
                    break
                cursor = next_cursor
        except UpstreamError as exc:  # the call is sent again as it was, and its own error says what went wrong
            _log.warning("the tool list could not be read again", upstream=self.name, error=exc.reason)
        if self._param_headers != before:
            self._client.notify(jsonrpc.notification("notifications/tools/list_changed"))

    async def _exchange(
        self, method: str, params: dict[str, Any] | None, on_related: ClientSide | None, forward_raw: bool
    ) -> Any:
        request_id = next(self._ids)
        sent = self._with_envelope(params)
        headers = self._headers(method, sent)
        body = jsonrpc.dumps(jsonrpc.request(request_id, method, sent))
        try:
            response = await self._http.request(
                "POST", self._peer.target, headers, body, replayable=is_replayable(method)
            )
        except HttpClientError as exc:
            raise connection_failure(self.name, exc) from None
        return await self._peer.answer(
            response,
            headers,
            request_id,
            lambda stream: self._read_stream(stream, request_id, on_related, forward_raw),
            max_bytes=self._max_message_bytes,
            forward_raw=forward_raw,
        )

    async def _read_stream(
        self, response: Response, request_id: int, on_related: ClientSide | None, forward_raw: bool
    ) -> Any:
        stream = EventStream(self._max_message_bytes)
        try:
            async for event in stream.events(response):
                message = stream_message(self.name, event, request_id, forward_raw)
                if isinstance(message, Answer):
                    return message.result()
                if message is not None:
                    self._from_response_stream(message, on_related)
        except FrameTooLarge as exc:
            raise UpstreamProtocolError(self.name, f"SSE event too large: {exc}") from None
        except HttpClientError as exc:
            raise _StreamLost(f"the response stream broke before the answer ({exc})") from None
        raise _StreamLost("the response stream ended before the answer")

    def _from_response_stream(self, message: Message, on_related: ClientSide | None) -> None:
        if "id" in message:
            # A 2026-07-28 server sends the client no requests (it asks through MRTR): not answered.
            _log.warning("upstream sent a request on a response stream; ignored", upstream=self.name)
        elif on_related is not None and message["method"] in RELATED_NOTIFICATIONS:
            on_related.notify(message)
        else:
            self._client.notify(message)

    def _with_envelope(self, params: dict[str, Any] | None) -> dict[str, Any]:
        """`params` with the envelope merged into its `_meta`: the agent's own keys (a progress token…) kept, the
        envelope's own keys mcpx's (the version must match the header; mcpx answers for the capabilities)."""
        params = dict(params) if params else {}
        meta = params.get("_meta")
        merged = dict(meta) if isinstance(meta, dict) else {}
        if self._log_level is not None:
            merged.setdefault(LOG_LEVEL_KEY, self._log_level)
        merged.update(_ENVELOPE)
        params["_meta"] = merged
        return params

    def _headers(self, method: str, params: dict[str, Any]) -> dict[str, str]:
        headers = self._peer.headers()
        headers["Accept"] = "application/json, text/event-stream"
        headers["Content-Type"] = "application/json"
        headers["MCP-Protocol-Version"] = STATELESS_VERSION
        headers["Mcp-Method"] = method
        named_by = _NAMED_BY.get(method)
        name = params.get(named_by) if named_by is not None else None
        if isinstance(name, str):
            headers["Mcp-Name"] = header_value(name)
        if method == "tools/call" and isinstance(name, str) and (paths := self._param_headers.get(name)):
            arguments = params.get("arguments")
            headers.update(param_headers(paths, arguments if isinstance(arguments, dict) else {}))
        return headers

    def _accept_tools(self, result: Any) -> Any:
        """A `tools/list` page without the tools whose `x-mcp-header` annotations are invalid (an HTTP client
        MUST drop them, `basic/transports/streamable-http`), learning the headers of the others."""
        tools = result.get("tools") if isinstance(result, dict) else None
        if not isinstance(tools, list):
            return result
        kept: list[Any] = []
        for tool in tools:
            name = tool.get("name") if isinstance(tool, dict) else None
            if not isinstance(name, str):
                kept.append(tool)  # (the catalog ignores it)
                continue
            schema = tool.get("inputSchema")
            problem = invalid_header_annotation(schema)
            if problem is not None:
                _log.warning("upstream tool dropped: invalid x-mcp-header", upstream=self.name, tool=name, why=problem)
                self._param_headers.pop(name, None)
                continue
            paths = header_annotations(schema)
            if paths:
                self._param_headers[name] = paths
            else:
                self._param_headers.pop(name, None)
            kept.append(tool)
        return result if len(kept) == len(tools) else {**result, "tools": kept}

    # --- the listen stream -----------------------------------------------------------------------------------------

    def _listen_filter(self) -> dict[str, Any]:
        """What to listen for: the list changes the server announces, and the subscribed resources."""
        wanted: dict[str, Any] = {}
        for kind, field, _ in _LIST_CHANGES:
            offered = self.capabilities.get(kind)
            if isinstance(offered, dict) and offered.get("listChanged"):
                wanted[field] = True
        resources = self.capabilities.get("resources")
        if isinstance(resources, dict) and resources.get("subscribe") and self._subscribed:
            wanted["resourceSubscriptions"] = sorted(self._subscribed)
        return wanted

    def _renew_listener(self) -> None:
        """(Re)open the listen stream for what is wanted now, unless the open one already carries it."""
        if self.protocol_version is None:
            return  # not connected: `connect` opens it
        subscribed = frozenset(self._subscribed)
        if self._listener is not None and not self._listener.done() and self._listening == subscribed:
            return
        self._stop_listener()
        wanted = self._listen_filter()
        if not wanted:
            return
        self._listening = subscribed
        self._listener = asyncio.get_running_loop().create_task(
            self._listen(wanted), name=f"upstream:{self.name}:listen"
        )

    def _stop_listener(self) -> None:
        listener, self._listener, self._listening = self._listener, None, None
        if listener is not None and not listener.done():
            listener.cancel()
            self._stopped.add(listener)
            listener.add_done_callback(self._stopped.discard)

    async def _listen(self, wanted: dict[str, Any]) -> None:
        """Keep one `subscriptions/listen` stream open (task top: it ends only when there is none, or cancelled)."""
        failures = 0
        try:
            while True:
                outcome = await self._listen_once(wanted)
                if outcome is Listen.STOP:
                    return
                failures = 0 if outcome is Listen.RECEIVED else failures + 1
                await asyncio.sleep(reconnect_delay(None, failures))
        except Exception:  # noqa: BLE001 - task top: the listen stream must never take the session down
            _log.exception("listen stream failed", upstream=self.name)

    async def _listen_once(self, wanted: dict[str, Any]) -> Listen:
        attempt = _ListenAttempt(next(self._ids))
        params = self._with_envelope({"notifications": wanted})
        try:
            headers = self._headers("subscriptions/listen", params)
        except (UpstreamError, NeedsLogin) as exc:  # the credential cannot be read: calls will say why
            _log.debug("listen stream not opened", upstream=self.name, error=str(exc))
            return Listen.STOP
        headers["Accept"] = "text/event-stream, application/json"
        body = jsonrpc.dumps(jsonrpc.request(attempt.request_id, "subscriptions/listen", params))
        try:
            async with asyncio.timeout(self._config.timeout):
                response = await self._http.request("POST", self._peer.target, headers, body)
        except (TimeoutError, HttpClientError) as exc:
            _log.debug("listen stream could not be opened", upstream=self.name, error=str(exc))
            return Listen.FAILED
        stream = EventStream(self._max_message_bytes)
        outcome = await self._peer.read_stream(
            response,
            headers,
            stream,
            kind="listen",
            on_message=functools.partial(self._from_listen_stream, attempt=attempt, wanted=wanted),
        )
        if attempt.established:
            self._listen_gap = True  # (not when cancelled: mcpx closes a stream only to open another at once)
        return outcome

    def _from_listen_stream(self, message: Message, attempt: _ListenAttempt, wanted: dict[str, Any]) -> bool:
        """Deliver one message of the listen stream; True when it ends the subscription (its response)."""
        method = message.get("method")
        if method is None:
            return message.get("id") == attempt.request_id  # the server ended the subscription (`subscriptions`)
        if not attempt.established:
            attempt.established = True
            if self._listen_gap:
                self._listen_gap = False
                self._catch_up(wanted)
        if "id" in message:
            _log.warning("upstream sent a request on the listen stream; ignored", upstream=self.name)
            return False
        if method == "notifications/subscriptions/acknowledged":
            _log.debug("listen stream acknowledged", upstream=self.name, honored=message.get("params"))
            return False
        if method == "notifications/cancelled":
            return True
        self._client.notify(_without_subscription_id(message))
        return False

    def _catch_up(self, wanted: dict[str, Any]) -> None:
        """The listen stream is back after one had ended: what the server sent meanwhile went to no one (there is no
        replay, `basic/patterns/subscriptions`), so every list it listens for is taken as changed (the supervisor
        lists them again; agents hear of the lists that really changed) and every subscribed resource as updated
        (an agent reading one again costs little; missing an update does not). Told now that the new stream is
        taken, so nothing that changes from here on is missed."""
        _log.info("listen stream back: taking its lists as changed, its resources as updated", upstream=self.name)
        for _, field, method in _LIST_CHANGES:
            if wanted.get(field):
                self._client.notify(jsonrpc.notification(method))
        uris = wanted.get("resourceSubscriptions")
        for uri in uris if isinstance(uris, list) else ():
            self._client.notify(jsonrpc.notification("notifications/resources/updated", {"uri": uri}))


def _without_subscription_id(message: Message) -> Message:
    """The notification without the stream's subscription id (an id of mcpx's own, not the agents')."""
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    if not isinstance(params, dict) or not isinstance(meta, dict) or SUBSCRIPTION_ID_KEY not in meta:
        return message
    rest = {key: value for key, value in meta.items() if key != SUBSCRIPTION_ID_KEY}
    new_params = {key: value for key, value in params.items() if key != "_meta"}
    if rest:
        new_params["_meta"] = rest
    return {**message, "params": new_params}


# --- `x-mcp-header` (2026-07-28 `basic/transports/streamable-http`, custom headers) -------------------------------

_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 tchar
_SENTINEL: Final = re.compile(r"=\?base64\?.*\?=", re.DOTALL)
_HEADER_TYPES: Final = frozenset({"string", "integer", "boolean"})
_SAFE_INTEGER: Final = 2**53 - 1
# JSON Schema keywords whose values are schemas (one, a list, or a map of them). Only `properties` keeps a property
# "statically reachable"; data keywords (`default`, `enum`, `const`, `examples`) are not schemas and not entered.
_ONE_SCHEMA: Final = frozenset(
    {
        "items",
        "contains",
        "additionalProperties",
        "unevaluatedItems",
        "unevaluatedProperties",
        "propertyNames",
        "not",
        "if",
        "then",
        "else",
        "contentSchema",
    }
)
_LIST_OF_SCHEMAS: Final = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
_MAP_OF_SCHEMAS: Final = frozenset({"$defs", "definitions", "patternProperties", "dependentSchemas"})
_MAX_SCHEMA_NODES: Final = 10_000


def _schema_nodes(schema: object) -> list[tuple[tuple[str, ...] | None, dict[str, Any]]]:
    """Every subschema of `schema` with its path of `properties` keys from the root (None once reached another
    way). Raises `ValueError` past `_MAX_SCHEMA_NODES` (a schema too large to check is taken as invalid)."""
    nodes: list[tuple[tuple[str, ...] | None, dict[str, Any]]] = []
    pending: list[tuple[tuple[str, ...] | None, object]] = [((), schema)]
    while pending:
        path, node = pending.pop()
        if not isinstance(node, dict):
            continue
        nodes.append((path, node))
        if len(nodes) > _MAX_SCHEMA_NODES:
            raise ValueError("the schema is too large to check")
        for keyword, value in node.items():
            if keyword == "properties" and isinstance(value, dict):
                pending.extend(((*path, key) if path is not None else None, sub) for key, sub in value.items())
            elif keyword in _ONE_SCHEMA:
                pending.append((None, value))
            elif keyword in _LIST_OF_SCHEMAS and isinstance(value, list):
                pending.extend((None, sub) for sub in value)
            elif keyword in _MAP_OF_SCHEMAS and isinstance(value, dict):
                pending.extend((None, sub) for sub in value.values())
    return nodes


def invalid_header_annotation(schema: object) -> str | None:
    """Why the `x-mcp-header` annotations of a tool's `inputSchema` are invalid, or None when they are valid (or
    absent): on a property reached from the root by `properties` alone, a non-empty token, a string, integer or
    boolean property, unique whatever the case."""
    try:
        nodes = _schema_nodes(schema)
    except ValueError as exc:
        return str(exc)
    seen: set[str] = set()
    for path, node in nodes:
        if "x-mcp-header" not in node:
            continue
        token = node["x-mcp-header"]
        where = ".".join(path) if path else "?"
        if not path:
            return "x-mcp-header on a schema that is not a property reached through `properties`"
        if not isinstance(token, str) or not _TOKEN.fullmatch(token):
            return f"property {where!r}: x-mcp-header is not a non-empty HTTP token"
        if node.get("type") not in _HEADER_TYPES:
            return f"property {where!r}: x-mcp-header on a property that is not a string, integer or boolean"
        if token.lower() in seen:
            return f"property {where!r}: x-mcp-header {token!r} is used twice"
        seen.add(token.lower())
    return None


def header_annotations(schema: object) -> dict[tuple[str, ...], str]:
    """The argument paths of a valid `inputSchema` that give headers, each with its `Mcp-Param-` suffix."""
    return {
        path: node["x-mcp-header"]
        for path, node in _schema_nodes(schema)
        if path and isinstance(node.get("x-mcp-header"), str)
    }


def param_headers(paths: dict[tuple[str, ...], str], arguments: dict[str, Any]) -> dict[str, str]:
    """The `Mcp-Param-*` headers of a call's arguments: a null or absent value gives none."""
    headers: dict[str, str] = {}
    for path, token in paths.items():
        value: Any = arguments
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int) and abs(value) <= _SAFE_INTEGER:
            text = str(value)
        elif isinstance(value, float) and value.is_integer() and abs(value) <= _SAFE_INTEGER:
            text = str(int(value))
        elif isinstance(value, str):
            text = value
        else:
            continue  # (absent, null, or no value a header can carry: the server judges the call)
        headers[f"Mcp-Param-{token}"] = header_value(text)
    return headers


def header_value(text: str) -> str:
    """`text` as a header value: as it is when it is plain visible ASCII (inner spaces allowed), else (and when it
    looks like the sentinel itself) `=?base64?…?=` of its UTF-8."""
    plain = text == text.strip() and all(" " <= char <= "~" for char in text)
    if plain and not _SENTINEL.fullmatch(text):
        return text
    return f"=?base64?{base64.b64encode(text.encode()).decode('ascii')}?="
