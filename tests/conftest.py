"""Shared fixtures: a private sandbox per test (config, socket, state, HOME under a fresh temp dir)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.daemon import Sandbox


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    box = Sandbox.create()
    try:
        yield box
    finally:
        box.remove()
