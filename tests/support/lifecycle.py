"""For tests of mcpxd's lifecycle (reload, stop, restart): a tool whose calls wait for the test, an upstream that
offers logging, an agent that speaks raw JSON-RPC through the real shim's pipes, and finding (and stopping) the
mcpxd that a shim started by itself."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcp.server import ServerRequestContext
from mcp.server.mcpserver import MCPServer
from mcp.types import EmptyResult, SetLevelRequestParams

from tests.support.daemon import MCPXD, SHIM, Sandbox, mcpxctl
from tests.support.notify import NotifySocket

WAIT = 30.0


@dataclass
class GatedTool:
    """A tool `name` whose calls wait until `gate` is set; `started` is set once `expected` calls are waiting."""

    name: str
    expected: int = 1
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: int = 0

    def customize(self, server: MCPServer) -> None:
        async def gated(text: str) -> str:
            self.waiting += 1
            if self.waiting >= self.expected:
                self.started.set()
            await self.gate.wait()
            return f"gated:{text}"

        server.tool(name=self.name)(gated)


def offers_logging(server: MCPServer) -> None:
    """Make `server` offer the logging capability (MCPServer has no decorator for logging/setLevel)."""

    async def set_level(ctx: ServerRequestContext[Any], params: SetLevelRequestParams) -> EmptyResult:
        return EmptyResult()

    server._lowlevel_server.add_request_handler("logging/setLevel", SetLevelRequestParams, set_level)


async def daemon_pid(sandbox: Sandbox) -> int | None:
    """The pid of the mcpxd answering on the sandbox socket, or None."""
    code, stdout, _ = await mcpxctl(sandbox, "status", "--json")
    return int(json.loads(stdout)["pid"]) if code == 0 else None


async def daemon_status(sandbox: Sandbox) -> dict[str, Any]:
    code, stdout, stderr = await mcpxctl(sandbox, "status", "--json")
    assert code == 0, stderr
    status = json.loads(stdout)
    assert isinstance(status, dict)
    return status


async def wait_for_exit(pid: int, timeout: float = WAIT) -> None:
    """Wait until `pid` (not our child: a shim started it in its own session) has exited."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        if hasattr(os, "pidfd_open"):
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                return
            exited = asyncio.Event()
            loop.add_reader(fd, exited.set)
            try:
                await exited.wait()
            finally:
                loop.remove_reader(fd)
                os.close(fd)
            return
        # Without pidfds there is no event for the exit of a process that is not ours: the one tolerated poll.
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def stopping_the_next_daemon(sandbox: Sandbox) -> AsyncIterator[None]:
    """On the way out (enter it before the agents, so that they are gone by then), stop the mcpxd that a shim
    started when the test's own daemon went away."""
    try:
        yield
    finally:
        pid = await daemon_pid(sandbox)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            await wait_for_exit(pid)


class PipeAgent:
    """An agent that speaks raw JSON-RPC to the real mcpx-shim over pipes (so the shim hands them to mcpxd)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdin is not None and process.stdout is not None
        self.process = process
        self._stdin = process.stdin
        self._stdout = process.stdout
        self.received: list[dict[str, Any]] = []

    @classmethod
    @contextlib.asynccontextmanager
    async def running(cls, sandbox: Sandbox, *, limit: int = 1 << 24) -> AsyncIterator[PipeAgent]:
        """The shim, started with pipes; `limit` bounds how far ahead of the test its stdout is read. On the way out
        it is killed if it still runs, and its pipes are read to their end."""
        process = await asyncio.create_subprocess_exec(
            SHIM,
            env=sandbox.env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=limit,
        )
        try:
            yield cls(process)
        finally:
            if process.returncode is None:
                process.kill()
            async with asyncio.timeout(WAIT):
                await process.communicate()

    async def send(self, message: dict[str, Any]) -> None:
        self.write(message)
        async with asyncio.timeout(WAIT):
            await self._stdin.drain()

    def write(self, message: dict[str, Any]) -> None:
        """Queue `message` without waiting for the shim's stdin to take it."""
        self._stdin.write(json.dumps(message).encode() + b"\n")

    async def receive(self) -> dict[str, Any]:
        async with asyncio.timeout(WAIT):
            line = await self._stdout.readline()
        assert line.endswith(b"\n"), f"the shim's stdout ended: {line!r}"
        message = json.loads(line)
        assert isinstance(message, dict)
        self.received.append(message)
        return message

    async def receive_until(self, predicate: Any) -> dict[str, Any]:
        while True:
            message = await self.receive()
            if predicate(message):
                return message

    async def response(self, request_id: int | str) -> dict[str, Any]:
        return await self.receive_until(lambda message: message.get("id") == request_id and "method" not in message)

    async def close(self) -> tuple[int, bytes]:
        """Close stdin (the agent is done) and return the shim's exit status and its stderr."""
        self._stdin.close()
        assert self.process.stderr is not None
        async with asyncio.timeout(WAIT):
            rest = await self._stdout.read()
            stderr = await self.process.stderr.read()
            code = await self.process.wait()
        self.received += [json.loads(line) for line in rest.splitlines()]
        return code, stderr


