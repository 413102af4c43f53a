"""JSON-RPC 2.0 codec and message constructors (sans-I/O).

orjson is the codec on every path; the standard library's `json` takes over only for what orjson refuses
(integers beyond 64 bits, lone surrogates), so forwarding stays lossless.
"""

from __future__ import annotations

import json
from typing import Any, Final

import orjson

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


def dumps(obj: Any) -> bytes:
    """Serialize compactly as UTF-8, newline-free."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")


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
