"""`mcpxctl logs`: the last lines of the daemon's log (`<state_dir>/mcpxd.log`, JSON lines), readable or raw,
and `--follow` to keep printing what is appended (across the file being replaced or truncated).
Standard library only."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

_BLOCK = 1 << 16
_POLL = 0.2
# Keys every event has; the rest are printed as key=value after the event.
_FIXED = ("timestamp", "level", "component", "event", "exception")


def last_lines(path: Path, count: int) -> tuple[list[bytes], int]:
    """The last `count` complete lines of `path`, and the offset just after them, where following starts (an
    unterminated last line is left to the follower)."""
    with path.open("rb") as file:
        position = file.seek(0, os.SEEK_END)
        data = b""
        while position > 0 and data.count(b"\n") <= count:
            step = min(_BLOCK, position)
            position -= step
            file.seek(position)
            data = file.read(step) + data
    cut = data.rfind(b"\n") + 1
    lines = data[:cut].split(b"\n")[:-1]
    if position > 0:
        lines = lines[1:]  # it may have been cut at the block boundary
    return (lines[-count:] if count > 0 else []), position + cut


def render(line: bytes, *, raw: bool) -> str:
    text = line.decode("utf-8", "replace")
    if raw:
        return text
    try:
        event = json.loads(text)
    except ValueError:
        return text
    if not isinstance(event, dict):
        return text
    stamp = str(event.get("timestamp", "")).replace("T", " ").rstrip("Z")
    if "." in stamp:
        stamp = stamp[: stamp.index(".") + 4]
    extra = " ".join(f"{key}={_value(value)}" for key, value in event.items() if key not in _FIXED)
    head = f"{stamp} {event.get('level', '')!s:<7} {event.get('component', '-')}: {event.get('event', '')}"
    out = f"{head}  {extra}" if extra else head
    exception = event.get("exception")
    if isinstance(exception, str) and exception:
        out += "\n    " + exception.rstrip().replace("\n", "\n    ")
    return out


def _value(value: Any) -> str:
    if isinstance(value, str):
        return value if value and " " not in value else json.dumps(value)
    return json.dumps(value, separators=(",", ":"))


def follow(path: Path, offset: int, *, poll: float = _POLL) -> Iterator[bytes]:
    """Lines appended to `path` from `offset` on, forever; when the file is replaced or truncated, from the start
    of the new content."""
    file: IO[bytes] | None = None
    pending = b""
    try:
        while True:
            if file is None:
                try:
                    file = path.open("rb")
                except FileNotFoundError:
                    time.sleep(poll)
                    continue
                file.seek(offset)
            chunk = file.read(_BLOCK)
            if chunk:
                pending += chunk
                *lines, pending = pending.split(b"\n")
                yield from lines
                continue
            try:
                current = path.stat()
            except FileNotFoundError:
                current = None
            opened = os.fstat(file.fileno())
            replaced = current is None or (current.st_dev, current.st_ino) != (opened.st_dev, opened.st_ino)
            if replaced or opened.st_size < file.tell():
                file.close()
                file, offset, pending = None, 0, b""
                continue
            time.sleep(poll)
    finally:
        if file is not None:
            file.close()


def show(path: Path, *, count: int, follow_on: bool, raw: bool) -> int:
    try:
        lines, offset = last_lines(path, count)
    except FileNotFoundError:
        if not follow_on:
            print(f"mcpxctl: no daemon log at {path} (mcpxd has not run with this state directory)", file=sys.stderr)
            return 1
        lines, offset = [], 0
    except OSError as exc:
        print(f"mcpxctl: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return 1
    for line in lines:
        print(render(line, raw=raw))
    if not follow_on:
        return 0
    sys.stdout.flush()
    try:
        for line in follow(path, offset):
            print(render(line, raw=raw), flush=True)
    except KeyboardInterrupt:
        pass
    return 0
