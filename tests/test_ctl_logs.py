"""`mcpxctl logs`: the last N lines, readable or raw, the log of the running daemon or of the configured state
directory, and `-f` following appends, a replaced file and a truncated one."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import pytest

from mcpx.cli import logs
from tests.support.daemon import MCPXCTL, Sandbox, mcpxctl, running_daemon


@pytest.mark.parametrize("block", [7, 1 << 16], ids=["tiny blocks", "one block"])
def test_last_lines_returns_complete_lines_and_where_to_follow_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    monkeypatch.setattr(logs, "_BLOCK", block)
    path = tmp_path / "log"
    body = b"".join(b"line %d\n" % number for number in range(1, 21))
    path.write_bytes(body + b"partial")

    assert logs.last_lines(path, 3) == ([b"line 18", b"line 19", b"line 20"], len(body))
    assert logs.last_lines(path, 1) == ([b"line 20"], len(body))
    assert logs.last_lines(path, 0) == ([], len(body))
    everything, _ = logs.last_lines(path, 100)
    assert everything == [b"line %d" % number for number in range(1, 21)]

    path.write_bytes(b"")
    assert logs.last_lines(path, 5) == ([], 0)


def test_render_makes_events_readable_and_leaves_other_lines_alone() -> None:
    event = {
        "component": "mcpx.daemon",
        "socket": "/run/x.sock",
        "pid": 7,
        "reason": "two words",
        "event": "mcpxd serving",
        "level": "info",
        "timestamp": "2026-11-21T13:30:46.585462Z",
        "exception": "Traceback (most recent call last):\nValueError: x",
    }
    line = json.dumps(event).encode()

    assert logs.render(line, raw=False).splitlines() == [
        '2026-11-21 13:30:46.585 info    mcpx.daemon: mcpxd serving  socket=/run/x.sock pid=7 reason="two words"',
        "    Traceback (most recent call last):",
        "    ValueError: x",
    ]
    assert logs.render(line, raw=True) == line.decode()
    assert logs.render(b"not json at all", raw=False) == "not json at all"


async def test_logs_prints_the_running_daemons_log_and_the_configured_one_after_it_stopped(sandbox: Sandbox) -> None:
    sandbox.write_config("")
    code, _, stderr = await mcpxctl(sandbox, "logs")
    assert code == 1
    assert stderr.strip() == f"mcpxctl: no daemon log at {sandbox.log} (mcpxd has not run with this state directory)"

    async with running_daemon(sandbox):
        code, running_out, stderr = await mcpxctl(sandbox, "logs")
        assert code == 0, stderr
    code, stopped_out, stderr = await mcpxctl(sandbox, "logs", "-n", "1", "--json")

    assert code == 0, stderr
    assert "info    mcpx.daemon: mcpxd serving  socket=" in running_out
    assert json.loads(stopped_out)["event"] == "mcpxd stopping"


async def test_follow_prints_appended_lines_and_survives_rotation_and_truncation(sandbox: Sandbox) -> None:
    sandbox.state.mkdir(mode=0o700)
    sandbox.log.write_text("old 1\nold 2\n")
    process = await asyncio.create_subprocess_exec(
        MCPXCTL, "logs", "-f", "-n", "1", env=sandbox.env, stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None

    async def next_line() -> str:
        assert process.stdout is not None
        async with asyncio.timeout(20):
            return (await process.stdout.readline()).decode().rstrip("\n")

    try:
        assert await next_line() == "old 2"
        with sandbox.log.open("a") as log:
            log.write("new 1\nnew ")
            log.flush()
            log.write("2\n")
        assert await next_line() == "new 1"
        assert await next_line() == "new 2"

        sandbox.log.rename(sandbox.state / "mcpxd.log.1")  # rotated away, a new file in its place
        sandbox.log.write_text("fresh 1\n" + "x" * 100 + "\n")
        assert await next_line() == "fresh 1"
        assert await next_line() == "x" * 100

        # Truncated in place, and shorter than what was read (as `tail -F`, a truncation followed at once by
        # more than was there before cannot be told from appends).
        sandbox.log.write_text("")
        with sandbox.log.open("a") as log:
            log.write("after truncation\n")
        assert await next_line() == "after truncation"
    finally:
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            code = await process.wait()
    assert code == 0
    assert os.path.exists(sandbox.log)
