"""Run the real `mcpxd` as a subprocess in a private temp directory, and agents through the real `mcpx-shim`.

Readiness is awaited through the daemon's sd_notify READY=1 on a test-owned NOTIFY_SOCKET: no polling, no
sleeps. Every path (config, socket, state, HOME) lives under a fresh short temp dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcp.client import Client
from mcp.client.stdio import StdioServerParameters

BIN = Path(sys.executable).parent
MCPXD = str(BIN / "mcpxd")
MCPXCTL = str(BIN / "mcpxctl")
SHIM = str(BIN / "mcpx-shim")

READY_TIMEOUT = 20.0


@dataclass
class Sandbox:
    """A private home for one test's daemon: config, socket, state and HOME under one short temp dir."""

    root: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def socket(self) -> Path:
        return self.root / "run" / "mcpx.sock"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def log(self) -> Path:
        return self.state / "mcpxd.log"

    @classmethod
    def create(cls) -> Sandbox:
        # Short on purpose: Unix socket paths are limited to ~100 bytes.
        root = Path(tempfile.mkdtemp(prefix="mcpx-", dir="/tmp"))
        (root / "home").mkdir()
        env = {
            "HOME": str(root / "home"),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
            "MCPX_CONFIG": str(root / "config.toml"),
            "MCPX_SOCKET": str(root / "run" / "mcpx.sock"),
            "MCPX_STATE_DIR": str(root / "state"),
            # Never the user's real keyring: OAuth tests use the file store unless they choose otherwise.
            "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring",
        }
        return cls(root, env)

    def write_config(self, text: str) -> None:
        self.config.write_text(text)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def upstream_toml(name: str, url: str, **fields: Any) -> str:
    """One `[[proxy.upstream]]` table; values are written as TOML literals."""
    lines = ["[[proxy.upstream]]", f'name = "{name}"', f'url = "{url}"']
    for key, value in fields.items():
        lines.append(f"{key} = {_toml(value)}")
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f'"{key}" = {_toml(item)}' for key, item in value.items()) + " }"
    raise TypeError(value)


FAST_RECONNECT = "[daemon]\nreconnect_initial = 0.05\nreconnect_max = 0.2\n\n"


class Daemon:
    """The real mcpxd, started as a subprocess."""

    def __init__(self, sandbox: Sandbox, extra_env: dict[str, str] | None = None) -> None:
        self.sandbox = sandbox
        self.extra_env = extra_env or {}
        self.process: asyncio.subprocess.Process | None = None
        self._notify: socket.socket | None = None  # the daemon's NOTIFY_SOCKET, open while it runs
        self._notify_path: Path | None = None

    async def start(self, *args: str) -> None:
        self._close_notify()  # (a daemon started again gets a socket of its own)
        notify_path = self._notify_path = self.sandbox.root / f"notify-{os.urandom(4).hex()}"
        notify = self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        notify.setblocking(False)
        env = {**self.sandbox.env, **self.extra_env, "NOTIFY_SOCKET": str(notify_path)}
        self.process = await asyncio.create_subprocess_exec(
            MCPXD, *args, env=env, stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        loop = asyncio.get_running_loop()
        exited = loop.create_task(self.process.wait())
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                while True:
                    received = loop.create_task(loop.sock_recv(notify, 4096))
                    done, _ = await asyncio.wait({received, exited}, return_when=asyncio.FIRST_COMPLETED)
                    if received in done:
                        if b"READY=1" in received.result():
                            return
                        continue
                    received.cancel()
                    assert self.process.stderr is not None
                    stderr = (await self.process.stderr.read()).decode()
                    raise RuntimeError(f"mcpxd exited with {self.process.returncode}: {stderr}")
        finally:
            exited.cancel()

    async def notified(self, state: bytes, timeout: float = READY_TIMEOUT) -> None:
        """Wait (bounded) until the daemon tells its service manager `state` (e.g. `STOPPING=1`)."""
        assert self._notify is not None
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while state not in await loop.sock_recv(self._notify, 4096):
                pass

    def _close_notify(self) -> None:
        if self._notify is not None and self._notify_path is not None:
            self._notify.close()
            self._notify_path.unlink(missing_ok=True)
            self._notify = self._notify_path = None

    async def stop(self) -> int:
        self._close_notify()
        if self.process is None:
            return 0
        if self.process.returncode is not None:
            return self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            code = await self.process.wait()
        return code

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)


@contextlib.asynccontextmanager
async def running_daemon(
    sandbox: Sandbox, *args: str, extra_env: dict[str, str] | None = None
) -> AsyncIterator[Daemon]:
    daemon = Daemon(sandbox, extra_env)
    await daemon.start(*args)
    try:
        yield daemon
    finally:
        await daemon.stop()


async def run(*command: str, env: dict[str, str], timeout: float = 30) -> tuple[int, str, str]:
    """Run a command to completion; returns (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        *command,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(timeout):
        stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def mcpxctl(sandbox: Sandbox, *args: str) -> tuple[int, str, str]:
    return await run(MCPXCTL, *args, env=sandbox.env)


async def start_mcpxctl(sandbox: Sandbox, *args: str, stdin: bool = False) -> asyncio.subprocess.Process:
    """`mcpxctl ARGS` running, for tests that talk to it while it runs: stdout and stderr piped, stdin piped
    when `stdin` (else closed)."""
    return await asyncio.create_subprocess_exec(
        MCPXCTL,
        *args,
        env=sandbox.env,
        stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


def agent(sandbox: Sandbox, *shim_args: str, shim: str = SHIM, **client_options: Any) -> Client:
    """An MCP SDK client whose server is the real mcpx-shim (stdio), i.e. what an agent sees. It speaks the
    handshake era unless `mode` says otherwise ("auto": it probes server/discover and speaks 2026-07-28 with mcpx;
    "2026-07-28": that protocol from its first request). `shim` is the command the agent runs (pip's console
    script unless a test gives another, such as a launcher `mcpxctl install-shim` wrote)."""
    params = StdioServerParameters(command=shim, args=list(shim_args), env=sandbox.env)
    client_options.setdefault("mode", "legacy")
    return Client(params, **client_options)
