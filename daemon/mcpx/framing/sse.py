"""Server-sent events decoder (WHATWG HTML §9.2 "event stream" parsing): bytes in, events out.

Sans-I/O. Lines may end in CRLF, LF or CR; a leading BOM is ignored; comment lines are skipped. The bytes held
for one event never exceed `max_event`: beyond that `FrameTooLarge` is raised and the stream must be dropped.

An event's data stays bytes (UTF-8, invalid sequences replaced by U+FFFD as the spec's decoding would): MCP
events carry JSON, which is parsed from bytes, so decoding a large result to text and encoding it back would
only copy it twice. A data line that arrives in one chunk costs one slice; one spread over many chunks is kept
as those chunks and joined once at its end.
"""

from __future__ import annotations

from dataclasses import dataclass

from mcpx.errors import FrameTooLarge

_BOM = b"\xef\xbb\xbf"
_COLON = 0x3A
_SPACE = 0x20
# A field name longer than this is none of the four the decoder keeps: the rest of its line is not held.
_LONGEST_FIELD = len(b"retry")
_KEPT = frozenset({b"data", b"event", b"id", b"retry"})
_IGNORED = b"(ignored)"  # the field of a comment line or of an unknown field, once known


@dataclass(frozen=True, slots=True)
class SSEEvent:
    event: str
    data: bytes  # UTF-8
    id: str | None
    retry: int | None


class SSEDecoder:
    """Incremental `text/event-stream` decoder."""

    def __init__(self, max_event: int) -> None:
        self.max_event = max_event
        # The current line when it started in an earlier chunk: its field once known (else None) and its bytes
        # so far (after "<field>:" once the field is known; empty for ignored fields).
        self._field: bytes | None = None
        self._pieces: list[bytes] = []
        self._pending_cr = False
        self._at_start = True
        self._head = b""  # the first bytes of the stream while they may still be the start of a BOM
        self._event_size = 0
        self._data: list[bytes] = []
        self._event_type = ""
        # The `id:` of the event being read, and the last event id: the id of the last event dispatched (WHATWG
        # SSE: the buffer becomes the stream's last event id only when its event ends, data or not).
        self._id_buffer: str | None = None
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

    def restart(self) -> None:
        """A new response resumes the stream: what was left of the old one mid-line or mid-event is dropped (the
        server sends that event again, whole); the last event id and the `retry` value are kept."""
        self._field, self._pieces = None, []
        self._pending_cr = False
        self._at_start, self._head = True, b""
        self._event_size = 0
        self._data, self._event_type = [], ""
        self._id_buffer = self._last_id

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if self._at_start:
            if self._head:
                chunk, self._head = self._head + chunk, b""
            if len(chunk) < len(_BOM) and _BOM.startswith(chunk):
                self._head = chunk
                return []
            self._at_start = False
            if chunk.startswith(_BOM):
                chunk = chunk[len(_BOM) :]
        length = len(chunk)
        if not length:
            return []
        events: list[SSEEvent] = []
        position = 0
        if self._pending_cr:
            self._pending_cr = False
            if chunk[0] == 0x0A:
                position = 1
        # Each of the chunk's line breaks is searched for once (a search per line from its start would scan the
        # rest of the chunk again for every line of a chunk without CR).
        lf = chunk.find(b"\n", position)
        cr = chunk.find(b"\r", position) if b"\r" in chunk else -1
        while position < length:
            if 0 <= lf < position:
                lf = chunk.find(b"\n", position)
            if 0 <= cr < position:
                cr = chunk.find(b"\r", position)
            if cr < 0 and lf < 0:
                self._partial(chunk, position, length)
                break
            if cr < 0 or (0 <= lf < cr):
                end, next_position = lf, lf + 1
            else:
                end = cr
                if cr + 1 < length:
                    next_position = cr + 2 if chunk[cr + 1] == 0x0A else cr + 1
                else:
                    next_position = cr + 1
                    self._pending_cr = True
            event = self._line(chunk, position, end)
            if event is not None:
                events.append(event)
            position = next_position
        return events

    def _grow(self, count: int) -> None:
        self._event_size += count
        if self._event_size > self.max_event:
            raise FrameTooLarge(self.max_event)

    # --- lines ---------------------------------------------------------------------------------------------------

    def _line(self, chunk: bytes, start: int, end: int) -> SSEEvent | None:
        """The line `chunk[start:end]` (without its ending) is complete."""
        self._grow(end - start)
        if self._field is None and not self._pieces:  # the whole line is in this chunk: the common case
            if start == end:
                return self._dispatch()
            if chunk[start] == _COLON:
                return None  # a comment
            colon = chunk.find(b":", start, end)
            if colon < 0:
                if end - start <= _LONGEST_FIELD:
                    self._field_value(chunk[start:end], b"")
                return None
            name = chunk[start:colon]
            if name in _KEPT:
                value_start = colon + 1
                if value_start < end and chunk[value_start] == _SPACE:
                    value_start += 1
                self._field_value(name, chunk[value_start:end])
            return None
        self._add_piece(chunk, start, end)
        field, pieces = self._field, self._pieces
        self._field, self._pieces = None, []
        if field is None:  # no colon yet, and short: the whole line is the field name
            self._field_value(b"".join(pieces), b"")
        elif field is not _IGNORED:
            if pieces and pieces[0][0] == _SPACE:
                pieces[0] = pieces[0][1:]
            self._field_value(field, pieces[0] if len(pieces) == 1 else b"".join(pieces))
        return None

    def _partial(self, chunk: bytes, start: int, end: int) -> None:
        """`chunk[start:end]` starts or continues a line that does not end in this chunk."""
        self._grow(end - start)
        self._add_piece(chunk, start, end)

    def _add_piece(self, chunk: bytes, start: int, end: int) -> None:
        if start == end or self._field is _IGNORED:
            return
        if self._field is not None:
            self._pieces.append(chunk[start:end])  # the whole chunk is the same object, not a copy
            return
        # The field is not known yet: only the line's first bytes are held until its colon shows it.
        self._pieces.append(chunk[start:end])
        head = b"".join(self._pieces)
        if head[0] == _COLON:
            self._field, self._pieces = _IGNORED, []
            return
        colon = head.find(b":")
        if colon < 0:
            if len(head) > _LONGEST_FIELD:
                self._field, self._pieces = _IGNORED, []  # a field name none of the kept ones: nothing to hold
            else:
                self._pieces = [head]
            return
        field = head[:colon]
        if field in _KEPT:
            self._field = field
            rest = head[colon + 1 :]
            self._pieces = [rest] if rest else []
        else:
            self._field, self._pieces = _IGNORED, []

    def _field_value(self, name: bytes, value: bytes) -> None:
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event_type = value.decode("utf-8", "replace")
        elif name == b"id":
            if b"\0" not in value:
                self._id_buffer = value.decode("utf-8", "replace")
        elif name == b"retry" and value.isdigit():  # bytes.isdigit: ASCII digits only
            self._retry = int(value)

    def _dispatch(self) -> SSEEvent | None:
        self._event_size = 0
        self._last_id = self._id_buffer
        pieces, self._data = self._data, []
        data = pieces[0] if len(pieces) == 1 else b"\n".join(pieces)
        if not data:
            self._event_type = ""
            return None
        if not data.isascii():
            try:
                data.decode()
            except UnicodeDecodeError:
                data = data.decode("utf-8", "replace").encode()
        event = SSEEvent(self._event_type or "message", data, self._last_id, self._retry)
        self._event_type = ""
        return event
