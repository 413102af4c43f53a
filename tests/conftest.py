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
