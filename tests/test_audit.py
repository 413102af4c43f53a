"""The audit log: one line per tool call with who, what, how long and how it ended; rotated by size; arguments
only when configured, and never a secret."""

from __future__ import annotations

import datetime
import json
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError

from mcpx.audit import AuditLog, timestamp
from tests.support.daemon import Sandbox, agent, running_daemon, upstream_toml
from tests.support.upstream import Upstream, running


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_each_tool_call_is_recorded_without_its_arguments(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=True)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    async with running(alpha), running_daemon(sandbox), agent(sandbox) as client:
        await client.call_tool("alpha__echo", {"text": "private words"})
        with pytest.raises(MCPError, match="unknown tool"):
            await client.call_tool("alpha__nope", {})
    audit = sandbox.state / "audit.jsonl"
    assert stat.S_IMODE(audit.stat().st_mode) == 0o600
    ok, unknown = _lines(audit)
    assert ok["tool"] == "alpha__echo" and ok["upstream"] == "alpha" and ok["outcome"] == "ok"
    assert ok["agent"] == "mcp" and isinstance(ok["pid"], int) and isinstance(ok["ms"], float)
    assert "arguments" not in ok and "private words" not in audit.read_text()
    assert unknown["tool"] == "alpha__nope" and unknown["upstream"] is None and unknown["outcome"] == "agent_error"


async def test_arguments_are_recorded_when_asked_for_and_secrets_are_scrubbed(sandbox: Sandbox) -> None:
    canary = "canary-secret-4f9a1c"
    alpha = Upstream("alpha", json_response=True)
    sandbox.env["ALPHA_TOKEN"] = canary
    sandbox.write_config(
        "[daemon]\naudit_arguments = true\n\n"
        + upstream_toml("alpha", alpha.url, auth={"type": "bearer_env", "env": "ALPHA_TOKEN"})
    )
    async with running(alpha), running_daemon(sandbox), agent(sandbox) as client:
        await client.call_tool("alpha__echo", {"text": f"leak {canary}"})
    (entry,) = _lines(sandbox.state / "audit.jsonl")
    assert isinstance(entry["arguments"], dict) and str(entry["arguments"]["text"]).startswith("leak <secret sha256:")
    assert canary not in (sandbox.state / "audit.jsonl").read_text()


def test_the_log_rotates_by_size_and_keeps_the_configured_backups(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", max_bytes=200, backups=2)
    for index in range(40):
        log.record({"n": index, "pad": "x" * 40})
    log.close()
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    newest = _lines(tmp_path / "audit.jsonl")
    assert newest[-1]["n"] == 39
    assert _lines(tmp_path / "audit.jsonl.1")[-1]["n"] == newest[0]["n"] - 1  # nothing lost between files
    assert all(path.stat().st_size <= 200 for path in tmp_path.iterdir())


async def test_a_tool_that_reports_an_error_is_recorded_as_a_tool_error(sandbox: Sandbox) -> None:
    def failing(server: MCPServer) -> None:
        @server.tool()
        def broken() -> str:
            raise ValueError("it broke")

    alpha = Upstream("alpha", json_response=False, customize=failing)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    async with running(alpha), running_daemon(sandbox), agent(sandbox) as client:
        assert (await client.call_tool("alpha__broken", {})).is_error
        assert not (await client.call_tool("alpha__echo", {"text": "fine"})).is_error
    broken, fine = _lines(sandbox.state / "audit.jsonl")
    assert (broken["tool"], broken["outcome"]) == ("alpha__broken", "tool_error")
    assert (fine["tool"], fine["outcome"]) == ("alpha__echo", "ok")


@pytest.mark.parametrize("now", [1_700_000_000.0, 1_700_000_000.25, 1_700_000_000.9994, 1_700_000_001.5, 86_399.001])
def test_record_times_read_as_an_iso_timestamp_with_milliseconds_would(
    now: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(time, "time", lambda: now)
    expected = datetime.datetime.fromtimestamp(now, datetime.UTC).isoformat(timespec="milliseconds")
    assert timestamp() == expected
