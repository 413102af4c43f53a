"""mcpxd under a service manager: sd_notify messages (start, reload, refused reload, watchdog, stop) captured on a
fake NOTIFY_SOCKET, and socket activation (a socket passed with LISTEN_FDS/LISTEN_PID, by `systemd-socket-activate`
when the machine has it and by a tiny exec wrapper in any case)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import stat
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mcpx.daemon import EXIT_STARTUP
from mcpx.downstream.listener import StartupError, inherited_socket
from mcpx.notify import watchdog_interval
from tests.support.daemon import MCPXD, Sandbox, agent, mcpxctl, upstream_toml
from tests.support.notify import NotifySocket
from tests.support.upstream import Upstream, running

# Binds (and, with "listen", listens on) a Unix socket as fd 3, sets LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES for its
# own pid and execs the command, which keeps the pid: what systemd does for a socket unit.
_ACTIVATE = """
import os, socket, sys
path, mode, command = sys.argv[1], sys.argv[2], sys.argv[3:]
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.bind(path)
os.chmod(path, 0o666)
if mode == "listen":
    sock.listen(16)
if sock.fileno() == 3:
    os.set_inheritable(3, True)
else:
    os.dup2(sock.fileno(), 3)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="mcpx")
os.execv(command[0], command)
"""


class Started:
    """One mcpxd process, its exit task and the notification socket it reports to."""

    def __init__(self, process: asyncio.subprocess.Process, notify: NotifySocket) -> None:
        self.process = process
        self.notify = notify
        self.exited = asyncio.get_running_loop().create_task(process.wait())

    async def expect(self, key: str, value: str = "1") -> dict[str, str]:
        return await self.notify.wait_for(lambda message: message.get(key) == value, exited=self.exited)

    async def stop(self) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            return await self.exited


@contextlib.asynccontextmanager
async def started(sandbox: Sandbox, *command: str, env: dict[str, str] | None = None) -> AsyncIterator[Started]:
    notify = NotifySocket(sandbox.root)
    process = await asyncio.create_subprocess_exec(
        *(command or (MCPXD,)),
        env={**sandbox.env, "NOTIFY_SOCKET": str(notify.path), **(env or {})},
        stdin=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    daemon = Started(process, notify)
    try:
        yield daemon
    finally:
        with contextlib.suppress(ProcessLookupError):
            await daemon.stop()
        notify.close()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# --- sd_notify ---------------------------------------------------------------------------------------------------


async def test_start_reload_refused_reload_and_stop_are_reported_to_the_service_manager(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=True)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    async with running(alpha), started(sandbox) as daemon:
        ready = await daemon.expect("READY")
        assert ready["MAINPID"] == str(daemon.process.pid)
        assert ready["STATUS"].endswith("upstreams ready, 0 agents")
        code, _, stderr = await mcpxctl(sandbox, "tools")  # tools/list waits for the upstream's first attempt
        assert code == 0, stderr

        code, _, stderr = await mcpxctl(sandbox, "reload")
        assert code == 0, stderr
        reloading = await daemon.expect("RELOADING")
        stamp = int(reloading["MONOTONIC_USEC"])
        assert 0 < time.monotonic_ns() // 1000 - stamp < 60_000_000  # CLOCK_MONOTONIC, as systemd wants
        after = await daemon.expect("READY")
        assert after["STATUS"] == "1/1 upstreams ready, 0 agents"

        sandbox.write_config("[daemon]\nbogus = 1\n")
        daemon.process.send_signal(signal.SIGHUP)
        await daemon.expect("RELOADING")
        await daemon.expect("READY")  # a refused reload ends the reload too: the old config keeps serving

        code, _, stderr = await mcpxctl(sandbox, "reload")
        assert code == 1  # what makes `systemctl --user reload mcpx` fail visibly (ExecReload=mcpxctl reload)
        assert "invalid" in stderr
        await daemon.expect("RELOADING")
        await daemon.expect("READY")

        assert await daemon.stop() == 0
        stopping = await daemon.notify.wait_for(lambda message: "STOPPING" in message)
        assert stopping == {"STOPPING": "1"}
    assert not any("WATCHDOG" in message for message in daemon.notify.messages)


async def test_the_watchdog_is_pinged_from_the_event_loop_when_systemd_asks_for_it(sandbox: Sandbox) -> None:
    sandbox.write_config("")
    async with started(sandbox, env={"WATCHDOG_USEC": "100000"}) as daemon:
        await daemon.expect("READY")
        for _ in range(3):
            await daemon.expect("WATCHDOG")
        assert await daemon.stop() == 0


def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_this_process() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


# --- socket activation -------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="needs systemd-socket-activate")
async def test_systemd_socket_activate_starts_mcpxd_on_the_first_connection_and_keeps_the_socket(
    sandbox: Sandbox,
) -> None:
    passed = sandbox.root / "act" / "mcpx.sock"  # not MCPX_SOCKET: the passed socket's path wins
    passed.parent.mkdir(mode=0o700)
    sandbox.write_config("")
    names = ["HOME", "MCPX_CONFIG", "MCPX_STATE_DIR", "MCPX_SOCKET", "PYTHON_KEYRING_BACKEND", "NOTIFY_SOCKET"]
    command = ["systemd-socket-activate", "--listen", str(passed), "--fdname=mcpx"]
    command += [f"--setenv={name}" for name in names] + [MCPXD]
    async with started(sandbox, *command) as daemon:
        assert daemon.process.stderr is not None
        async with asyncio.timeout(20):
            announced = await daemon.process.stderr.readline()
        assert b"Listening on" in announced
        assert not sandbox.log.exists()  # nothing started yet: the daemon starts on the first connection

        code, stdout, stderr = await mcpxctl(sandbox, "--socket", str(passed), "status", "--json")
        assert code == 0, stderr  # this connection was queued by the socket and served by the daemon it started
        assert f'"pid": {daemon.process.pid},' in stdout
        assert f'"socket": "{passed}"' in stdout
        await daemon.expect("READY")
        assert _mode(passed) == 0o600

        assert await daemon.stop() == 0
    assert stat.S_ISSOCK(passed.lstat().st_mode)  # the socket unit owns the file; the daemon leaves it


@pytest.mark.parametrize("listening", [True, False], ids=["listening", "not listening"])
async def test_a_socket_passed_by_the_service_manager_is_served_instead_of_binding_one(
    sandbox: Sandbox, listening: bool
) -> None:
    alpha = Upstream("alpha", json_response=True)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    passed = sandbox.socket
    passed.parent.mkdir(mode=0o700)
    command = [sys.executable, "-c", _ACTIVATE, str(passed), "listen" if listening else "bind", MCPXD]
    async with running(alpha), started(sandbox, *command) as daemon:
        if not listening:
            assert await daemon.exited == EXIT_STARTUP
            assert daemon.process.stderr is not None
            stderr = (await daemon.process.stderr.read()).decode()
            assert stderr.strip() == "mcpxd: the passed socket (fd 3) is not a listening Unix stream socket"
            return
        await daemon.expect("READY")
        assert _mode(passed) == 0o600  # tightened: the wrapper bound it 0666
        async with agent(sandbox) as client:
            names = {tool.name for tool in (await client.list_tools()).tools}
        assert "alpha__echo" in names
        assert await daemon.stop() == 0
    assert stat.S_ISSOCK(passed.lstat().st_mode)


def test_passed_sockets_are_ignored_unless_they_are_for_this_process() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "mcpx", "OTHER": "x"}
    assert inherited_socket(env) is None
    assert env == {"OTHER": "x"}  # never handed on to a child
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}
    assert inherited_socket(env) is None
    assert inherited_socket({}) is None


def test_several_passed_sockets_without_one_named_mcpx_are_refused() -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "web:admin"}
    with pytest.raises(StartupError, match="FileDescriptorName=mcpx"):
        inherited_socket(env)