def shim_started_daemons(sandbox: Sandbox) -> list[int]:
    """The pids of the running `mcpxd --socket <the sandbox's socket>`: the daemons shims started."""
    wanted = str(sandbox.socket)
    found = []
    for pid, args in _processes():
        for index, arg in enumerate(args[:-1]):
            if arg == "--socket" and args[index + 1] == wanted and any(a.endswith("mcpxd") for a in args[:index]):
                found.append(pid)
                break
    return found


def stop_stray_daemons(sandbox: Sandbox, timeout: float = WAIT) -> list[int]:
    """SIGTERM every mcpxd a shim started for the sandbox's socket that still runs once its test is over, and wait
    (bounded) until each has exited. A shim starts one when the daemon it was attached to goes away while its agent
    still runs, so a test that stops its daemon before its agents leaves one. Returns their pids."""
    strays = shim_started_daemons(sandbox)
    for pid in strays:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for pid in strays:
        _wait_for_exit_blocking(pid, timeout)
    return strays


def _processes() -> list[tuple[int, list[str]]]:
    """(pid, argv) of this user's processes (Linux: /proc; elsewhere: ps)."""
    found: list[tuple[int, list[str]]] = []
    proc = Path("/proc")
    if proc.is_dir():
        for entry in proc.iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    argv = (entry / "cmdline").read_bytes().split(b"\0")
                    found.append((int(entry.name), [os.fsdecode(arg) for arg in argv if arg]))
        return found
    listing = subprocess.run(["ps", "-x", "-o", "pid=,command="], capture_output=True, text=True, check=False)
    for line in listing.stdout.splitlines():
        pid, _, command = line.strip().partition(" ")
        if pid.isdigit():
            found.append((int(pid), command.split()))
    return found


def _wait_for_exit_blocking(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    if hasattr(os, "pidfd_open"):
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            if not poller.poll(timeout * 1000):
                raise TimeoutError(f"mcpxd {pid} did not exit within {timeout:g} s of SIGTERM")
        finally:
            os.close(fd)
        return
    while time.monotonic() < deadline:  # without pidfds: the one tolerated poll
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    raise TimeoutError(f"mcpxd {pid} did not exit within {timeout:g} s of SIGTERM")


# What a socket unit does at each start of its service: the listening socket (kept by the test, as systemd keeps
# its own) becomes fd 3 of the service's process, with LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES for its pid.
_ACTIVATED = """
import os, sys
os.dup2(int(sys.argv[1]), 3)
os.set_inheritable(3, True)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="mcpx")
os.execv(sys.argv[2], sys.argv[2:])
"""


class SocketUnit:
    """A stand-in for systemd's mcpx.socket: it owns the listening socket at the sandbox's path (connections queue
    there while no mcpxd runs) and starts mcpxd with it, as often as the test asks (a service restart)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        sandbox.socket.parent.mkdir(mode=0o700, exist_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(sandbox.socket))
        os.chmod(sandbox.socket, 0o600)
        self.sock.listen(64)

    async def start_service(self) -> asyncio.subprocess.Process:
        """Start mcpxd on the socket and wait (bounded) until it reports READY."""
        notify = NotifySocket(self.sandbox.root)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _ACTIVATED,
                str(self.sock.fileno()),
                MCPXD,
                env={**self.sandbox.env, "NOTIFY_SOCKET": str(notify.path)},
                stdin=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                pass_fds=(self.sock.fileno(),),
            )
            exited = asyncio.get_running_loop().create_task(process.wait())
            await notify.wait_for(lambda message: message.get("READY") == "1", exited=exited)
            exited.cancel()
            return process
        finally:
            notify.close()

    def close(self) -> None:
        self.sock.close()
