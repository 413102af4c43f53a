"""Stand-ins for the service manager's side: a fake systemd notification socket, which records every sd_notify
datagram mcpxd sends and lets a test wait (bounded, no polling) for the one it expects; and fake `systemctl` /
`launchctl` commands that record how `mcpxctl install`, `uninstall` and `doctor` call them."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

WAIT = 20.0

# Appends its command line to $MCPX_TEST_RECORD; says a unit is enabled when asked (`systemctl --user is-enabled`).
_RECORDER = """#!/bin/sh
printf "%s\\n" "$(basename "$0") $*" >> "$MCPX_TEST_RECORD"
if [ "$2" = "is-enabled" ]; then echo enabled; fi
"""


def fake_service_managers(directory: Path, path: str) -> dict[str, str]:
    """Recording `systemctl` and `launchctl` in `directory/fakebin`, their command lines going to `directory/record`
    (one per line). Returns the variables that put them to use: `PATH` (them first, then `path`) and
    `MCPX_TEST_RECORD`."""
    fake_bin = directory / "fakebin"
    fake_bin.mkdir()
    for name in ("systemctl", "launchctl"):
        (fake_bin / name).write_text(_RECORDER)
        (fake_bin / name).chmod(0o755)
    return {"PATH": f"{fake_bin}{os.pathsep}{path}", "MCPX_TEST_RECORD": str(directory / "record")}


class NotifySocket:
    """A datagram socket bound in a test's temp dir; `path` goes into the daemon's `NOTIFY_SOCKET`."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / f"notify-{os.urandom(4).hex()}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self.path))
        self._sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    async def wait_for(
        self, predicate: Callable[[dict[str, str]], bool], *, exited: asyncio.Task[int] | None = None
    ) -> dict[str, str]:
        """The first message not seen before that satisfies `predicate`. Every message received meanwhile is kept
        in `messages`. Fails if `exited` (the daemon's wait task) completes first."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(WAIT):
            while True:
                received = loop.create_task(loop.sock_recv(self._sock, 4096))
                waiting: set[asyncio.Future[Any]] = {received}
                if exited is not None:
                    waiting.add(exited)
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if received not in done:
                    received.cancel()
                    raise AssertionError(f"the daemon exited ({exited.result() if exited else '?'}) first")
                message = dict(line.split("=", 1) for line in received.result().decode().splitlines() if "=" in line)
                self.messages.append(message)
                if predicate(message):
                    return message

    def close(self) -> None:
        self._sock.close()
        self.path.unlink(missing_ok=True)
