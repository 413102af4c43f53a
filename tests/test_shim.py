"""mcpx-shim: starts the daemon when none runs, fails in one line, relays MCP only, and imports only the stdlib."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import SHIM, Sandbox, agent, mcpxctl, run, running_daemon, upstream_toml
from tests.support.lifecycle import PipeAgent, wait_for_exit
from tests.support.results import text_of
from tests.support.stdio import stdio_toml
from tests.support.upstream import TOOLS, Upstream, running

SHIM_DIR = Path(__file__).resolve().parent.parent / "shim"


async def _stop_daemon_if_running(sandbox: Sandbox) -> int | None:
    """SIGTERM the daemon that answers on the sandbox socket (if any) and wait for it to exit; returns its pid."""
    code, stdout, _ = await mcpxctl(sandbox, "status", "--json")
    if code != 0:
        return None
    pid = int(json.loads(stdout)["pid"])
    os.kill(pid, signal.SIGTERM)
    await wait_for_exit(pid)
    return pid


def _is_jsonrpc_message(message: Any) -> bool:
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        return False
    if "method" in message:
        return isinstance(message["method"], str)
    return "id" in message and (("result" in message) ^ ("error" in message))


async def test_shim_starts_the_daemon_when_none_runs_and_the_daemon_keeps_running(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=True)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    assert not sandbox.socket.exists()
    async with running(alpha):
        try:
            async with agent(sandbox) as client:
                names = sorted(tool.name for tool in (await client.list_tools()).tools)
                assert names == sorted(f"alpha__{tool}" for tool in TOOLS)
                result = await client.call_tool("alpha__echo", {"text": "via shim"})
                assert text_of(result) == "alpha:via shim"

            code, stdout, stderr = await mcpxctl(sandbox, "status", "--json")
            assert code == 0, stderr
            status = json.loads(stdout)
            assert status["socket"] == str(sandbox.socket)
            assert status["config"] == str(sandbox.config)
            assert [upstream["name"] for upstream in status["upstreams"]] == ["alpha"]
        finally:
            pid = await _stop_daemon_if_running(sandbox)
    assert pid is not None
    code, _, stderr = await mcpxctl(sandbox, "status")
    assert code != 0
    assert "mcpxd is not running" in stderr


async def test_shim_fails_in_one_line_when_the_daemon_cannot_start(sandbox: Sandbox) -> None:
    sandbox.write_config(upstream_toml("broken", "ftp://example.com/mcp"))

    code, stdout, stderr = await run(SHIM, env=sandbox.env)

    assert code != 0
    assert stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("mcpx-shim:")
    assert "the configuration is invalid" in lines[0]
    assert "'broken'" in lines[0]
    assert "url" in lines[0]
    assert not sandbox.socket.exists()


async def test_shim_with_bad_arguments_prints_usage_and_exits_non_zero(sandbox: Sandbox) -> None:
    for args in (["--bogus"], ["--config"], ["stray"]):
        code, stdout, stderr = await run(SHIM, *args, env=sandbox.env)
        assert code != 0, args
        assert stdout == ""
        lines = stderr.splitlines()
        assert len(lines) == 1, (args, stderr)
        assert lines[0].startswith("mcpx-shim: usage: mcpx-shim"), stderr
    assert not sandbox.socket.exists()


async def test_shim_stdout_carries_only_jsonrpc_messages_and_it_exits_0_when_stdin_closes(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=False)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    requests = [
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "raw", "version": "1"},
            },
        },
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
    ]
    payload = b"".join(json.dumps(request).encode() + b"\n" for request in requests) + b"{this is not json\n"
    async with running(alpha), running_daemon(sandbox):
        process = await asyncio.create_subprocess_exec(
            SHIM,
            env=sandbox.env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert process.stdin is not None
            assert process.stdout is not None
            assert process.stderr is not None
            process.stdin.write(payload)
            await process.stdin.drain()
            messages: list[Any] = []
            responses: dict[Any, Any] = {}
            async with asyncio.timeout(15):
                while not {1, 2, None} <= responses.keys():
                    line = await process.stdout.readline()
                    assert line.endswith(b"\n"), line
                    message = json.loads(line)
                    messages.append(message)
                    if "method" not in message:
                        responses[message.get("id")] = message
                process.stdin.close()
                rest = await process.stdout.read()
                stderr = await process.stderr.read()
                code = await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        messages += [json.loads(line) for line in rest.splitlines()]
        assert all(_is_jsonrpc_message(message) for message in messages), messages
        assert responses[1]["result"]["serverInfo"]["name"] == "mcpx"
        assert "alpha__echo" in {tool["name"] for tool in responses[2]["result"]["tools"]}
        assert responses[None]["error"]["code"] == -32700
        assert code == 0
        assert stderr == b""


def test_shim_imports_only_builtin_and_os_modules_and_nothing_from_mcpx() -> None:
    probe = (
        f"import sys; sys.path.insert(0, {str(SHIM_DIR)!r}); before = set(sys.modules); import mcpx_shim; "
        "print(sorted(set(sys.modules) - before))"
    )
    completed = subprocess.run(
        [sys.executable, "-I", "-S", "-c", probe], capture_output=True, text=True, timeout=30, check=True
    )
    imported = set(ast.literal_eval(completed.stdout))
    assert "mcpx_shim" in imported
    # `os` and what it needs (loaded by `site` in a normal start, which -S skips) are the only non-builtins.
    allowed = {"mcpx_shim", "_socket", "_thread", "os", "os.path", "posixpath", "genericpath", "stat", "_stat"}
    allowed |= {"_collections_abc"}
    assert imported <= allowed, imported - allowed


async def _shim_session(sandbox: Sandbox, env: dict[str, str]) -> tuple[str, str, list[dict[str, Any]]]:
    """Run the shim as an agent would (pipes), do initialize + tools/call, and report where its stdin and
    stdout point once the session runs, plus the replies."""
    process = await asyncio.create_subprocess_exec(
        SHIM, env=env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert process.stdin is not None and process.stdout is not None
    requests = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-11-25"}},
        {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "alpha__echo", "arguments": {"text": "x"}},
        },
    ]
    replies = []
    for request in requests:
        process.stdin.write(json.dumps(request).encode() + b"\n")
        await process.stdin.drain()
        async with asyncio.timeout(10):
            while (reply := json.loads(await process.stdout.readline())).get("id") != request["id"]:
                pass  # a notification (tools/list_changed while upstreams connect)
        replies.append(reply)
    stdin_target = os.readlink(f"/proc/{process.pid}/fd/0")
    stdout_target = os.readlink(f"/proc/{process.pid}/fd/1")
    process.stdin.close()
    async with asyncio.timeout(10):
        assert await process.wait() == 0
    return stdin_target, stdout_target, replies


async def test_shim_hands_agent_pipes_to_the_daemon_or_relays_when_asked(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=True)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    async with running(alpha), running_daemon(sandbox):
        # Attach mode (the default with pipes): the shim keeps no copy of the agent's pipes.
        stdin_target, stdout_target, replies = await _shim_session(sandbox, sandbox.env)
        assert (stdin_target, stdout_target) == ("/dev/null", "/dev/null")
        assert replies[1]["result"]["content"][0]["text"] == "alpha:x"
        # Relay mode: the shim copies bytes itself, and the session works the same.
        stdin_target, stdout_target, replies = await _shim_session(sandbox, {**sandbox.env, "MCPX_SHIM_RELAY": "1"})
        assert stdin_target.startswith("pipe:") and stdout_target.startswith("pipe:")
        assert replies[1]["result"]["content"][0]["text"] == "alpha:x"


async def test_a_config_path_that_is_a_fifo_does_not_hang_the_shim_or_mcpxctl(sandbox: Sandbox) -> None:
    # Opening a FIFO for reading blocks until a writer comes: neither the agent's start nor mcpxctl may wait on it.
    alpha = Upstream("alpha", json_response=True)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    async with running(alpha), running_daemon(sandbox):
        sandbox.config.unlink()
        os.mkfifo(sandbox.config)
        async with asyncio.timeout(20), agent(sandbox) as client:  # the socket from $MCPX_SOCKET
            assert text_of(await client.call_tool("alpha__echo", {"text": "x"})) == "alpha:x"
        code, stdout, stderr = await mcpxctl(sandbox, "status")
        assert code == 0, stderr
        assert "alpha" in stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_no_process_mcpxd_starts_holds_an_agents_pipes(sandbox: Sandbox) -> None:
    """The pipes the shim hands over are close-on-exec in mcpxd: a stdio server it starts later (here agent B's
    own, per-agent by default) must not be able to read agent A's requests or write into its output."""
    sandbox.write_config(stdio_toml("local"))
    init = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}
    async with running_daemon(sandbox) as daemon, PipeAgent.running(sandbox) as a, PipeAgent.running(sandbox) as b:
        for peer in (a, b):
            await peer.send({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": init})
            await peer.response(0)
        await b.send(
            {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "local__echo", "arguments": {}}}
        )
        await b.response(1)  # B's server process runs now
        a_pipes = {_pipe_of(pipe) for pipe in (a.process.stdin, a.process.stdout)}
        assert daemon.process is not None
        # What the fix sets: mcpxd's own descriptors of A's pipes are close-on-exec (the stdio spawn also closes
        # what it does not pass, so the servers' view below holds either way; any other exec would not).
        in_daemon = [
            fd for fd in os.listdir(f"/proc/{daemon.process.pid}/fd") if _target(daemon.process.pid, fd) in a_pipes
        ]
        assert in_daemon
        for fd in in_daemon:
            assert _fd_flags(daemon.process.pid, fd) & os.O_CLOEXEC, f"mcpxd's fd {fd} of agent A's pipe is inheritable"
        servers = _children(daemon.process.pid)
        assert servers
        for pid in servers:
            held = {_target(pid, fd) for fd in os.listdir(f"/proc/{pid}/fd")}
            assert not held & a_pipes, f"server {pid} holds agent A's pipes"


def _target(pid: int, fd: str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:  # (closed meanwhile)
        return ""


def _fd_flags(pid: int, fd: str) -> int:
    for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("flags:"):
            return int(line.split()[1], 8)
    raise AssertionError(f"no flags for fd {fd}")


def _pipe_of(stream: Any) -> str:
    transport = stream.transport if hasattr(stream, "transport") else stream._transport
    return os.readlink(f"/proc/self/fd/{transport.get_extra_info('pipe').fileno()}")


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            if int(status.split("PPid:")[1].split()[0]) == pid:
                found.append(int(entry))
    return found
