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


def loads(data: bytes | bytearray | str) -> Any:
    """Parse one JSON text. Raises `ParseError` (blame: the sender) when it is not JSON."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        try:
            return json.loads(data)
        except ValueError as exc:
            raise ParseError(f"invalid JSON: {exc}") from None
        except RecursionError:  # (orjson refuses nesting past 1024 levels; json recurses until the stack ends)
            raise ParseError("invalid JSON: nested too deeply") from None


_UNKNOWN: Final = object()


class RawJson:
    """A JSON value kept as the bytes it arrived in, so that forwarding it costs no parse-and-serialize round trip.

    Only `spliced_result` makes one, after checking that the bytes are exactly one JSON value. A large value stays
    a slice of the buffer it arrived in (the upstream's whole response), not copied: `dumps` writes it out from
    there, and `data` makes the bytes of the value alone only when something asks for them.
    """

    __slots__ = ("_data", "_is_error", "_view")

    def __init__(self, data: bytes | None, *, view: memoryview | None = None, is_error: object = _UNKNOWN) -> None:
        self._data: bytes | None = data
        self._view: memoryview | None = view
        # The top-level `isError` (absent: None), when read while the value was validated: the audit log asks it of
        # every tool result, and parsing the value again for it would cost as much as validating it.
        self._is_error = is_error

    @classmethod
    def in_buffer(cls, view: memoryview, *, is_error: object = _UNKNOWN) -> RawJson:
        """The value `view` of a buffer that no one changes any more, kept without copying."""
        return cls(None, view=view, is_error=is_error)

    @property
    def data(self) -> bytes:
        """The value's bytes."""
        if self._data is None:
            assert self._view is not None
            self._data = bytes(self._view)
        return self._data

    def view(self) -> bytes | memoryview:
        """The value's bytes, without copying them out of the buffer they arrived in."""
        if self._data is not None:
            return self._data
        assert self._view is not None
        return self._view


def _raw_for_orjson(value: object) -> orjson.Fragment:
    if isinstance(value, RawJson):
        return orjson.Fragment(value._data if value._data is not None else value.data)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _raw_for_json(value: object) -> Any:
    if isinstance(value, RawJson):
        return json.loads(value.data)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dumps(obj: Any) -> bytes:
    """Serialize compactly as UTF-8, newline-free. `RawJson` values are written out as they are."""
    if type(obj) is dict and type(result := obj.get("result")) is RawJson and result._view is not None:
        # A response carrying a large upstream result still in the buffer it arrived in: copied once, straight
        # into the output (orjson would need it as bytes of its own first).
        request_id = obj.get("id")
        if len(obj) == 3 and type(request_id) is int and obj.get("jsonrpc") == JSONRPC_VERSION:
            return b"".join((_HEAD % request_id, result.view(), b"}"))
        if len(obj) == 3 and type(request_id) is str and obj.get("jsonrpc") == JSONRPC_VERSION:
            return b"".join((_RESPONSE_HEAD_STR, orjson.dumps(request_id), _RESULT_KEY, result.view(), b"}"))
    try:
        return orjson.dumps(obj, default=_raw_for_orjson)
    except TypeError:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=_raw_for_json)
        return text.encode("utf-8", "surrogatepass")


_RESPONSE_HEAD_STR: Final = b'{"jsonrpc":"2.0","id":'
_RESULT_KEY: Final = b',"result":'
_JSON_WHITESPACE: Final = b" \t\r\n"
_RESULT_FIRST: Final = b'{"result":'
_HEAD: Final = b'{"jsonrpc":"2.0","id":%d,"result":'
_TAIL: Final = b',"jsonrpc":"2.0","id":%d}'
_COPIED_VALUE_LIMIT: Final = 64 * 1024


def spliced_result(raw: bytes | bytearray, request_id: int, *, secrets_registered: bool) -> RawJson | None:
    """The `result` of `raw`, a response to `request_id`, as its own bytes; None unless `raw` has one of the two
    compact shapes SDK servers write (`{"jsonrpc":"2.0","id":N,"result":V}` or `{"result":V,"jsonrpc":"2.0","id":N}`).

    Sound because V is then checked to be exactly one JSON value: nothing can hide a second `id` or end the object
    early, and the caller falls back to an ordinary parse whenever this says None. With secrets registered, V
    must also be free of `\\/` and `\\u` escapes: secret scrubbing matches plain bytes, and only re-serializing
    turns an escaped secret back into them.

    A large V is not copied: the `RawJson` refers to it inside `raw`, which must not change afterwards.
    """
    end = len(raw)
    while end and raw[end - 1] in _JSON_WHITESPACE:
        end -= 1
    head = _HEAD % request_id
    if raw.startswith(head) and raw[end - 1 : end] == b"}":
        start, stop = len(head), end - 1
    else:
        tail = _TAIL % request_id
        if not (raw.startswith(_RESULT_FIRST) and raw.endswith(tail, 0, end)):
            return None
        start, stop = len(_RESULT_FIRST), end - len(tail)
    if stop - start <= _COPIED_VALUE_LIMIT:  # a small value is cheaper to copy than to view
        value: bytes | memoryview = bytes(raw[start:stop]) if isinstance(raw, bytearray) else raw[start:stop]
        if b"\n" in value:
            return None  # whitespace newlines would break the agent's line framing
        if secrets_registered and (b"\\/" in value or b"\\u" in value):
            return None
    else:
        if raw.find(b"\n", start, stop) >= 0:
            return None
        if secrets_registered and (raw.find(b"\\/", start, stop) >= 0 or raw.find(b"\\u", start, stop) >= 0):
            return None
        value = memoryview(raw)[start:stop]
    try:
        document = (_parser if stop - start <= _REUSED_PARSER_LIMIT else simdjson.Parser()).parse(value)
    except (ValueError, RuntimeError):  # not JSON, or beyond simdjson (integers over 64 bits): the slow path decides
        return None
    # simdjson validates at several GB/s without building Python objects (orjson.loads of an 8 MiB text costs
    # about three times as much). The top-level isError is read on the way (the audit log asks it of every tool
    # result); the document is dropped at once so the parser can be reused.
    is_error: object = document.get("isError") if type(document) is simdjson.Object else None
    del document
    if is_error is not None and type(is_error) is not bool:
        is_error = _UNKNOWN  # a container would refer to the document: read again when asked
    if isinstance(value, bytes):
        return RawJson(value, is_error=is_error)
    return RawJson.in_buffer(value, is_error=is_error)


_parser = simdjson.Parser()
# A parser keeps buffers sized for the largest document it has seen: large ones get a parser of their own,
# so one big result does not hold twice its size in the daemon for good.
_REUSED_PARSER_LIMIT: Final = 1 << 20


def _plain(field: Any) -> Any:
    if isinstance(field, simdjson.Object):
        return field.as_dict()
    return field.as_list() if isinstance(field, simdjson.Array) else field


def top_level_field(value: Any, key: str) -> Any:
    """`value[key]` when `value` is an object (parsed, or `RawJson` read without building the rest), else None."""
    if isinstance(value, RawJson):
        if key == "isError" and value._is_error is not _UNKNOWN:
            return value._is_error
        data = value.view()
        document = (_parser if len(data) <= _REUSED_PARSER_LIMIT else simdjson.Parser()).parse(data)
        try:
            return _plain(document.get(key)) if isinstance(document, simdjson.Object) else None
        finally:
            del document
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
