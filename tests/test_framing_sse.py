"""SSEDecoder: `text/event-stream` parsing (WHATWG HTML "event stream" interpretation), bytes in, events out."""

from __future__ import annotations

import random

import pytest

from mcpx.errors import FrameTooLarge
from mcpx.framing.sse import SSEDecoder, SSEEvent

BOM = b"\xef\xbb\xbf"


def _message(data: str, event_id: str | None = None, retry: int | None = None) -> SSEEvent:
    return SSEEvent("message", data.encode(), event_id, retry)


def _feed_all(decoder: SSEDecoder, chunks: list[bytes]) -> list[SSEEvent]:
    events: list[SSEEvent] = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    return events


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_each_line_ending_ends_lines_and_a_blank_line_dispatches(ending: bytes) -> None:
    stream = b"data: one" + ending + b"data: two" + ending + ending + b"data: three" + ending + ending
    assert SSEDecoder(1000).feed(stream) == [_message("one\ntwo"), _message("three")]


def test_mixed_line_endings_in_one_stream_are_all_understood() -> None:
    stream = b"data: a\rdata: b\ndata: c\r\n\r" + b"data: d\n\r\n"
    assert SSEDecoder(1000).feed(stream) == [_message("a\nb\nc"), _message("d")]


def test_cr_at_the_end_of_a_chunk_and_lf_at_the_start_of_the_next_are_one_line_ending() -> None:
    decoder = SSEDecoder(1000)
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\ndata: b\r") == []
    assert decoder.feed(b"\n\r") == [_message("a\nb")]
    assert decoder.feed(b"\n") == []  # the LF completing the dispatching CRLF is not another blank line
    assert decoder.feed(b"data: c\n\n") == [_message("c")]


def test_a_lone_cr_at_the_end_of_a_chunk_ends_the_line_when_no_lf_follows() -> None:
    decoder = SSEDecoder(1000)
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\r") == [_message("a")]


def test_cr_then_an_empty_chunk_then_lf_is_still_one_line_ending() -> None:
    decoder = SSEDecoder(1000)
    events = decoder.feed(b"data: a\r")
    events += decoder.feed(b"")
    events += decoder.feed(b"\ndata: b\n\n")
    assert events == [_message("a\nb")]


def test_a_leading_bom_is_ignored() -> None:
    assert SSEDecoder(1000).feed(BOM + b"data: x\n\n") == [_message("x")]


def test_a_leading_bom_split_across_chunks_is_ignored() -> None:
    decoder = SSEDecoder(1000)
    assert decoder.feed(BOM[:1]) == []
    assert decoder.feed(BOM[1:2]) == []
    assert decoder.feed(BOM[2:] + b"data: x\n\n") == [_message("x")]


def test_a_bom_later_in_the_stream_is_not_stripped() -> None:
    decoder = SSEDecoder(1000)
    assert decoder.feed(b"data: a\n\n") == [_message("a")]
    # "\ufeffdata" is an unknown field name, so this event has no data.
    assert decoder.feed(BOM + b"data: b\n\n") == []


def test_a_first_chunk_that_only_looks_like_the_start_of_a_bom_is_not_lost() -> None:
    decoder = SSEDecoder(1000)
    assert decoder.feed(b"d") == []
    assert decoder.feed(b"ata: x\n\n") == [_message("x")]


def test_comment_lines_are_skipped() -> None:
    stream = b": keep-alive\n\n:\ndata: a\n: in the middle\ndata: b\n\n"
    assert SSEDecoder(1000).feed(stream) == [_message("a\nb")]


def test_multi_line_data_is_joined_with_newlines_and_keeps_empty_lines() -> None:
    stream = b"data: first\ndata:\ndata: third\n\n"
    assert SSEDecoder(1000).feed(stream) == [_message("first\n\nthird")]


def test_only_one_space_after_the_colon_is_removed() -> None:
    stream = b"data:no-space\n\ndata:  two-spaces\n\ndata: a: b\n\n"
    assert SSEDecoder(1000).feed(stream) == [_message("no-space"), _message(" two-spaces"), _message("a: b")]


def test_a_field_without_a_colon_has_an_empty_value() -> None:
    assert SSEDecoder(1000).feed(b"data\ndata: x\n\n") == [_message("\nx")]


def test_event_id_and_retry_fields_are_reported_with_the_event() -> None:
    stream = b"event: update\nid: 7\nretry: 3000\ndata: {}\n\n"
    assert SSEDecoder(1000).feed(stream) == [SSEEvent("update", b"{}", "7", 3000)]


