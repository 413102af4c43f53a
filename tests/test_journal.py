"""Logging to the journal: when systemd connects mcpxd's stderr to journald (`$JOURNAL_STREAM` names that very
stream), each event is one plain line with a syslog priority prefix, redacted like every other log output."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path

from mcpx.log import journal_line, journal_stream
from mcpx.redact import register_secret
from tests.support.daemon import MCPXD, Sandbox, run, upstream_toml
from tests.support.notify import NotifySocket
from tests.support.upstream import reserve_port

WAIT = 20.0
PRIORITY_LINE = re.compile(r"<[0-7]>\S")


def _stream_id(fd: int) -> str:
    info = os.fstat(fd)
    return f"{info.st_dev}:{info.st_ino}"


def test_an_event_is_one_line_with_its_priority_and_fields() -> None:
    event = {
        "component": "mcpx.upstream",
        "upstream": "jira",
        "error": "connect failed:\nrefused",
        "attempt": 3,
        "problems": ["a = 1", 'b "quoted"'],
        "event": "upstream unavailable",
        "level": "warning",
        "timestamp": "2026-01-01T00:00:00Z",
    }
    line = journal_line(event)
    assert line == (
        '<4>upstream unavailable component=mcpx.upstream upstream=jira error="connect failed:\\nrefused" attempt=3 '
        'problems=["a = 1","b \\"quoted\\""]'
    )
    assert "\n" not in line and "2026-01-01" not in line  # journald stamps its entries itself
    levels = {"debug": "<7>", "info": "<6>", "warning": "<4>", "error": "<3>", "critical": "<2>"}
    for level, prefix in levels.items():
        assert journal_line({"event": "x", "level": level}) == f"{prefix}x"


def test_secrets_are_redacted_in_journal_lines_even_inside_nested_values() -> None:
    canary = "CANARY-journal-7c1d9e4b"
    register_secret(canary)
    line = journal_line(
        {"event": f"failed with {canary}", "level": "error", "detail": {"headers": [f"Bearer {canary}"]}}
    )
    assert canary not in line
    assert line.count("<secret sha256:") == 2


def test_journal_stream_is_recognized_only_when_it_names_this_very_stream(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    other_read, other_write = os.pipe()
    with open(write_end, "w") as stream, open(other_write, "w") as other:
        here = {"JOURNAL_STREAM": _stream_id(write_end)}
        assert journal_stream(stream, here)
        assert not journal_stream(other, here)  # inherited by a child whose stderr goes elsewhere
        assert not journal_stream(stream, {})
        assert not journal_stream(stream, {"JOURNAL_STREAM": "garbage"})
    os.close(read_end)
    os.close(other_read)


async def _daemon_stderr(sandbox: Sandbox, *, journal: bool) -> tuple[int, str]:
    """Run mcpxd until it is ready, stop it, and return its exit status and what it wrote on stderr (a pipe, named
    by `$JOURNAL_STREAM` when `journal`)."""
    read_end, write_end = os.pipe()
    notify = NotifySocket(sandbox.root)
    env = {**sandbox.env, "NOTIFY_SOCKET": str(notify.path)}
    if journal:
        env["JOURNAL_STREAM"] = _stream_id(write_end)
    try:
        process = await asyncio.create_subprocess_exec(
            MCPXD, env=env, stdin=asyncio.subprocess.DEVNULL, stderr=write_end
        )
        os.close(write_end)
        exited = asyncio.get_running_loop().create_task(process.wait())
        await notify.wait_for(lambda message: message.get("READY") == "1", exited=exited)
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT):
            code = await exited
        with open(read_end, "rb") as stderr:
            return code, stderr.read().decode()
    finally:
        notify.close()


async def test_mcpxd_logs_journal_lines_to_stderr_under_systemd(sandbox: Sandbox) -> None:
    closed = reserve_port()  # bound, never listening: the upstream is unreachable, a warning
    canary = "CANARY-journal-env-3e5f7a9c"
    sandbox.env["DOWN_TOKEN"] = canary
    port = closed.getsockname()[1]
    url = f"http://127.0.0.1:{port}/mcp"
    sandbox.write_config(upstream_toml("down", url, auth={"type": "bearer_env", "env": "DOWN_TOKEN"}))
    try:
        code, stderr = await _daemon_stderr(sandbox, journal=True)
    finally:
        closed.close()
    assert code == 0
    lines = stderr.splitlines()
    assert lines, "nothing reached the journal"
    assert all(PRIORITY_LINE.match(line) for line in lines), stderr
    assert "\x1b[" not in stderr  # no colours
    assert any(line.startswith("<6>mcpxd serving ") and f" socket={sandbox.socket} " in line for line in lines), stderr
    assert any(line.startswith("<4>upstream unavailable ") and "upstream=down" in line for line in lines), stderr
    assert any(line.startswith("<6>mcpxd stopping ") for line in lines), stderr
    assert canary not in stderr
    # The JSON log file is written as before.
    assert '"event":"mcpxd serving"' in sandbox.log.read_text()


async def test_without_the_journal_stderr_that_is_not_a_terminal_gets_nothing(sandbox: Sandbox) -> None:
    sandbox.write_config("")
    sandbox.env["JOURNAL_STREAM"] = "1:1"  # inherited, but stderr is not that stream
    code, stderr = await _daemon_stderr(sandbox, journal=False)
    assert code == 0
    assert stderr == ""


async def test_startup_errors_carry_the_error_priority_in_the_journal(sandbox: Sandbox) -> None:
    sandbox.write_config("[daemon]\nbogus = 1\n")
    read_end, write_end = os.pipe()
    env = {**sandbox.env, "JOURNAL_STREAM": _stream_id(write_end)}
    process = await asyncio.create_subprocess_exec(MCPXD, env=env, stdin=asyncio.subprocess.DEVNULL, stderr=write_end)
    os.close(write_end)
    async with asyncio.timeout(WAIT):
        code = await process.wait()
    with open(read_end, "rb") as stderr:
        lines = stderr.read().decode().splitlines()
    assert code == 2
    assert lines[0] == "<3>mcpxd: the configuration is invalid:"
    assert len(lines) > 1 and all(line.startswith("<3>  ") for line in lines[1:])
    assert any("bogus" in line for line in lines)
    # Without the journal the same messages are plain.
    code, _, plain = await run(MCPXD, env=sandbox.env)
    assert code == 2
    assert plain.splitlines()[0] == "mcpxd: the configuration is invalid:"
