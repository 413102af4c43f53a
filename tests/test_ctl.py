"""mcpxctl: status (table and JSON), logout, and a one-line error when no daemon runs."""

from __future__ import annotations

import json
import socket

import pytest

from mcpx.cli.ctl import render_status
from tests.support.daemon import Sandbox, agent, mcpxctl, running_daemon, upstream_toml
from tests.support.upstream import Upstream, reserve_port, running

COMMANDS = [["status"], ["status", "--json"], ["reload"], ["logout", "alpha"], ["tools"], ["tools", "--json"]]


@pytest.mark.parametrize("stale_socket", [False, True], ids=["no socket", "stale socket"])
@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
async def test_every_command_without_a_daemon_says_mcpxd_is_not_running(
    sandbox: Sandbox, command: list[str], stale_socket: bool
) -> None:
    if stale_socket:
        sandbox.socket.parent.mkdir(mode=0o700)
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(sandbox.socket))  # bound, never listening: what a crashed daemon leaves behind
        stale.close()

    code, stdout, stderr = await mcpxctl(sandbox, *command)

    assert code != 0
    assert stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert "mcpxd is not running" in lines[0]


async def test_status_json_reports_daemon_upstreams_and_connected_agents(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=True)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    async with running(alpha), running_daemon(sandbox) as daemon:
        code, stdout, stderr = await mcpxctl(sandbox, "status", "--json")
        assert code == 0, stderr
        before = json.loads(stdout)
        assert before["agents"] == 0

        async with agent(sandbox) as client:
            await client.list_tools()  # waits until the upstream's first connection attempt has ended
            code, stdout, stderr = await mcpxctl(sandbox, "status", "--json")
            assert code == 0, stderr
            status = json.loads(stdout)

    assert daemon.process is not None
    assert status["pid"] == daemon.process.pid
    assert isinstance(status["uptime_s"], int | float)
    assert status["uptime_s"] >= 0
    assert status["socket"] == str(sandbox.socket)
    assert status["config"] == str(sandbox.config)
    assert status["agents"] == 1
    [upstream] = status["upstreams"]
    assert upstream["name"] == "alpha"
    assert upstream["url"] == alpha.url
    assert upstream["state"] == "ready"
    assert upstream["tools"] == 5
    assert upstream["last_error"] is None


async def test_status_table_lists_each_upstream_with_its_state(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=True)
    closed = reserve_port()  # bound, not listening: connections to it are refused
    down_url = f"http://127.0.0.1:{closed.getsockname()[1]}/mcp"
    sandbox.write_config(upstream_toml("alpha", alpha.url) + upstream_toml("gone", down_url))
    try:
        async with running(alpha), running_daemon(sandbox):
            async with agent(sandbox) as client:
                await client.list_tools()  # both upstreams have made their first attempt
            code, stdout, stderr = await mcpxctl(sandbox, "status")
    finally:
        closed.close()

    assert code == 0, stderr
    rows = {line.split()[0]: line.split() for line in stdout.splitlines() if line.strip()}
    assert rows["UPSTREAM"][:3] == ["UPSTREAM", "STATE", "TOOLS"]
    assert rows["alpha"][1:3] == ["ready", "5"]
    assert alpha.url in rows["alpha"]
    assert rows["gone"][1:3] == ["down", "0"]
    assert down_url in rows["gone"]


def test_status_says_once_where_the_oauth_upstreams_keep_their_tokens() -> None:
    note = "the OS keyring did not answer within 3 s"
    oauth = {"logged_in": True, "storage": "file", "storage_note": note, "expires_in": 600}
    upstream = {
        "state": "ready",
        "tools": 1,
        "auth": "oauth",
        "url": "https://example.test/mcp",
        "last_error": None,
        "withheld_tools": [],
    }
    status = {
        "version": "0",
        "pid": 1,
        "uptime_s": 5,
        "agents": 0,
        "socket": "s",
        "config": "c",
        "log_file": "l",
        "upstreams": [{**upstream, "name": "jira", "oauth": oauth}, {**upstream, "name": "wiki", "oauth": oauth}],
    }
    rendered = render_status(status)
    assert "jira: logged in (OAuth, file, token expires in 10m" in rendered
    assert "wiki: logged in (OAuth, file" in rendered
    assert rendered.count(note) == 1
    assert rendered.endswith(f"OAuth tokens are kept in a private file, not the OS keyring: {note}")


async def test_logout_of_a_bearer_env_upstream_says_nothing_is_stored(sandbox: Sandbox) -> None:
    sandbox.env["ALPHA_TOKEN"] = "alpha-token-1234"
    sandbox.write_config(
        upstream_toml("alpha", "http://127.0.0.1:9/mcp", auth={"type": "bearer_env", "env": "ALPHA_TOKEN"})
    )
    async with running_daemon(sandbox):
        code, stdout, stderr = await mcpxctl(sandbox, "logout", "alpha")
    assert code == 0, stderr
    assert stdout.splitlines() == ["upstream 'alpha' uses bearer_env credentials: mcpx stores nothing for it"]
    assert "alpha-token-1234" not in stdout + stderr


async def test_logout_of_an_unknown_upstream_exits_non_zero_with_a_message(sandbox: Sandbox) -> None:
    sandbox.write_config(upstream_toml("alpha", "http://127.0.0.1:9/mcp"))
    async with running_daemon(sandbox):
        code, stdout, stderr = await mcpxctl(sandbox, "logout", "nope")
    assert code != 0
    assert stdout == ""
    assert stderr.splitlines() == ["mcpxctl: no upstream named 'nope'"]


def test_mcpxctl_and_its_command_modules_import_only_the_standard_library() -> None:
    """mcpxctl starts fast: no third-party package and no pydantic config models at import time (doctor and
    import load the config loader inside the command)."""
    import subprocess
    import sys

    modules = ["mcpx.cli.ctl", "mcpx.cli.tools", "mcpx.cli.logs", "mcpx.cli.service", "mcpx.cli.doctor"]
    modules.append("mcpx.cli.importer")
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        f"for name in {modules!r}: __import__(name)\n"
        "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] not in sys.stdlib_module_names"
        " and m.split('.')[0] != 'mcpx' or m.startswith('mcpx.config')))"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"


def test_mcpxctl_does_not_load_the_browser_opener_until_a_login_needs_it() -> None:
    import subprocess
    import sys

    code = "import sys, mcpx.cli.ctl; print(sorted({'mcpx.cli.opener', 'webbrowser'} & set(sys.modules)))"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"