def test_the_event_type_resets_after_each_event_but_the_id_persists() -> None:
    decoder = SSEDecoder(1000)
    assert decoder.feed(b"event: special\nid: 1\ndata: a\n\ndata: b\n\n") == [
        SSEEvent("special", b"a", "1", None),
        _message("b", "1"),
    ]
    assert decoder.last_event_id == "1"


def test_an_empty_id_field_clears_the_last_event_id() -> None:
    decoder = SSEDecoder(1000)
    decoder.feed(b"id: 1\ndata: a\n\n")
    assert decoder.feed(b"id\ndata: b\n\n") == [_message("b", "")]


def test_an_id_containing_nul_is_ignored() -> None:
    decoder = SSEDecoder(1000)
    assert decoder.feed(b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n") == [_message("a", "1"), _message("b", "1")]


def test_a_non_numeric_retry_is_ignored() -> None:
    assert SSEDecoder(1000).feed(b"retry: 10s\ndata: a\n\n") == [_message("a")]


def test_a_retry_of_non_ascii_digits_is_ignored() -> None:
    # The spec takes retry only when it "consists of only ASCII digits"; "²" and "٣" are Unicode digits.
    decoder = SSEDecoder(1000)
    assert decoder.feed("retry: ²\ndata: a\n\nretry: ٣\ndata: b\n\n".encode()) == [_message("a"), _message("b")]


def test_unknown_fields_are_ignored() -> None:
    assert SSEDecoder(1000).feed(b"foo: bar\ndata: a\n\n") == [_message("a")]


def test_a_priming_event_with_only_an_id_is_not_dispatched_but_sets_the_last_event_id() -> None:
    decoder = SSEDecoder(1000)
    assert decoder.feed(b"id: prime-1\ndata:\n\n") == []
    assert decoder.last_event_id == "prime-1"
    assert decoder.feed(b"id: prime-2\n\n") == []
    assert decoder.last_event_id == "prime-2"
    assert decoder.feed(b"data: x\n\n") == [_message("x", "prime-2")]


def test_an_event_type_without_data_is_dropped_and_does_not_leak_into_the_next_event() -> None:
    decoder = SSEDecoder(1000)
    assert decoder.feed(b"event: ping\n\ndata: x\n\n") == [_message("x")]


def test_an_unfinished_event_is_not_dispatched() -> None:
    decoder = SSEDecoder(1000)
    assert decoder.feed(b"data: x\n") == []
    assert decoder.feed(b"data: y") == []


def test_data_is_decoded_as_utf8_even_when_a_character_is_split_across_chunks() -> None:
    encoded = "data: é€😀\n\n".encode()
    decoder = SSEDecoder(1000)
    events = _feed_all(decoder, [encoded[i : i + 1] for i in range(len(encoded))])
    assert events == [_message("é€😀")]


def test_invalid_utf8_is_replaced_not_raised() -> None:
    assert SSEDecoder(1000).feed(b"data: \xff\n\n") == [_message("\ufffd")]


def test_an_event_at_the_limit_is_accepted() -> None:
    line = b"data: " + b"x" * 10  # 16 bytes
    assert SSEDecoder(16).feed(line + b"\n\n") == [_message("x" * 10)]


def test_an_event_past_the_limit_in_one_chunk_raises_frame_too_large() -> None:
    with pytest.raises(FrameTooLarge) as raised:
        SSEDecoder(16).feed(b"data: " + b"x" * 11 + b"\n\n")
    assert raised.value.limit == 16


def test_an_unfinished_line_past_the_limit_raises_before_its_end_arrives() -> None:
    decoder = SSEDecoder(16)
    decoder.feed(b"data: xxxx")
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"x" * 100)


def test_the_limit_applies_to_the_whole_event_not_each_line() -> None:
    decoder = SSEDecoder(40)
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"data: aaaa\n" * 5)


def test_the_limit_is_per_event_so_a_long_stream_of_small_events_is_fine() -> None:
    decoder = SSEDecoder(40)
    events = decoder.feed(b"data: aaaa\n\n" * 100)
    assert events == [_message("aaaa")] * 100


def _random_value(rng: random.Random) -> str:
    return "".join(rng.choice("ab: é€{}\"'") for _ in range(rng.randint(0, 8)))


