"""Logging: structlog, JSON lines to `<state dir>/mcpxd.log`, readable lines on stderr when it is a terminal.

Every event passes through the redactor before it is written, so a secret that slipped into an event (an
upstream echoing a token in an error) still never reaches a log. Per-message events are DEBUG, which costs
next to nothing when filtered out.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import IO, Any

import orjson
import structlog

from mcpx.redact import redact

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def get_logger(name: str) -> Any:
    """A structlog logger tagged with `component=name` (bound lazily, so importing modules costs nothing)."""
    return structlog.get_logger(component=name)


def _redact_event(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = redact(value)
    return event


class _TeeLogger:
    """Final sink: one JSON line to the log file, and a readable line to stderr when attached to a terminal."""

    def __init__(self, file: IO[bytes] | None, console: IO[str] | None) -> None:
        self._file = file
        self._console = console
        self._render_console = structlog.dev.ConsoleRenderer(colors=False) if console is not None else None

    def msg(self, **event: Any) -> None:
        if self._file is not None:
            self._file.write(orjson.dumps(event, default=str, option=orjson.OPT_APPEND_NEWLINE))
            self._file.flush()
        if self._console is not None and self._render_console is not None:
            self._console.write(str(self._render_console(None, "", dict(event))) + "\n")
            self._console.flush()

    debug = info = warning = error = critical = exception = msg


def configure_logging(level: str, *, log_file: Path | None, console: bool | None = None) -> None:
    """Set up structlog for the daemon. `console=None` means: only when stderr is a terminal."""
    file: IO[bytes] | None = None
    if log_file is not None:
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        file = os.fdopen(fd, "ab", buffering=0)
    show_console = sys.stderr.isatty() if console is None else console
    sink = _TeeLogger(file, sys.stderr if show_console else None)
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
    def emit(self, record: logging.LogRecord) -> None:
        get_logger(record.name).warning(record.getMessage())
