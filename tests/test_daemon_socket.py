"""The daemon's socket: private permissions, one daemon per socket, stale sockets, other users, clean shutdown."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import signal
import socket
import stat
import sys
from pathlib import Path
from typing import Any, cast

import pytest
from structlog.testing import capture_logs

from mcpx import paths
from mcpx.daemon import EXIT_ALREADY_RUNNING, EXIT_CONFIG, EXIT_SERVING_FAILED, EXIT_STARTUP
from mcpx.downstream import server
from mcpx.downstream.listener import bind_socket
from tests.support.daemon import MCPXD, Sandbox, agent, mcpxctl, run, running_daemon, upstream_toml

NOBODY = 65534

# Run as another user: connect, send `initialize`, and report every byte received and how the connection ended.
_PEER_SNIPPET = """
import json, os, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(10)
sock.connect(sys.argv[1])
received = b""
end = "eof"
try:
    sock.sendall(b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25",'
                 b'"capabilities":{},"clientInfo":{"name":"intruder","version":"1"}}}\\n')
    while chunk := sock.recv(65536):
        received += chunk
except (BrokenPipeError, ConnectionResetError) as exc:
    end = type(exc).__name__
except TimeoutError:
    end = "timeout"
print(json.dumps({"uid": os.getuid(), "received": received.decode("latin-1"), "end": end}))
"""


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _log_events(sandbox: Sandbox) -> list[dict[str, Any]]:
    return [json.loads(line) for line in sandbox.log.read_text().splitlines() if line.strip()]


async def test_socket_dir_state_dir_are_0700_and_socket_log_are_0600(sandbox: Sandbox) -> None:
    sandbox.write_config("")
    async with running_daemon(sandbox):
        assert stat.S_ISSOCK(sandbox.socket.lstat().st_mode)
        assert _mode(sandbox.socket.parent) == 0o700
        assert _mode(sandbox.socket) == 0o600
        assert _mode(sandbox.state) == 0o700
        assert _mode(sandbox.log) == 0o600


async def test_second_daemon_on_the_same_socket_refuses_and_the_first_keeps_serving(sandbox: Sandbox) -> None:
    sandbox.write_config("")
    async with running_daemon(sandbox):
        code, stdout, stderr = await run(MCPXD, env=sandbox.env)
        assert code == EXIT_ALREADY_RUNNING
        assert stdout == ""
        lock = paths.socket_lock(sandbox.socket)
        assert stderr.splitlines() == [f"mcpxd: mcpxd is already running on {sandbox.socket} (it holds {lock})"]

        code, stdout, stderr = await mcpxctl(sandbox, "status", "--json")
        assert code == 0, stderr
        assert json.loads(stdout)["socket"] == str(sandbox.socket)


async def test_stale_socket_file_is_replaced_and_the_daemon_serves(sandbox: Sandbox) -> None:
    sandbox.write_config("")
    sandbox.socket.parent.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sandbox.socket))  # bound, never listening: connections are refused, as after a crash
    stale.close()
    assert stat.S_ISSOCK(sandbox.socket.lstat().st_mode)

    async with running_daemon(sandbox):
        code, _, stderr = await mcpxctl(sandbox, "status")
        assert code == 0, stderr
        async with agent(sandbox) as client:
            await client.list_tools()
        assert _mode(sandbox.socket) == 0o600


async def test_path_that_is_not_a_socket_makes_the_daemon_exit_with_a_clear_message(sandbox: Sandbox) -> None:
    sandbox.write_config("")
    sandbox.socket.parent.mkdir(mode=0o700)
    sandbox.socket.write_text("precious data\n")

    code, stdout, stderr = await run(MCPXD, env=sandbox.env)

    assert code == EXIT_STARTUP
    assert stdout == ""
    assert stderr.splitlines() == [
        f"mcpxd: {sandbox.socket} exists and is not a socket: remove it or choose another path"
    ]
    assert sandbox.socket.read_text() == "precious data\n"


async def test_connection_from_another_user_is_refused_before_a_byte_is_read(sandbox: Sandbox) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another uid")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    sandbox.write_config("")
    async with running_daemon(sandbox):
        # Let uid 65534 reach the socket, so that only the daemon's peer check can stop it.
        sandbox.root.chmod(0o711)
        sandbox.socket.parent.chmod(0o711)
        sandbox.socket.chmod(0o666)

        code, stdout, stderr = await run(
            setpriv,
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            sys.executable,
            "-I",
            "-S",
            "-c",
            _PEER_SNIPPET,
            str(sandbox.socket),
            env={"PATH": sandbox.env["PATH"]},
        )
        assert code == 0, stderr
        report = json.loads(stdout)
        assert report["uid"] == NOBODY
        assert report["received"] == ""
        assert report["end"] in ("eof", "ConnectionResetError", "BrokenPipeError")

        refused = [
            event for event in _log_events(sandbox) if event.get("event") == "refused a connection from another user"
        ]
        assert [event.get("uid") for event in refused] == [NOBODY]
        assert not any(event.get("event") == "agent connected" for event in _log_events(sandbox))

        async with agent(sandbox) as client:
            assert (await client.list_tools()).tools == []


async def test_sigterm_makes_the_daemon_exit_0_and_remove_its_socket(sandbox: Sandbox) -> None:
    sandbox.write_config("")
    async with running_daemon(sandbox) as daemon:
        assert stat.S_ISSOCK(sandbox.socket.lstat().st_mode)
        daemon.signal(signal.SIGTERM)
        assert daemon.process is not None
        async with asyncio.timeout(15):
            code = await daemon.process.wait()
        assert code == 0
        assert not sandbox.socket.exists()


async def test_invalid_config_exits_2_naming_file_upstream_and_field_and_serves_nothing(sandbox: Sandbox) -> None:
    sandbox.write_config(
        upstream_toml("broken", "ftp://example.com/mcp") + upstream_toml("slow", "http://127.0.0.1:9/mcp", timeout=-1)
    )

    code, stdout, stderr = await run(MCPXD, env=sandbox.env)

    assert code == EXIT_CONFIG
    assert stdout == ""
    lines = stderr.splitlines()
    assert lines[0] == "mcpxd: the configuration is invalid:"
    problems = lines[1:]
    assert len(problems) == 2, stderr
    assert all(str(sandbox.config) in problem for problem in problems), stderr
    assert any("'broken'" in problem and "url" in problem for problem in problems), stderr
    assert any("'slow'" in problem and "timeout" in problem for problem in problems), stderr
    assert not sandbox.socket.exists()
    assert not sandbox.socket.parent.exists()


# --- the accept loop ---------------------------------------------------------------------------------------------


class _Received(asyncio.Protocol):
    """Stands in for an agent connection: hands over the first bytes it gets."""

    def __init__(self, first: asyncio.Future[bytes]) -> None:
        self._first = first

    def data_received(self, data: bytes) -> None:
        if not self._first.done():
            self._first.set_result(data)


@pytest.mark.plain_python_only
async def test_running_out_of_descriptors_pauses_accepting_and_the_queued_agents_are_served_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = asyncio.get_running_loop()
    accept = loop.sock_accept
    queued = asyncio.Event()

    def error(number: int) -> OSError:
        return OSError(number, os.strerror(number))

    # What accept(2) does, call after call, while both agents wait in the backlog: two spells of shortage.
    script: list[OSError | None] = [error(errno.EMFILE), error(errno.EMFILE), ConnectionAbortedError(), None]
    script += [error(errno.ENFILE), error(errno.ENOBUFS), error(errno.ENOMEM), None]

    async def scripted_accept(sock: socket.socket) -> tuple[socket.socket, Any]:
        await queued.wait()
        failure = script.pop(0) if script else None
        if failure is not None:
            raise failure
        return await accept(sock)

    monkeypatch.setattr(loop, "sock_accept", scripted_accept)
    monkeypatch.setattr(server, "ACCEPT_RETRY_DELAY", 0.01)
    firsts: list[asyncio.Future[bytes]] = [loop.create_future(), loop.create_future()]
    unclaimed = list(firsts)
    path = tmp_path / "s.sock"
    listener = server.AgentListener(bind_socket(path), lambda peer, lifeline: cast(Any, _Received(unclaimed.pop(0))))
    clients = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in firsts]
    with capture_logs() as logs:
        serving = loop.create_task(listener.serve())
        try:
            for number, client in enumerate(clients):
                client.connect(str(path))
                client.sendall(b'{"jsonrpc":"2.0","id":%d,"method":"ping"}\n' % number)
            queued.set()
            async with asyncio.timeout(10):
                received = await asyncio.gather(*firsts)
            assert sorted(received) == [b'{"jsonrpc":"2.0","id":%d,"method":"ping"}\n' % n for n in (0, 1)]
            assert not serving.done()
        finally:
            for client in clients:
                client.close()
            serving.cancel()
            listener.close()
    retrying = ("warning", "cannot accept agent connections: out of resources; retrying")
    again = ("warning", "accepting agent connections again")
    assert [(event["log_level"], event["event"]) for event in logs] == [retrying, again, retrying, again]
    errors = [event["error"] for event in logs if "error" in event]
    assert errors == [os.strerror(errno.EMFILE), os.strerror(errno.ENFILE)]
    assert all(event["after_s"] >= 0.02 for event in logs if event["event"] == again[1])  # two pauses each


# Runs mcpxd with an accept loop that fails as no retry can mend (here: at once).
_BROKEN_ACCEPT = """
import errno, sys
from mcpx import daemon
from mcpx.downstream import server

async def serve(self):
    raise OSError(errno.EBADF, "injected")

server.AgentListener.serve = serve
sys.exit(daemon.main())
"""


@pytest.mark.plain_python_only
async def test_when_the_accept_loop_fails_the_daemon_stops_unsuccessfully(sandbox: Sandbox) -> None:
    sandbox.write_config("")

    code, _, stderr = await run(sys.executable, "-c", _BROKEN_ACCEPT, env=sandbox.env, timeout=20)

    assert code == EXIT_SERVING_FAILED, stderr
    stopping = "the agent socket is no longer served: stopping"
    failed = [event for event in _log_events(sandbox) if event["event"] == stopping]
    assert [event["error"] for event in failed] == ["OSError(9, 'injected')"]
    assert not sandbox.socket.exists()
