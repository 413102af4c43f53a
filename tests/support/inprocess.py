"""For tests that drive the daemon's agent session in-process, with the real router: the control operations
they never reach."""

from __future__ import annotations

from typing import Any


class NoControl:
    """The daemon's control operations, which these tests never reach."""

    def status(self) -> dict[str, Any]:
        raise AssertionError("not in this test")

    async def reload(self) -> dict[str, Any]:
        raise AssertionError("not in this test")

    async def logout(self, upstream: str) -> dict[str, Any]:
        raise AssertionError("not in this test")

    async def login(self, upstream: str, action: str, response: str | None, timeout: object = None) -> dict[str, Any]:
        raise AssertionError("not in this test")
