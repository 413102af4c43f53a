"""The daemon's logging as configured by mcpxd: what reaches the JSON log file and the console is redacted, strings
nested in an event's values included."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog

from mcpx import log
from mcpx.redact import fingerprint, register_secret

CANARY = "CANARY-nested-log-5b8e2f1a"
MARK = f"<secret {fingerprint(CANARY)}>"


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[Path]:
    """mcpxd's logging set up to write `tmp_path/mcpxd.log` (nothing on stderr); put back as it was afterwards."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    path = tmp_path / "mcpxd.log"
    log.configure_logging("debug", log_file=path, console=False, journal=False)
    sink = structlog.get_config()["logger_factory"]()
    try:
        yield path
    finally:
        sink._file.close()
        structlog.configure(**saved)
        root.handlers[:] = handlers
        root.setLevel(level)


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@dataclass
class _Exchange:
    url: str
    headers: dict[str, str]


def test_secrets_nested_in_dicts_lists_and_tuples_are_redacted_in_the_log_file(log_file: Path) -> None:
    register_secret(CANARY)
    log.get_logger("test").warning(
        "nested",
        headers={"Authorization": f"Bearer {CANARY}", "Accept": "application/json"},
        lines=["first", f"token={CANARY}"],
        pair=(CANARY, 7),
        keyed={CANARY: {"deeper": [{"still": CANARY}]}},
        tags={CANARY},
        exchange=_Exchange("https://example.com/mcp", {"X-Key": CANARY}),
        attempt=3,
        ratio=0.5,
        final=True,
        nothing=None,
    )
    text = log_file.read_text()
    assert CANARY not in text
    [event] = _events(log_file)
    assert event["headers"] == {"Authorization": f"Bearer {MARK}", "Accept": "application/json"}
    assert event["lines"] == ["first", f"token={MARK}"]
    assert event["pair"] == [MARK, 7]
    assert event["keyed"] == {MARK: {"deeper": [{"still": MARK}]}}
    assert event["tags"] == [MARK]
    assert event["exchange"] == {"url": "https://example.com/mcp", "headers": {"X-Key": MARK}}
    assert (event["attempt"], event["ratio"], event["final"], event["nothing"]) == (3, 0.5, True, None)


def test_a_value_nested_deeper_than_the_bound_is_replaced_by_a_marker(log_file: Path) -> None:
    register_secret(CANARY)
    deep: Any = [CANARY]
    for _ in range(20):
        deep = {"level": deep}
    cycle: list[Any] = [CANARY]
    cycle.append(cycle)
    log.get_logger("test").warning("deep", deep=deep, cycle=cycle)
    assert CANARY not in log_file.read_text()
    [event] = _events(log_file)
    walked = event["deep"]
    for _ in range(8):  # the event's value and 7 levels below it are walked; the 9th is the marker
        walked = walked["level"]
    assert walked == log.TOO_DEEP
    assert event["cycle"][0] == MARK
    assert json.dumps(event["cycle"]).count(log.TOO_DEEP) == 1


def test_objects_json_cannot_hold_are_written_as_their_redacted_text(log_file: Path) -> None:
    register_secret(CANARY)
    log.get_logger("test").error("failed", error=ValueError(f"server said {CANARY}"), path=Path("/tmp") / CANARY)
    assert CANARY not in log_file.read_text()
    [event] = _events(log_file)
    assert event["error"] == f"server said {MARK}"
    assert event["path"] == f"/tmp/{MARK}"


def test_the_console_line_is_redacted_inside_nested_values_and_object_reprs() -> None:
    register_secret(CANARY)
    console = io.StringIO()
    sink = log._TeeLogger(None, console)
    event = log._redact_event(None, "warning", {"event": "x", "headers": {"Authorization": CANARY}, "obj": _Opaque()})
    sink.msg(**event)
    assert CANARY not in console.getvalue()
    assert console.getvalue().count(MARK) == 2


class _Opaque:
    def __repr__(self) -> str:
        return f"<Opaque {CANARY}>"


def test_a_standard_library_record_keeps_its_level_and_traceback_redacted(log_file: Path) -> None:
    register_secret(CANARY)
    try:
        raise ValueError(f"server said {CANARY}")
    except ValueError:
        logging.getLogger("asyncio").error("Exception in callback", exc_info=True)
    logging.getLogger("aiohttp").warning("plain %s", CANARY)
    assert CANARY not in log_file.read_text()
    failed, plain = _events(log_file)
    assert (failed["level"], failed["event"]) == ("error", "Exception in callback")
    assert f"ValueError: server said {MARK}" in failed["exception"]
    assert (plain["level"], plain["event"]) == ("warning", f"plain {MARK}")
    assert "exception" not in plain and "exc_info" not in plain
