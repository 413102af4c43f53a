"""Shared fixtures: a private sandbox per test (config, socket, state, HOME under a fresh temp dir)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.daemon import Sandbox
from tests.support.lifecycle import stop_stray_daemons


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    box = Sandbox.create()
    try:
        yield box
    finally:
        # A daemon that a shim started when the test's own one stopped under its agent must not outlive the test.
        stop_stray_daemons(box)
        box.remove()


def pytest_configure(config: pytest.Config) -> None:
    """The hot path compiled in place (`make compile`) must be as new as the sources: an extension module is
    imported before the `.py` beside it, so a stale one would test old code."""
    from mypyc_build import compiled_in_place, stale_in_place

    if stale_in_place():
        raise pytest.UsageError(
            f"{len(compiled_in_place())} compiled modules are older than the sources: run `make compile` "
            "(or `make pure` to run the plain sources)"
        )
