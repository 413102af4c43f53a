"""Busy-polling: the event loop keeps polling its sockets for a moment after the daemon sends a message, while that
pays off.

Why: a call crosses the daemon twice (agent → daemon → upstream, upstream → daemon → agent), and each time the
daemon sleeps in `epoll_wait` the next message has to wake it. On the project's 2-vCPU VMs a wake-up across
processes costs 30–70 µs, more than everything else mcpx does for a small call. While the loop spins (polls with
a zero timeout: the pending callback of `_spin` keeps it from blocking), the answer an upstream on the same host
sends back, or an agent's next request, is taken up by a process that never slept.

When: only while it pays. After each message sent the loop spins for at most `window` seconds (each message
sent extends it). A spin during which no message came in was wasted; after `MAX_MISSES` of those in a row,
spinning stops and is tried once more every `RETRY_AFTER` seconds. An agent that thinks for seconds between calls,
or an upstream across the internet, costs a few wasted spins, then none; a tight loop of calls to a fast upstream
keeps the daemon polling, which is what it is for. `[daemon] busy_poll_us = 0` turns it off.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

MAX_MISSES: Final = 8
RETRY_AFTER: Final = 1.0  # seconds


class BusyPoll:
    """One per daemon (one event loop). `sent()` after writing a message, `received()` when one comes in."""

    __slots__ = ("_clock", "_got_message", "_loop", "_misses", "_retry_at", "_spinning", "_until", "window")

    def __init__(self, window_us: int, *, clock: Callable[[], float] | None = None) -> None:
        self.window = window_us / 1_000_000
        self._clock = clock  # the loop's clock unless given (tests)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._until = 0.0
        self._spinning = False
        self._got_message = False
        self._misses = 0
        self._retry_at = 0.0

    @property
    def spinning(self) -> bool:
        return self._spinning

    def sent(self) -> None:
        """A message went out: an answer or a next request may follow soon; poll for it (within the policy)."""
        if not self.window:
            return
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
            if self._clock is None:
                self._clock = loop.time
        assert self._clock is not None
        now = self._clock()
        if self._misses >= MAX_MISSES:
            if now < self._retry_at:
                return
            self._misses = MAX_MISSES - 1  # one more try: a hit starts afresh, a miss stops it again
        self._until = now + self.window
        if not self._spinning:
            self._spinning = True
            self._got_message = False
            loop.call_soon(self._spin)

    def received(self) -> None:
        """A message came in (the spin, if any, paid off)."""
        self._got_message = True

    def _spin(self) -> None:
        assert self._loop is not None and self._clock is not None
        now = self._clock()
        if now < self._until:
            self._loop.call_soon(self._spin)
            return
        self._spinning = False
        if self._got_message:
            self._misses = 0
        else:
            self._misses += 1
            if self._misses >= MAX_MISSES:
                self._retry_at = now + RETRY_AFTER
