"""Shared fixtures: a private sandbox per test (config, socket, state, HOME under a fresh temp dir)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

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
        keep_logs = os.environ.get("MCPX_TEST_KEEP_LOGS")  # a directory: each test's daemon log is copied there
        if keep_logs and box.log.exists():
            test = os.environ.get("PYTEST_CURRENT_TEST", "unknown").split(" ")[0]
            Path(keep_logs).mkdir(parents=True, exist_ok=True)
            shutil.copy(box.log, Path(keep_logs) / test.replace("/", "_"))
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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `plain_python_only` patch a function or class of the hot path to watch or break it from
    inside; a compiled module cannot be patched (its classes are fixed and it calls its functions directly). They
    run in the plain-Python half of `make test` and are skipped in the compiled half."""
    from mcpx import compiled

    if not compiled():
        return
    skip = pytest.mark.skip(reason="patches the hot path from inside: runs in the plain-Python half of make test")
    for item in items:
        if item.get_closest_marker("plain_python_only"):
            item.add_marker(skip)
