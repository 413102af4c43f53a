"""Logging: structlog, JSON lines to `<state dir>/mcpxd.log`, and on stderr readable lines when it is a terminal
or journal lines when systemd connected it to the journal.

Every event passes through the redactor before it is written, strings nested in its dicts and lists included, so
a secret that slipped into an event (an upstream echoing a token in an error, headers logged whole) still never
reaches a log. Per-message events are DEBUG, which costs next to nothing when filtered out.

Under systemd (`$JOURNAL_STREAM` names stderr's device and inode) each event is one line on stderr: a syslog
priority prefix (`<3>` error … `<7>` debug, which journald turns into the entry's priority, so `journalctl -p`
filters work), the event and its fields as `key=value`, without colours or a timestamp (journald stamps entries).
Newlines inside values are escaped, so an event is always one journal entry.

What an upstream can make mcpx log line after line (a stdio server's stderr, output that is not JSON-RPC) goes
through a `LineBudget`, so that a flood of it cannot flood the log.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import time
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import IO, Any

import orjson
import structlog

from mcpx.redact import redact

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
# syslog priorities (sd-daemon(3) prefixes) by structlog level name.
_PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "error": 3, "exception": 3, "critical": 2}
# Fields the journal records by itself.
_JOURNAL_SKIPS = frozenset({"event", "level", "timestamp"})
_PLAIN_VALUE = re.compile(r"[^\s\"'=\\]+")
# Event values nested deeper than this are not walked (a cycle, a pathological structure): the marker replaces them.
_MAX_DEPTH = 8
TOO_DEEP = "<too deeply nested>"
# Values that hold no text: an event made of these and strings is redacted without walking anything.
_SCALARS = (int, float, bool, type(None))


def get_logger(name: str) -> Any:
    """A structlog logger tagged with `component=name` (bound lazily, so importing modules costs nothing)."""
    return structlog.get_logger(component=name)


class LineBudget:
    """A token bucket for lines an upstream makes mcpx log (its stderr, what it sent that is not a message):
    `burst` at once, then `rate` a second; counts what it refuses, for the caller to log (`left_out`)."""

    def __init__(self, burst: int = 200, rate: float = 20.0) -> None:
        self._burst = float(burst)
        self._rate = rate
        self._tokens = float(burst)
        self._last = time.monotonic()
        self._refused = 0

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        self._refused += 1
        return False

    def left_out(self) -> int:
        """How many lines were refused since the last call (the count then starts again)."""
        refused, self._refused = self._refused, 0
        return refused


def _redact_event(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Every string of the event redacted, those nested in its dicts, lists and tuples (keys included) too."""
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = redact(value)
        elif not isinstance(value, _SCALARS):
            event[key] = _redact_nested(value, 1)
    return event


def _redact_nested(value: Any, depth: int) -> Any:
    """`value` with its strings redacted: mappings and dataclasses become dicts, sets lists, tuples stay tuples; a
    container deeper than `_MAX_DEPTH` becomes `TOO_DEEP`. Other objects are kept (the sinks redact the text they
    turn them into)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, _SCALARS):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # orjson writes a dataclass as the object of its fields, unredacted: give it that object, redacted.
        value = {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
    if not isinstance(value, Mapping | list | tuple | set | frozenset):
        return value
    if depth > _MAX_DEPTH:
        return TOO_DEEP
    if isinstance(value, Mapping):
        return {
            redact(key) if isinstance(key, str) else key: _redact_nested(item, depth + 1) for key, item in value.items()
        }
    items = [_redact_nested(item, depth + 1) for item in value]
    return tuple(items) if isinstance(value, tuple) else items


def _redacted_text(value: Any) -> str:
    """What an object JSON cannot hold becomes in the log file: its text, redacted."""
    return redact(str(value))


class _TeeLogger:
    """Final sink: one JSON line to the log file, and on stderr a readable line (a terminal) or a journal line."""

    def __init__(self, file: IO[bytes] | None, console: IO[str] | None, *, journal: bool = False) -> None:
        self._file = file
        self._console = console
        self._journal = journal
        self._render_console = (
            structlog.dev.ConsoleRenderer(colors=False) if console is not None and not journal else None
        )

    def msg(self, **event: Any) -> None:
        if self._file is not None:
            self._file.write(orjson.dumps(event, default=_redacted_text, option=orjson.OPT_APPEND_NEWLINE))
            self._file.flush()
        if self._console is None:
            return
        if self._journal:
            self._console.write(journal_line(event) + "\n")
        elif self._render_console is not None:
            # Redacted as a whole, as journal lines are: the renderer shows objects by their repr.
            self._console.write(redact(str(self._render_console(None, "", dict(event)))) + "\n")
        self._console.flush()

    debug = info = warning = error = critical = exception = msg


def journal_line(event: Mapping[str, Any]) -> str:
    """One event as one journal line: `<priority>event key=value ...`, redacted as a whole (values nested in lists
    and mappings included)."""
    priority = _PRIORITIES.get(str(event.get("level", "info")), 6)
    fields = " ".join(f"{key}={_journal_value(value)}" for key, value in event.items() if key not in _JOURNAL_SKIPS)
    text = str(event.get("event", "")).replace("\r", "\\r").replace("\n", "\\n")
    return redact(f"<{priority}>{text} {fields}" if fields else f"<{priority}>{text}")


def _journal_value(value: Any) -> str:
    if isinstance(value, str) and _PLAIN_VALUE.fullmatch(value):
        return value
    # JSON: quoted where needed, newlines escaped, one line whatever the value.
    return orjson.dumps(value, default=str).decode()


def journal_stream(stream: IO[str] | None = None, env: Mapping[str, str] = os.environ) -> bool:
    """True when systemd connected `stream` (default: stderr) to the journal: `$JOURNAL_STREAM` is the
    `device:inode` of that very stream (systemd.exec(5)). A child that inherited the variable but writes elsewhere
    (a pipe to the shim, a terminal) does not match."""
    expected = env.get("JOURNAL_STREAM", "")
    device, _, inode = expected.partition(":")
    stream = sys.stderr if stream is None else stream
    try:
        info = os.fstat(stream.fileno())
        return (info.st_dev, info.st_ino) == (int(device), int(inode))
    except (OSError, ValueError, AttributeError):
        return False


def configure_logging(
    level: str, *, log_file: Path | None, console: bool | None = None, journal: bool | None = None
) -> None:
    """Set up structlog for the daemon. `journal=None` means: when stderr is systemd's journal stream (then it gets
    journal lines); `console=None` means: when stderr is a terminal (then it gets readable lines)."""
    file: IO[bytes] | None = None
    if log_file is not None:
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        file = os.fdopen(fd, "ab", buffering=0)
    to_journal = journal_stream() if journal is None else journal
    show_console = to_journal or (sys.stderr.isatty() if console is None else console)
    sink = _TeeLogger(file, sys.stderr if show_console else None, journal=to_journal)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact_event,
            lambda _, __, event: event,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=lambda *_: sink,
        cache_logger_on_first_use=True,
    )
    # Third-party libraries (aiohttp, asyncio) log through the standard library: keep their warnings.
    logging.basicConfig(level=logging.WARNING, handlers=[_StdlibBridge()], force=True)


class _StdlibBridge(logging.Handler):
    """A standard-library record as a structlog event: its level and traceback kept (asyncio's "Exception in
    callback" and "Task exception was never retrieved" are only useful with it), redacted like every event."""

    def emit(self, record: logging.LogRecord) -> None:
        get_logger(record.name).log(record.levelno, record.getMessage(), exc_info=record.exc_info)
