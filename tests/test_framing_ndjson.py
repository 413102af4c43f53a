"""LineFramer: newline-delimited framing with a bounded buffer (sans-I/O, so every case is exact and fast)."""

from __future__ import annotations

import random

from mcpx.framing.ndjson import LineFramer, Oversized


def _feed_all(framer: LineFramer, chunks: list[bytes]) -> list[bytes | Oversized]:
    out: list[bytes | Oversized] = []
    for chunk in chunks:
        out += framer.feed(chunk)
        assert framer.buffered <= framer.max_line
    return out


def test_one_complete_line_is_returned_without_its_newline() -> None:
    assert LineFramer(100).feed(b'{"a":1}\n') == [b'{"a":1}']


def test_a_line_split_across_feeds_is_returned_once_complete() -> None:
    framer = LineFramer(100)
    assert framer.feed(b'{"jsonrpc":') == []
    assert framer.buffered == 11
    assert framer.feed(b'"2.0",') == []
    assert framer.feed(b'"id":1}\n') == [b'{"jsonrpc":"2.0","id":1}']
    assert framer.buffered == 0


def test_many_lines_in_one_feed_are_returned_in_order() -> None:
    framer = LineFramer(100)
    assert framer.feed(b"one\ntwo\nthree\n") == [b"one", b"two", b"three"]


def test_an_unfinished_last_line_is_held_until_its_newline() -> None:
    framer = LineFramer(100)
    assert framer.feed(b"one\ntwo\nthr") == [b"one", b"two"]
    assert framer.buffered == 3
    assert framer.feed(b"ee\n") == [b"three"]


def test_a_newline_alone_in_a_feed_finishes_the_buffered_line() -> None:
    framer = LineFramer(100)
    framer.feed(b"abc")
    assert framer.feed(b"\n") == [b"abc"]


def test_crlf_line_endings_lose_the_carriage_return() -> None:
    framer = LineFramer(100)
    assert framer.feed(b"one\r\ntwo\r\n") == [b"one", b"two"]


def test_crlf_split_between_feeds_loses_the_carriage_return() -> None:
    framer = LineFramer(100)
    assert framer.feed(b"one\r") == []
    assert framer.feed(b"\ntwo") == [b"one"]


def test_only_one_trailing_carriage_return_is_removed() -> None:
    assert LineFramer(100).feed(b"one\r\r\n") == [b"one\r"]


def test_a_carriage_return_inside_a_line_is_kept() -> None:
    assert LineFramer(100).feed(b"a\rb\n") == [b"a\rb"]


def test_blank_and_whitespace_only_lines_are_skipped() -> None:
    framer = LineFramer(100)
    assert framer.feed(b"\n\r\n  \n\t\r\none\n\n") == [b"one"]


def test_leading_and_trailing_spaces_of_a_line_are_kept() -> None:
    assert LineFramer(100).feed(b"  {}  \n") == [b"  {}  "]


def test_a_line_exactly_at_the_limit_is_accepted_in_one_feed() -> None:
    framer = LineFramer(10)
    assert framer.feed(b"x" * 10 + b"\n") == [b"x" * 10]


def test_a_line_exactly_at_the_limit_is_accepted_across_feeds() -> None:
    framer = LineFramer(10)
    assert framer.feed(b"x" * 4) == []
    assert framer.feed(b"x" * 6) == []
    assert framer.buffered == 10
    assert framer.feed(b"\n") == [b"x" * 10]


def test_a_line_one_byte_over_the_limit_in_one_feed_is_reported_once_and_the_stream_goes_on() -> None:
    framer = LineFramer(10)
    assert framer.feed(b"x" * 11 + b"\nnext\n") == [Oversized(10), b"next"]
    assert framer.buffered == 0


def test_a_long_line_between_good_lines_in_one_feed_is_reported_once() -> None:
    framer = LineFramer(10)
    assert framer.feed(b"before\n" + b"y" * 1000 + b"\nafter\n") == [b"before", Oversized(10), b"after"]