def _random_stream(rng: random.Random) -> tuple[bytes, list[SSEEvent]]:
    """A random stream (random line endings, comments, fields, BOM) and the events it must decode to."""
    lines: list[str] = []
    expected: list[SSEEvent] = []
    last_id: str | None = None
    retry: int | None = None
    for _ in range(rng.randint(0, 6)):
        if rng.random() < 0.3:
            lines.append(": comment " + _random_value(rng))
        event_type = rng.choice([None, "message", "update"])
        if event_type is not None:
            lines.append(f"event: {event_type}")
        if rng.random() < 0.4:
            last_id = _random_value(rng)
            lines.append(f"id: {last_id}")
        if rng.random() < 0.2:
            retry = rng.randint(0, 100000)
            lines.append(f"retry: {retry}")
        data = [_random_value(rng) for _ in range(rng.randint(0, 3))]
        lines += [f"data: {value}" for value in data]
        lines.append("")
        if "\n".join(data):
            expected.append(SSEEvent(event_type or "message", "\n".join(data).encode(), last_id, retry))
    stream = bytearray(BOM if rng.random() < 0.3 else b"")
    previous = b""
    for line in lines:
        ending = rng.choice([b"\n", b"\r\n", b"\r"])
        if previous == b"\r" and not line and ending == b"\n":
            ending = b"\r"  # "\r" + "\n" would be one CRLF line ending, swallowing this blank line
        stream += line.encode() + ending
        previous = ending
    return bytes(stream), expected


def _random_chunks(rng: random.Random, stream: bytes) -> list[bytes]:
    chunks: list[bytes] = []
    position = 0
    while position < len(stream):
        size = rng.choice([1, 1, 2, 3, 5, 8, 13, 40])
        chunks.append(stream[position : position + size])
        position += size
    return chunks


def test_any_chunking_of_a_stream_yields_the_same_events_as_feeding_it_whole() -> None:
    rng = random.Random(1234)
    for _ in range(200):
        stream, expected = _random_stream(rng)
        assert SSEDecoder(1 << 20).feed(stream) == expected, stream
        assert _feed_all(SSEDecoder(1 << 20), _random_chunks(rng, stream)) == expected, stream
        assert _feed_all(SSEDecoder(1 << 20), [stream[i : i + 1] for i in range(len(stream))]) == expected, stream


@pytest.mark.parametrize(
    "stream",
    [
        b"data: abc\n\n",
        b"data:abc\n\n",
        b"data:  two spaces\n\n",
        b"event: e\ndata: x\n\n",
        b"id: 5\nretry: 20\ndata: y\n\n",
        b": comment\nfoo: bar\ndata\ndata: z\n\n",
        b"datax: no\ndata: yes\n\n",
        b"retrying: 5\ndata: v\n\n",
    ],
)
def test_a_stream_split_in_two_anywhere_decodes_as_when_whole(stream: bytes) -> None:
    expected = SSEDecoder(1000).feed(stream)
    for cut in range(len(stream) + 1):
        decoder = SSEDecoder(1000)
        assert _feed_all(decoder, [stream[:cut], stream[cut:]]) == expected, cut


def test_a_long_data_line_over_many_chunks_arrives_whole() -> None:
    value = bytes(range(32, 127)) * 2000
    stream = b"data: " + value + b"\ndata: end\n\n"
    chunks = [stream[i : i + 1000] for i in range(0, len(stream), 1000)]
    assert _feed_all(SSEDecoder(1 << 20), chunks) == [SSEEvent("message", value + b"\nend", None, None)]


def test_invalid_utf8_in_a_line_over_several_chunks_is_replaced() -> None:
    stream = b"data: a\xffb" + "é".encode() + b"\n\n"
    events = _feed_all(SSEDecoder(1000), [stream[i : i + 3] for i in range(0, len(stream), 3)])
    assert events == [_message("a\ufffdbé")]


def test_a_long_unknown_field_split_across_chunks_is_not_held_but_counts_against_the_limit() -> None:
    decoder = SSEDecoder(100)
    assert decoder.feed(b"unknownfield") == []
    assert decoder.feed(b": " + b"x" * 50) == []
    assert decoder.feed(b"\ndata: ok\n\n") == [_message("ok")]
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"unknown: " + b"x" * 200)


def test_the_id_of_an_event_that_has_not_ended_is_not_yet_the_last_event_id() -> None:
    decoder = SSEDecoder(1024)
    decoder.feed(b"id: e1\ndata: one\n\nid: e2\ndata: tw")
    assert decoder.last_event_id == "e1"  # e2's event may never end: resuming after it would skip it
    assert decoder.feed(b"o\n\n") == [_message("two", "e2")]
    assert decoder.last_event_id == "e2"


def test_a_restart_drops_what_the_old_stream_left_unfinished_and_keeps_the_last_id_and_retry() -> None:
    decoder = SSEDecoder(1024)
    decoder.feed(b'retry: 20\nid: e1\ndata:\n\nid: e2\nevent: special\ndata: {"half')
    decoder.restart()
    assert decoder.last_event_id == "e1" and decoder.retry == 20
    assert decoder.feed(b"\xef\xbb\xbfid: e2\ndata: whole\n\n") == [_message("whole", "e2", 20)]
