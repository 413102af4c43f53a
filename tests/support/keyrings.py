"""Keyring backends for tests in this process (never the user's keyring): installed with `keyring.set_keyring`
by `installed`, which restores the previous backend and waits (bounded) for every keyring call the token store
abandoned, so that no hung call outlives its test."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

import keyring
import keyring.errors
from keyring.backend import KeyringBackend

# How long a hung call waits for its release: a bound, so that a failing test leaves no thread behind for long.
HANG_BOUND = 30.0

_Backend = TypeVar("_Backend", bound=KeyringBackend)


class ControlledKeyring(KeyringBackend):
    """A keyring in memory that can be made to fail (`failing`) or hang (`hanging`): a hung call blocks until
    `release` is set and then does what it was asked (so an abandoned write can land late, as a real one can)."""

    priority = 1

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.entries: dict[tuple[str, str], str] = {}
        self.hanging = False
        self.failing = False
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls: list[str] = []

    def hang(self) -> None:
        self.hanging, self.failing = True, False
        self.entered.clear()
        self.release.clear()

    def answer(self) -> None:
        """Answer again from now on, and let the hung calls go on."""
        self.hanging = self.failing = False
        self.release.set()

    def _gate(self, operation: str) -> None:
        """Fail, or hang until released, as the keyring is set to."""
        self.calls.append(operation)
        if self.failing:
            raise RuntimeError("dbus said no, with canary-backend-detail")
        if self.hanging:
            self.entered.set()
            self.release.wait(HANG_BOUND)

    def get_password(self, service: str, username: str) -> str | None:
        self._gate("get")
        return self.entries.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self._gate("set")
        self.entries[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        self._gate("delete")
        if self.entries.pop((service, username), None) is None:
            raise keyring.errors.PasswordDeleteError(username)


def abandoned_calls_returned(timeout: float = HANG_BOUND + 5) -> bool:
    """Wait (bounded) for the keyring calls the store abandoned (their threads); True when none is left."""
    calls = [thread for thread in threading.enumerate() if thread.name == "mcpx-keyring"]
    for thread in calls:
        thread.join(timeout)
    return not any(thread.is_alive() for thread in calls)


async def hung_call_lands(backend: ControlledKeyring) -> None:
    """The keyring answers again: the calls that hung go on and return (waited for, bounded)."""
    backend.answer()
    assert await asyncio.to_thread(abandoned_calls_returned)


@contextmanager
def installed(backend: _Backend) -> Iterator[_Backend]:
    previous = keyring.get_keyring()
    keyring.set_keyring(backend)
    try:
        yield backend
    finally:
        if isinstance(backend, ControlledKeyring):
            backend.answer()
        keyring.set_keyring(previous)
        assert abandoned_calls_returned()
