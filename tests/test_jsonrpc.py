"""The JSON-RPC codec: splicing an upstream's result bytes into the agent's response, and only when it is sound."""

from __future__ import annotations

import json

import pytest

from mcpx import jsonrpc
from mcpx.errors import ParseError
from mcpx.jsonrpc import RawJson, spliced_result


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (b'{"jsonrpc":"2.0","id":7,"result":{"a":[1,"x"]}}', b'{"a":[1,"x"]}'),
        (b'{"jsonrpc":"2.0","id":7,"result":{"a":1}}\r\n', b'{"a":1}'),
        (b'{"jsonrpc":"2.0","id":7,"result":{} }', b"{} "),
        (b'{"result":[1,2],"jsonrpc":"2.0","id":7}', b"[1,2]"),
        (b'{"jsonrpc":"2.0","id":7,"result":"\\u00e9"}', b'"\\u00e9"'),
    ],
)
def test_the_two_compact_shapes_give_the_result_bytes_untouched(raw: bytes, value: bytes) -> None:
    spliced = spliced_result(raw, 7, secrets_registered=False)
    assert spliced is not None
    assert spliced.data == value


@pytest.mark.parametrize(
    "raw",
    [
        # A second "id" after the result would re-address the agent's response: never spliced.
        b'{"jsonrpc":"2.0","id":7,"result":{"a":1},"id":4,"result":{}}',
        b'{"result":{},"id":4,"x":1,"jsonrpc":"2.0","id":7}',
        b'{"jsonrpc":"2.0","id":7,"result":{"a":1}',  # truncated
        b'{"jsonrpc":"2.0","id":7,"result":}',
        b'{"jsonrpc":"2.0","id":77,"result":{}}',  # another request's id
        b'{"jsonrpc":"2.0","id":7,"error":{"code":1,"message":"m"}}',
        b'{"jsonrpc":"2.0","id":7,"result":{"a":\n1}}',  # a newline would break the agent's line framing
        b'{"jsonrpc":"2.0","id":7,"result":"\xff"}',  # not UTF-8
        b'{"jsonrpc":"2.0","id":7,"result":123456789012345678901234567890}',  # left to the exact slow path
        b'{"id":7,"jsonrpc":"2.0","result":{}}',  # another key order: parsed the ordinary way
    ],
)
def test_anything_else_is_left_to_the_ordinary_parse(raw: bytes) -> None:
    assert spliced_result(raw, 7, secrets_registered=False) is None


def test_raw_values_are_written_out_as_they_are() -> None:
    message = jsonrpc.result_response("a", RawJson(b'{"z":1,"a":"\\u00e9"}'))
    assert jsonrpc.dumps(message) == b'{"jsonrpc":"2.0","id":"a","result":{"z":1,"a":"\\u00e9"}}'


def test_raw_values_survive_the_standard_library_fallback() -> None:
    # orjson refuses integers beyond 64 bits (an agent may use one as its id); the fallback keeps the raw value.
    message = jsonrpc.result_response(10**30, RawJson(b'{"a":[1]}'))
    assert json.loads(jsonrpc.dumps(message)) == {"jsonrpc": "2.0", "id": 10**30, "result": {"a": [1]}}


@pytest.mark.parametrize("escaped", [b'{"t":"a\\/b"}', b'{"t":"\\u0061"}'])
def test_escapes_that_could_hide_a_secret_are_left_to_the_ordinary_parse_when_secrets_exist(escaped: bytes) -> None:
    # Scrubbing matches a secret's plain bytes; re-serializing turns "\/" and "\u0061" back into them.
    raw = b'{"jsonrpc":"2.0","id":7,"result":' + escaped + b"}"
    assert spliced_result(raw, 7, secrets_registered=True) is None
    spliced = spliced_result(raw, 7, secrets_registered=False)
    assert spliced is not None and spliced.data == escaped


@pytest.mark.parametrize("buffer", [bytes, bytearray])
def test_a_large_result_is_spliced_without_being_copied_out(buffer: type[bytes | bytearray]) -> None:
    value = b'{"content":[{"type":"text","text":"' + b"x" * 100_000 + b'"}],"isError":true}'
    raw = buffer(b'{"jsonrpc":"2.0","id":7,"result":' + value + b"}")
    spliced = spliced_result(raw, 7, secrets_registered=False)
    assert spliced is not None
    view = spliced.view()
    assert isinstance(view, memoryview) and view.obj is raw
    assert jsonrpc.top_level_field(spliced, "isError") is True
    assert jsonrpc.dumps(jsonrpc.result_response(3, spliced)) == b'{"jsonrpc":"2.0","id":3,"result":' + value + b"}"
    assert spliced.data == value


def test_a_small_result_in_a_bytearray_is_spliced_as_bytes() -> None:
    spliced = spliced_result(bytearray(b'{"jsonrpc":"2.0","id":7,"result":[1]}'), 7, secrets_registered=False)
    assert spliced is not None and type(spliced.view()) is bytes and spliced.data == b"[1]"


@pytest.mark.parametrize(
    ("value", "is_error"),
    [(b'{"content":[],"isError":true}', True), (b'{"isError":false}', False), (b"{}", None), (b"[1]", None)],
)
def test_the_is_error_field_is_read_while_validating_and_not_parsed_again(value: bytes, is_error: bool | None) -> None:
    spliced = spliced_result(b'{"jsonrpc":"2.0","id":7,"result":' + value + b"}", 7, secrets_registered=False)
    assert spliced is not None
    assert jsonrpc.top_level_field(spliced, "isError") is is_error
    assert jsonrpc.top_level_field(RawJson(value), "isError") is is_error  # made elsewhere: parsed when asked


def test_other_top_level_fields_of_raw_values_are_read_on_demand() -> None:
    spliced = spliced_result(b'{"jsonrpc":"2.0","id":7,"result":{"a":{"b":[1]},"c":2}}', 7, secrets_registered=False)
    assert spliced is not None
    assert jsonrpc.top_level_field(spliced, "a") == {"b": [1]}
    assert jsonrpc.top_level_field(spliced, "missing") is None


@pytest.mark.parametrize("request_id", ['a"b', 0, -5, 2**63, 10**30])
@pytest.mark.parametrize("padding", [0, 100_000], ids=["small", "large"])
def test_a_response_with_a_raw_result_serializes_as_the_ordinary_path(request_id: int | str, padding: int) -> None:
    raw = bytearray(b'{"result":{"k":"\\u00e9","p":"' + b"x" * padding + b'"},"jsonrpc":"2.0","id":7}')
    spliced = spliced_result(raw, 7, secrets_registered=False)
    assert spliced is not None
    written = jsonrpc.dumps(jsonrpc.result_response(request_id, spliced))
    assert json.loads(written) == {"jsonrpc": "2.0", "id": request_id, "result": {"k": "é", "p": "x" * padding}}
    if padding or request_id != 10**30:  # (orjson refuses that id: a small value takes the standard library's path)
        assert written.endswith(b'"result":{"k":"\\u00e9","p":"' + b"x" * padding + b'"}}')


@pytest.mark.parametrize("nesting", [b"[" * 5000, b'{"a":' * 5000])
def test_json_nested_too_deeply_is_a_parse_error(nesting: bytes) -> None:
    # orjson refuses it; the standard library's fallback would recurse until the stack ends (RecursionError).
    with pytest.raises(ParseError, match="nested too deeply"):
        jsonrpc.loads(nesting)
