"""Server-sent events decoder (WHATWG HTML §9.2 "event stream" parsing): bytes in, events out.

Sans-I/O. Lines may end in CRLF, LF or CR; a leading BOM is ignored; comment lines are skipped. The bytes held
for one event never exceed `max_event`: beyond that `FrameTooLarge` is raised and the stream must be dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from mcpx.errors import FrameTooLarge

_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class SSEEvent:
    event: str
    data: str
    id: str | None
    retry: int | None


class SSEDecoder:
    """Incremental `text/event-stream` decoder."""

    def __init__(self, max_event: int) -> None:
        self.max_event = max_event
        self._line = bytearray()
        self._pending_cr = False
        self._at_start = True
        self._event_size = 0
        self._data: list[str] = []
        self._event_type = ""
        self._last_id: str | None = None
        self._retry: int | None = None

    @property
    def last_event_id(self) -> str | None:
        return self._last_id

    @property
    def retry(self) -> int | None:
        """The last `retry:` value read (milliseconds), whether or not an event with data followed it (SSE priming
        events carry only an id and a retry)."""
        return self._retry

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if self._at_start:
            self._line += chunk
            if len(self._line) < len(_BOM) and _BOM.startswith(bytes(self._line)):
                return []
            chunk = bytes(self._line)
            self._line.clear()
            self._at_start = False
            if chunk.startswith(_BOM):
                chunk = chunk[len(_BOM) :]
        if not chunk:
            return []
        events: list[SSEEvent] = []
        position = 0
        if self._pending_cr and chunk[:1] == b"\n":
            position = 1
        self._pending_cr = False
        length = len(chunk)
        while position < length:
            cr = chunk.find(b"\r", position)
            lf = chunk.find(b"\n", position)
            if cr < 0 and lf < 0:
                self._grow(length - position)
                self._line += chunk[position:]
                break
            if cr < 0 or (0 <= lf < cr):
                end, next_position = lf, lf + 1
            else:
                end = cr
                if cr + 1 < length:
                    next_position = cr + 2 if chunk[cr + 1 : cr + 2] == b"\n" else cr + 1
                else:
                    next_position = cr + 1
                    self._pending_cr = True
            self._grow(end - position)
            self._line += chunk[position:end]
            event = self._process_line(bytes(self._line))
            self._line.clear()
            if event is not None:
                events.append(event)
            position = next_position
        return events

    def _grow(self, count: int) -> None:
        self._event_size += count
        if self._event_size > self.max_event:
            raise FrameTooLarge(self.max_event)

    def _process_line(self, raw: bytes) -> SSEEvent | None:
        if not raw:
            return self._dispatch()
        if raw.startswith(b":"):
            return None
        line = raw.decode("utf-8", "replace")
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event_type = value
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)
        return None

    def _dispatch(self) -> SSEEvent | None:
        self._event_size = 0
        data = "\n".join(self._data)
        self._data = []
        if not data:
            self._event_type = ""
            return None
        event = SSEEvent(self._event_type or "message", data, self._last_id, self._retry)
        self._event_type = ""
        return event
