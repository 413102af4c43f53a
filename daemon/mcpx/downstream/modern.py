"""The agent side of protocol 2026-07-28 (stateless): what a request's envelope says, what a modern result must
carry, a request whose upstream asks the agent something (MRTR), and a `subscriptions/listen` stream.

A 2026-07-28 agent sends no `initialize`: every request carries `_meta` keys naming the protocol version and
the client's capabilities (2026-07-28 `basic/index`, per-request protocol fields). Its session cannot take
requests from the server: an upstream's elicitation, sampling or roots request during one of its calls becomes
an `input_required` result, and the agent sends the request again with the answers (`basic/patterns/mrtr`). It
hears of list changes and resource updates only on the `subscriptions/listen` streams it opened
(`basic/patterns/subscriptions`). Transport-free: the agent session owns the I/O.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from mcpx import IMPLEMENTATION, jsonrpc
from mcpx.errors import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    InvalidParams,
    MethodNotFound,
    UnsupportedProtocolVersion,
    unanswered,
)
from mcpx.jsonrpc import Message, RequestId
from mcpx.upstream.peer import (
    CLIENT_CAPABILITIES_KEY,
    CLIENT_INFO_KEY,
    LOG_LEVEL_KEY,
    PROTOCOL_VERSION_KEY,
    SERVER_INFO_KEY,
    STATELESS_VERSION,
    SUBSCRIPTION_ID_KEY,
)

SUPPORTED_VERSIONS: Final = (STATELESS_VERSION,)

# Handshake-era requests 2026-07-28 removed, and what replaces each.
REMOVED_METHODS: Final = {
    "initialize": "send server/discover, or the request itself with its _meta envelope",
    "ping": "send server/discover",
    "logging/setLevel": f"put the level in each request's _meta['{LOG_LEVEL_KEY}']",
    "resources/subscribe": "open subscriptions/listen with resourceSubscriptions",
    "resources/unsubscribe": "cancel the subscriptions/listen request",
}
# Results that must say how long they may be cached, and for whom (2026-07-28 `server/utilities/caching`). mcpx
# lets no one cache them (its lists change with its upstreams, and it tells listeners) and they are the user's own.
CACHE_FIELDS: Final = {"ttlMs": 0, "cacheScope": "private"}
# What a modern agent's aggregated list result carries besides its items, spliced into the pre-serialized response.
LIST_EXTRA: Final = b"," + jsonrpc.dumps({**CACHE_FIELDS, "resultType": "complete"})[1:-1]
_JSON_WHITESPACE: Final = b" \t\r\n"

# RFC 5424 severities as MCP names them, least severe first (`notifications/message` levels).
_LOG_LEVELS: Final = {
    name: rank
    for rank, name in enumerate(("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency"))
}

# At most this many of one agent's requests wait for its retry (input_required answered, the upstream still asking).
MAX_SUSPENDED: Final = 64
# How long an upstream's answer is kept for the retry of an agent that was asked for input and has not come back.
HELD_ANSWER_SECONDS: Final = 300.0
# The envelope keys that describe the agent's hop to mcpx; they are not forwarded (the log level is: it is the
# agent's wish for the request wherever it runs).
_HOP_KEYS: Final = (PROTOCOL_VERSION_KEY, CLIENT_CAPABILITIES_KEY, CLIENT_INFO_KEY)


@dataclass(frozen=True, slots=True)
class Envelope:
    """What a 2026-07-28 request says of its client."""

    capabilities: dict[str, Any]
    client_info: dict[str, Any]
    log_level: str | None


def envelope(params: dict[str, Any]) -> Envelope | None:
    """The request's 2026-07-28 envelope, or None when it has none (a handshake-era request).

    Raises:
        InvalidParams: an envelope that lacks a required key or holds the wrong type.
        UnsupportedProtocolVersion: a protocol version other than 2026-07-28.
    """
    meta = params.get("_meta")
    if not isinstance(meta, dict) or PROTOCOL_VERSION_KEY not in meta:
        return None
    version, capabilities = meta[PROTOCOL_VERSION_KEY], meta.get(CLIENT_CAPABILITIES_KEY)
    if not isinstance(version, str):
        raise InvalidParams(f"_meta['{PROTOCOL_VERSION_KEY}'] must be a string")
    if not isinstance(capabilities, dict):
        raise InvalidParams(f"_meta['{CLIENT_CAPABILITIES_KEY}'] is required and must be an object")
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedProtocolVersion(version, SUPPORTED_VERSIONS)
    client_info, level = meta.get(CLIENT_INFO_KEY), meta.get(LOG_LEVEL_KEY)
    if level is not None and level not in _LOG_LEVELS:
        raise InvalidParams(f"_meta['{LOG_LEVEL_KEY}'] must be one of {', '.join(_LOG_LEVELS)}")
    return Envelope(capabilities, client_info if isinstance(client_info, dict) else {}, level)


def without_envelope(params: dict[str, Any]) -> dict[str, Any]:
    """A copy of a 2026-07-28 request's params to forward: its `_meta` without the keys of the agent's hop."""
    meta = params["_meta"]
    kept = {key: value for key, value in meta.items() if key not in _HOP_KEYS}
    forwarded = {key: value for key, value in params.items() if key != "_meta"}
    if kept:
        forwarded["_meta"] = kept
    return forwarded


def refuse_removed(method: str) -> None:
    """Raise for a handshake-era method sent with a 2026-07-28 envelope."""
    if method in REMOVED_METHODS:
        raise MethodNotFound(f"{method} is not part of protocol {STATELESS_VERSION}: {REMOVED_METHODS[method]}")


def discover_result(capabilities: dict[str, Any], instructions: str | None) -> dict[str, Any]:
    """The answer to `server/discover` (2026-07-28 `server/discover`)."""
    result: dict[str, Any] = {
        "supportedVersions": list(SUPPORTED_VERSIONS),
        "capabilities": capabilities,
        "_meta": {SERVER_INFO_KEY: IMPLEMENTATION},
        **CACHE_FIELDS,
        "resultType": "complete",
    }
    if instructions is not None:
        result["instructions"] = instructions
    return result


def complete(result: Any, *, cacheable: bool = False) -> Any:
    """`result` as a 2026-07-28 result: `resultType` (and, if `cacheable`, the cache fields) added unless the
    upstream already set them. A forwarded raw result is spliced, not parsed."""
    if isinstance(result, jsonrpc.RawJson):
        if not cacheable:
            return result if jsonrpc.top_level_field(result, "resultType") is not None else _with_result_type(result)
        result = jsonrpc.loads(result.data)
    if not isinstance(result, dict):
        return result
    added: dict[str, Any] = {"resultType": "complete", **(CACHE_FIELDS if cacheable else {})}
    return {**added, **result}


def _with_result_type(result: jsonrpc.RawJson) -> jsonrpc.RawJson:
    """A raw object result with `"resultType":"complete"` as its first member: one copy, however large."""
    data = result.view()
    start = _skip_whitespace(data, 0)
    if data[start : start + 1] != b"{":
        return result
    rest = _skip_whitespace(data, start + 1)
    comma = b"" if data[rest : rest + 1] == b"}" else b","
    return jsonrpc.RawJson(b"".join((b'{"resultType":"complete"', comma, data[rest:])))


def _skip_whitespace(data: bytes | memoryview, index: int) -> int:
    while index < len(data) and data[index] in _JSON_WHITESPACE:
        index += 1
    return index


def admits_log(message: Message, level: str | None) -> bool:
    """Whether a `notifications/message` reaches an agent that asked for `level` (None: it asked for none, and a
    server must then send none)."""
    if level is None:
        return False
    params = message.get("params")
    sent = params.get("level") if isinstance(params, dict) else None
    return isinstance(sent, str) and _LOG_LEVELS.get(sent, 0) >= _LOG_LEVELS[level]


class ModernCall:
    """One request of a 2026-07-28 agent that may need its input, from its first id to its last retry.

    While the upstream works, the call has an id to answer under (`answer_id`). When the upstream asks the agent
    something, the questions asked in the same turn of the event loop go to the agent as one `input_required`
    result under that id, with a `requestState` that names this call; the call then waits for the agent's retry,
    whose id it answers next (with the outcome, or with the next questions). The questions wait for their answers
    as long as the upstream lets them (its own timeout).
    """

    __slots__ = (
        "_asked",
        "_flush_scheduled",
        "_held",
        "_keys",
        "_on_suspend",
        "_queued",
        "_send",
        "_unrelated",
        "answer_id",
        "client_capabilities",
        "future",
        "log_level",
        "method",
        "state",
    )

    def __init__(
        self,
        method: str,
        request_id: RequestId,
        env: Envelope,
        *,
        send: Callable[[Message], None],
        unrelated: Callable[[Message], None],
        on_suspend: Callable[[ModernCall, RequestId], None],
    ) -> None:
        """`send` takes what reaches the agent as part of this call, `unrelated` what may reach it on a listen
        stream, `on_suspend` is told when the call answered the agent's request with input requests."""
        self.method = method
        self.answer_id: RequestId | None = request_id
        self.client_capabilities = env.capabilities
        self.log_level = env.log_level
        self.state = ""  # the requestState of the latest input_required answer
        self.future: asyncio.Future[Any] | None = None
        self._send = send
        self._unrelated = unrelated
        self._on_suspend = on_suspend
        self._queued: dict[str, tuple[dict[str, Any], asyncio.Future[dict[str, Any]]]] = {}
        self._asked: dict[str, tuple[dict[str, Any], asyncio.Future[dict[str, Any]]]] = {}
        self._keys = itertools.count(1)
        self._flush_scheduled = False
        self._held: Callable[[RequestId], None] | None = None

    # --- what the upstream's messages need of an agent (the router's `Agent` shape) ----------------------------

    def send_message(self, message: Message) -> None:
        """A server notification related to this call: progress always, log messages at the level asked for; the
        rest (a resource update) only on the agent's listen streams."""
        method = message.get("method")
        if method == "notifications/progress" or method is None:
            self._send(message)
        elif method == "notifications/message":
            if admits_log(message, self.log_level):
                self._send(message)
        else:
            self._unrelated(message)

    async def ask(self, method: str, params: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
        """Put the upstream's request to the agent as an input request of this call; its answer comes with the
        agent's retry."""
        loop = asyncio.get_running_loop()
        key = f"{method.partition('/')[0]}-{next(self._keys)}"
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        request: dict[str, Any] = {"method": method}
        if params is not None:
            request["params"] = params
        self._queued[key] = (request, future)
        if self.answer_id is not None and not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            return unanswered(method, f"the agent did not send its answer within {timeout:g} s", code=INTERNAL_ERROR)
        finally:
            self._queued.pop(key, None)
            self._asked.pop(key, None)

    # --- the agent's side --------------------------------------------------------------------------------------

    def _flush(self) -> None:
        """Answer the agent's request with the questions asked so far."""
        self._flush_scheduled = False
        request_id = self.answer_id
        if request_id is None or not self._queued:
            return
        self.state = secrets.token_urlsafe(18)  # (a new one each round: an answer to an older round is refused)
        result = {
            "resultType": "input_required",
            "inputRequests": {key: request for key, (request, _) in self._queued.items()},
            "requestState": self.state,
        }
        self._asked.update(self._queued)
        self._queued.clear()
        self.answer_id = None
        self._on_suspend(self, request_id)
        self._send(jsonrpc.result_response(request_id, result))

    def resume(self, request_id: RequestId, responses: dict[str, Any]) -> None:
        """The agent sent the request again (`request_id`) with `responses`, its answers (its `inputResponses`)
        to the questions it was asked."""
        self.answer_id = request_id
        for key, (request, future) in list(self._asked.items()):
            answer = responses.get(key)
            if not future.done():
                future.set_result(
                    {"result": answer}
                    if isinstance(answer, dict)
                    else unanswered(request["method"], "the agent's retry carried no answer to it", code=INVALID_PARAMS)
                )
        self._asked.clear()
        held, self._held = self._held, None
        if held is not None:
            self.finish(held)
        elif self._queued:
            self._flush()

    def cancel(self) -> None:
        """Stop the upstream's work (the call waits for a retry that will not come)."""
        if self.future is not None:
            self.future.cancel()

    def finish(self, answer: Callable[[RequestId], None]) -> bool:
        """The upstream is done: answer the agent's waiting request now (True), or its retry when it comes."""
        request_id = self.answer_id
        if request_id is None:
            self._held = answer
            return False
        self.answer_id = None
        answer(request_id)
        return True


@dataclass(slots=True)
class Listen:
    """One `subscriptions/listen` stream of an agent (2026-07-28 `basic/patterns/subscriptions`)."""

    request_id: RequestId
    kinds: frozenset[str]  # "tools", "prompts", "resources": the list changes it hears of
    uris: frozenset[str] = field(default_factory=frozenset)  # the resources whose updates it hears of

    def tagged(self, message: Message) -> Message:
        """`message` as delivered on this stream: its `_meta` names the stream."""
        params = message.get("params")
        params = params if isinstance(params, dict) else {}
        meta = params.get("_meta")
        meta = {**(meta if isinstance(meta, dict) else {}), SUBSCRIPTION_ID_KEY: self.request_id}
        return {**message, "params": {**params, "_meta": meta}}

    def acknowledgement(self) -> Message:
        honored: dict[str, Any] = {f"{kind}ListChanged": True for kind in sorted(self.kinds)}
        if self.uris:
            honored["resourceSubscriptions"] = sorted(self.uris)
        return self.tagged(jsonrpc.notification("notifications/subscriptions/acknowledged", {"notifications": honored}))

    def ended(self) -> Message:
        """The graceful end of the stream (the daemon stops)."""
        return jsonrpc.result_response(
            self.request_id, {"resultType": "complete", "_meta": {SUBSCRIPTION_ID_KEY: self.request_id}}
        )


def listen_request(request_id: RequestId, params: dict[str, Any], capabilities: dict[str, Any]) -> Listen:
    """The stream a `subscriptions/listen` asks for, its list changes cut to what mcpx offers (`capabilities`).

    Raises:
        InvalidParams: no `notifications` filter, or resource URIs that are not a list of strings.
    """
    wanted = params.get("notifications")
    if not isinstance(wanted, dict):
        raise InvalidParams('subscriptions/listen needs a "notifications" object')
    kinds = frozenset(
        kind for kind in ("tools", "prompts", "resources") if wanted.get(f"{kind}ListChanged") is True
    ) & frozenset(capabilities)
    uris = wanted.get("resourceSubscriptions") or []
    if not isinstance(uris, list) or not all(isinstance(uri, str) for uri in uris):
        raise InvalidParams('subscriptions/listen: "resourceSubscriptions" must be a list of URI strings')
    # (the resources are honored as their upstreams take the subscription: the session asks them)
    return Listen(request_id, kinds, frozenset(uris))
