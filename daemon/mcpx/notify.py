"""What the service manager hears from mcpxd (sd_notify): readiness, reloads, the watchdog, a status line.

The messages are sent by the `sdnotify` notifier, which does nothing without `$NOTIFY_SOCKET`, so none of
this matters outside systemd. A reload is bracketed by `RELOADING=1` (with `MONOTONIC_USEC`, as
`Type=notify-reload` requires) and `READY=1`, also when the new configuration is refused. The watchdog is
pinged from an event-loop task, so a stalled loop stops the pings and systemd restarts the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Protocol


class Notifier(Protocol):
    def notify(self, state: str) -> None: ...


@contextlib.asynccontextmanager
async def reloading(notifier: Notifier, summary: Callable[[], str]) -> AsyncIterator[None]:
    """`RELOADING=1` before the body, `READY=1` and the new status line after it, however it ends."""
    notifier.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
    try:
        yield
    finally:
        notifier.notify(f"READY=1\nSTATUS={summary()}")


def watchdog_interval(env: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between `WATCHDOG=1` pings (half of `$WATCHDOG_USEC`), or None when no watchdog is set for us."""
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


async def watchdog(notifier: Notifier, interval: float | None) -> None:
    """Ping the watchdog every `interval` seconds until cancelled (returns at once without one)."""
    if interval is None:
        return
    while True:
        notifier.notify("WATCHDOG=1")
        await asyncio.sleep(interval)
