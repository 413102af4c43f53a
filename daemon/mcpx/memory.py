"""What the daemon asks of the C allocator while large messages flow (glibc only; elsewhere nothing).

A multi-MiB message passes through a few buffers of its size (the upstream's body, simdjson's copy and string
buffer while it is validated, the agent's response). glibc gives such blocks back to the kernel as soon as they
are freed, so each message pays for every page again: about 5 µs per 4 KiB page fault on the project's VMs, some
30 ms for an 8 MiB result, more than all of mcpx's other work on it. After the first large message, freed memory
is kept for reuse (blocks up to 32 MiB from the heap, up to 64 MiB of free heap kept); ten seconds after the
last one, the default thresholds are back and `malloc_trim` returns what was kept, so an idle daemon's footprint
is what it was.
"""

from __future__ import annotations

import asyncio
import ctypes
import sys
from typing import Final

LARGE: Final = 1 << 20  # a message at least this long is large
KEEP_FOR: Final = 10.0  # seconds after the last large message

_M_TRIM_THRESHOLD: Final = -1  # mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD: Final = -3
_MMAP_THRESHOLD: Final = 32 << 20  # glibc's maximum on 64-bit
_TRIM_THRESHOLD: Final = 64 << 20
_DEFAULT_THRESHOLD: Final = 128 << 10  # glibc's default for both


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols, libc's among them (no library search)
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): leave the allocator as it is
        return None
    return libc


class _Policy:
    __slots__ = ("_keeping", "_libc", "_looked", "_trim")

    def __init__(self) -> None:
        self._libc: ctypes.CDLL | None = None
        self._looked = False
        self._keeping = False
        self._trim: asyncio.TimerHandle | None = None

    def large_message(self, loop: asyncio.AbstractEventLoop) -> None:
        """A large message is passing through: keep freed memory until `KEEP_FOR` seconds after the last one."""
        if not self._looked:
            self._looked = True
            self._libc = _glibc()
        if self._libc is None:
            return
        if not self._keeping:
            self._keeping = True
            self._libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
            self._libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
        if self._trim is not None:
            self._trim.cancel()
        self._trim = loop.call_later(KEEP_FOR, self._give_back)

    def _give_back(self) -> None:
        self._trim = None
        self._keeping = False
        if self._libc is not None:
            self._libc.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_THRESHOLD)
            self._libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_THRESHOLD)
            self._libc.malloc_trim(0)


_policy = _Policy()
large_message = _policy.large_message
