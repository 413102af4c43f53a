"""JSON-RPC 2.0 codec and message constructors (sans-I/O).

orjson is the codec on every path; the standard library's `json` takes over only for what orjson refuses
(integers beyond 64 bits, lone surrogates), so forwarding stays lossless.
"""

from __future__ import annotations

import json
from typing import Any, Final

import orjson
import simdjson

from mcpx.errors import InvalidRequest, ParseError

JSONRPC_VERSION: Final = "2.0"

RequestId = str | int
Message = dict[str, Any]


def loads(data: bytes | str) -> Any:
    """Parse one JSON text. Raises `ParseError` (blame: the sender) when it is not JSON."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        try:
            return json.loads(data)
        except ValueError as exc:
            raise ParseError(f"invalid JSON: {exc}") from None


class RawJson:
    """A JSON value kept as the bytes it arrived in, so that forwarding it costs no parse-and-serialize round trip.

    Only `spliced_result` makes one, after checking that the bytes are exactly one JSON value."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


def _raw_for_orjson(value: object) -> orjson.Fragment:
    if isinstance(value, RawJson):
        return orjson.Fragment(value.data)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _raw_for_json(value: object) -> Any:
    if isinstance(value, RawJson):
        return json.loads(value.data)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dumps(obj: Any) -> bytes:
    """Serialize compactly as UTF-8, newline-free. `RawJson` values are written out as they are."""
    try:
        return orjson.dumps(obj, default=_raw_for_orjson)
    except TypeError:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=_raw_for_json)
        return text.encode("utf-8", "surrogatepass")


_JSON_WHITESPACE: Final = b" \t\r\n"
_RESULT_FIRST: Final = b'{"result":'


def spliced_result(raw: bytes, request_id: int, *, secrets_registered: bool) -> RawJson | None:
    """The `result` of `raw`, a response to `request_id`, as its own bytes; None unless `raw` has one of the two
    compact shapes SDK servers write (`{"jsonrpc":"2.0","id":N,"result":V}` or `{"result":V,"jsonrpc":"2.0","id":N}`).

    Sound because V is then checked to be exactly one JSON value: nothing can hide a second `id` or end the object
    early, and the caller falls back to an ordinary parse whenever this says None. With secrets registered, V
    must also be free of `\\/` and `\\u` escapes: secret scrubbing matches plain bytes, and only re-serializing
    turns an escaped secret back into them.
    """
    id_bytes = b"%d" % request_id
    end = len(raw)
    while end and raw[end - 1] in _JSON_WHITESPACE:
        end -= 1
    head = b'{"jsonrpc":"2.0","id":' + id_bytes + b',"result":'
    if raw.startswith(head) and raw[end - 1 : end] == b"}":
        value = raw[len(head) : end - 1]
    else:
        tail = b',"jsonrpc":"2.0","id":' + id_bytes + b"}"
        if not (raw.startswith(_RESULT_FIRST) and raw.endswith(tail, 0, end)):
            return None
        value = raw[len(_RESULT_FIRST) : end - len(tail)]
    if b"\n" in value:
        return None  # whitespace newlines would break the agent's line framing
    if secrets_registered and (b"\\/" in value or b"\\u" in value):
        return None
    if not _is_one_json_value(value):
        return None
    return RawJson(value)


_parser = simdjson.Parser()
# A parser keeps buffers sized for the largest document it has seen: large ones get a parser of their own,
# so one big result does not hold twice its size in the daemon for good.
_REUSED_PARSER_LIMIT: Final = 1 << 20


def _parser_for(data: bytes) -> simdjson.Parser:
    return _parser if len(data) <= _REUSED_PARSER_LIMIT else simdjson.Parser()


def _is_one_json_value(data: bytes) -> bool:
    # simdjson validates at several GB/s without building Python objects (orjson.loads of an 8 MiB text costs
    # about three times as much); the parsed document is dropped at once so the parser can be reused.
    try:
        _parser_for(data).parse(data)
    except (ValueError, RuntimeError):  # not JSON, or beyond simdjson (integers over 64 bits): the slow path decides
        return False
    return True


def top_level_field(value: Any, key: str) -> Any:
    """`value[key]` when `value` is an object (parsed, or `RawJson` read without building the rest), else None."""
    if isinstance(value, RawJson):
        document = _parser_for(value.data).parse(value.data)
        try:
            field = document.get(key) if isinstance(document, simdjson.Object) else None
            if isinstance(field, simdjson.Object):
                return field.as_dict()
            return field.as_list() if isinstance(field, simdjson.Array) else field
        finally:
            del document  # the parser can be reused only once its document is gone
    return value.get(key) if isinstance(value, dict) else None


def request(request_id: RequestId, method: str, params: dict[str, Any] | None = None) -> Message:
    message: Message = {"jsonrpc": JSONRPC_VERSION, "id": request_id, "method": method}
    if params is not None:
        message["params"] = params
    return message


def notification(method: str, params: dict[str, Any] | None = None) -> Message:
    message: Message = {"jsonrpc": JSONRPC_VERSION, "method": method}
    if params is not None:
        message["params"] = params
    return message


def result_response(request_id: RequestId | None, result: Any) -> Message:
    return {"jsonrpc": JSONRPC_VERSION, "id": request_id, "result": result}


def error_response(request_id: RequestId | None, error: dict[str, Any]) -> Message:
    return {"jsonrpc": JSONRPC_VERSION, "id": request_id, "error": error}


def is_request_id(value: object) -> bool:
    """JSON-RPC ids are strings or integers (MCP forbids null); bool is not an integer here."""
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def validate_message(message: object) -> Message:
    """Check the JSON-RPC envelope of one parsed message. Raises `InvalidRequest` when it is not one."""
    if isinstance(message, list):
        # JSON-RPC batches existed only in protocol 2025-03-26 and were removed in 2025-06-18.
        raise InvalidRequest("JSON-RPC batches are not supported")
    if not isinstance(message, dict):
        raise InvalidRequest("a JSON-RPC message must be an object")
    if message.get("jsonrpc") != JSONRPC_VERSION:
        raise InvalidRequest('"jsonrpc" must be "2.0"')
    method = message.get("method")
    if method is not None and not isinstance(method, str):
        raise InvalidRequest('"method" must be a string')
    if "id" in message and not is_request_id(message["id"]):
        raise InvalidRequest('"id" must be a string or an integer')
    if method is None and "id" not in message:
        raise InvalidRequest("a message needs a method or an id")
    params = message.get("params")
    if params is not None and not isinstance(params, dict):
        raise InvalidRequest('"params" must be an object')
    return message