def test_a_long_line_across_many_feeds_is_reported_once_and_the_stream_goes_on() -> None:
    framer = LineFramer(10)
    out = framer.feed(b"x" * 6)
    out += framer.feed(b"x" * 6)  # now over the limit
    assert out == [Oversized(10)]
    assert framer.buffered == 0
    for _ in range(50):
        assert framer.feed(b"x" * 7) == []
        assert framer.buffered == 0
    assert framer.feed(b"xx\nok\n") == [b"ok"]
    assert framer.feed(b"again\n") == [b"again"]


def test_a_long_line_that_overflows_only_when_its_newline_arrives_is_reported_once() -> None:
    framer = LineFramer(10)
    assert framer.feed(b"x" * 8) == []
    assert framer.feed(b"xxx\nok\n") == [Oversized(10), b"ok"]


def test_a_long_line_arriving_in_one_unfinished_feed_is_reported_at_once_and_dropped() -> None:
    framer = LineFramer(10)
    assert framer.feed(b"z" * 100) == [Oversized(10)]
    assert framer.buffered == 0
    assert framer.feed(b"z" * 100) == []
    assert framer.feed(b"\n") == []
    assert framer.feed(b"fine\n") == [b"fine"]


def test_consecutive_long_lines_are_each_reported_once() -> None:
    framer = LineFramer(4)
    assert framer.feed(b"aaaaa\nbbbbbb\nok\n") == [Oversized(4), Oversized(4), b"ok"]


def test_the_carriage_return_of_crlf_counts_towards_the_limit() -> None:
    framer = LineFramer(4)
    assert framer.feed(b"abc\r\nabcd\r\n") == [b"abc", Oversized(4)]


def test_an_empty_feed_returns_nothing_and_keeps_the_buffer() -> None:
    framer = LineFramer(10)
    framer.feed(b"ab")
    assert framer.feed(b"") == []
    assert framer.feed(b"c\n") == [b"abc"]


def _expected(stream: bytes, limit: int) -> list[bytes | Oversized]:
    """The reference model: split on LF, an unfinished tail only counts once it is too long."""
    *lines, tail = stream.split(b"\n")
    out: list[bytes | Oversized] = []
    for line in lines:
        if len(line) > limit:
            out.append(Oversized(limit))
            continue
        text = line[:-1] if line.endswith(b"\r") else line
        if text.strip():
            out.append(text)
    if len(tail) > limit:
        out.append(Oversized(limit))
    return out


def _random_stream(rng: random.Random, limit: int) -> bytes:
    parts: list[bytes] = []
    for _ in range(rng.randint(0, 12)):
        kind = rng.random()
        if kind < 0.15:
            body = b""
        elif kind < 0.25:
            body = b" " * rng.randint(1, 3)
        elif kind < 0.4:
            body = b"L" * rng.randint(limit - 1, limit * 3)  # around and beyond the limit
        else:
            body = bytes(rng.choice(b'{}[]":,abc \r\xc3\xa9') for _ in range(rng.randint(1, limit)))
        parts.append(body + (b"\r\n" if rng.random() < 0.3 else b"\n"))
    if rng.random() < 0.5:
        parts.append(b"t" * rng.randint(1, limit * 2))  # an unfinished last line
    return b"".join(parts)


def _random_chunks(rng: random.Random, stream: bytes) -> list[bytes]:
    chunks: list[bytes] = []
    position = 0
    while position < len(stream):
        size = rng.choice([0, 1, 1, 2, 3, 5, 8, 13, 40])
        chunks.append(stream[position : position + size])
        position += size
    return chunks


def test_any_chunking_of_a_stream_yields_the_same_lines_as_feeding_it_whole() -> None:
    rng = random.Random(1234)
    for _ in range(200):
        limit = rng.randint(1, 24)
        stream = _random_stream(rng, limit)
        expected = _expected(stream, limit)
        assert _feed_all(LineFramer(limit), [stream]) == expected, stream
        assert _feed_all(LineFramer(limit), _random_chunks(rng, stream)) == expected, stream
        assert _feed_all(LineFramer(limit), [stream[i : i + 1] for i in range(len(stream))]) == expected, stream
