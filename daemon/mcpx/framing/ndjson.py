"""Newline-delimited JSON framing (MCP stdio framing, reused on the Unix socket): bytes in, lines out.

Sans-I/O. The buffer never holds more than `max_line` bytes: a longer line is reported once as `Oversized`
and its remaining bytes are dropped up to the next newline, so the stream stays usable after it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Oversized:
    """A line longer than the limit was dropped."""

    limit: int


class LineFramer:
    """Splits a byte stream into lines (without the newline; a trailing CR is removed; blank lines skipped)."""

    __slots__ = ("_buffer", "_discarding", "max_line")

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._buffer = bytearray()
        self._discarding = False

    def feed(self, data: bytes) -> list[bytes | Oversized]:
        """Add received bytes; return the complete lines (and `Oversized` markers) they finish."""
        out: list[bytes | Oversized] = []
        start = 0
        end = len(data)
        while start < end:
            newline = data.find(b"\n", start)
            if newline < 0:
                self._append(data, start, end, out)
                break
            if self._discarding:
                self._discarding = False
            elif self._buffer:
                if len(self._buffer) + (newline - start) > self.max_line:
                    out.append(Oversized(self.max_line))
                else:
                    self._buffer += data[start:newline]
                    self._emit(bytes(self._buffer), out)
                self._buffer.clear()
            elif newline - start > self.max_line:
                out.append(Oversized(self.max_line))
            else:
                self._emit(data[start:newline], out)
            start = newline + 1
        return out

    @property
    def buffered(self) -> int:
        """Bytes held for an unfinished line."""
        return len(self._buffer)

    def _append(self, data: bytes, start: int, end: int, out: list[bytes | Oversized]) -> None:
        if self._discarding:
            return
        if len(self._buffer) + (end - start) > self.max_line:
            self._buffer.clear()
            self._discarding = True
            out.append(Oversized(self.max_line))
        else:
            self._buffer += data[start:end]

    @staticmethod
    def _emit(line: bytes, out: list[bytes | Oversized]) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if line.strip():
            out.append(line)
