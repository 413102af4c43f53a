"""The audit log: one JSON line per tool call in `<state dir>/audit.jsonl`, rotated by size.

Each line says when, which agent (client name and pid), which upstream and tool, how long and how it ended.
Arguments are recorded only when `[daemon] audit_arguments = true`, and like everything written here they pass
through secret scrubbing. Writes are single `O_APPEND` writes of whole lines, so a crash never leaves half a
record in the middle of the file.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from mcpx import jsonrpc
from mcpx.log import get_logger
from mcpx.redact import scrub

_log = get_logger("mcpx.audit")


class _Clock:
    """The time of a record, as `datetime.now(UTC).isoformat(timespec="milliseconds")` writes it, at a fraction of
    its cost (about 17,000 interpreter instructions per call): the part up to the second is formatted once a second."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._prefix}.{int((now - second) * 1000):03d}+00:00"


timestamp = _Clock().now


class AuditLog:
    def __init__(self, path: Path, *, max_bytes: int, backups: int) -> None:
        self.path = path
        self._max_bytes = max_bytes
        self._backups = backups
        self._fd: int | None = None
        self._size = 0

    def record(self, entry: dict[str, Any]) -> None:
        line = scrub(jsonrpc.dumps(entry)) + b"\n"
        try:
            if self._fd is None:
                self._open()
            elif self._size + len(line) > self._max_bytes:
                self._rotate()
            assert self._fd is not None
            os.write(self._fd, line)
            self._size += len(line)
        except OSError as exc:
            # The audit log must never fail a call; the daemon log says why it is incomplete.
            _log.debug("audit record not written", error=str(exc))
            self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        self._size = os.fstat(self._fd).st_size

    def _rotate(self) -> None:
        self.close()
        for index in range(self._backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{index + 1}"))
        if self._backups > 0:
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink(missing_ok=True)
        self._open()
