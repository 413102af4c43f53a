"""Cheap guards for the mistakes that would cost speed, checked without timing anything.

- The daemon never imports the `mcp` SDK (or its pydantic wire models): forwarded traffic is never validated
  and re-serialized through them (measured at ~8× the cost of orjson, and lossy).
- pydantic is used by the configuration only, so no per-message path can construct models.
- The standard library `json` module is not used on the daemon's message path (orjson is; `json` is only the
  fallback inside `mcpx.jsonrpc` and in the stdlib-only CLI).
- No per-message logging above DEBUG in the per-message modules.
- Upstream requests go through mcpx's own HTTP/1.1 client, not aiohttp's (about 250 µs more per call).
- Per-message modules do not format times with `datetime` (an aware `now().isoformat()` is about 17,000
  interpreter instructions; the audit log's `timestamp()` formats the seconds once a second).
- A response body is read without an async generator (the event loop tracks each one in a weak set, in Python)
  and a large one is spliced without copying it out of the buffer it arrived in.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import subprocess
import sys
from pathlib import Path

from mypyc_build import HOT_PATH, compiled_in_place

from mcpx import compiled, jsonrpc
from mcpx.upstream import h1

PACKAGE = Path(__file__).resolve().parent.parent / "daemon" / "mcpx"
PER_MESSAGE_MODULES = [
    "downstream/session.py",
    "downstream/server.py",
    "upstream/http.py",
    "upstream/h1.py",
    "router/router.py",
]


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_daemon_never_imports_the_mcp_sdk() -> None:
    code = "import sys, mcpx.daemon; print(sorted(m for m in sys.modules if m.split('.')[0] in ('mcp', 'mcp_types')))"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"


def test_pydantic_is_imported_by_the_configuration_only() -> None:
    users = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if any(name == "pydantic" or name.startswith("pydantic.") for name in _imports(path))
    )
    assert users == ["config/load.py", "config/model.py"]


def test_per_message_modules_do_not_use_the_stdlib_json_module() -> None:
    for module in PER_MESSAGE_MODULES:
        assert "json" not in _imports(PACKAGE / module), module


def test_per_message_modules_log_messages_at_debug_only() -> None:
    """Per-message events must be DEBUG; INFO and above are for state changes (connect, reload, failures)."""
    allowed_info = {
        "agent connected",
        "upstream session expired, re-initializing",
        "credential changed after a 401, retrying once",
    }
    for module in PER_MESSAGE_MODULES:
        for node in ast.walk(ast.parse((PACKAGE / module).read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "info"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "_log"
            ):
                event = node.args[0]
                assert isinstance(event, ast.Constant), module
                assert event.value in allowed_info, f"{module}: info-level event {event.value!r} on the message path"


def test_the_upstream_hot_path_does_not_use_aiohttp() -> None:
    for module in ("upstream/http.py", "upstream/h1.py", "upstream/supervisor.py", "router/router.py"):
        assert not any(name.split(".")[0] == "aiohttp" for name in _imports(PACKAGE / module)), module


def test_per_message_modules_do_not_format_times_with_datetime() -> None:
    for module in PER_MESSAGE_MODULES:
        assert "datetime" not in _imports(PACKAGE / module), module


def test_response_bodies_are_read_without_async_generators() -> None:
    for method in (h1.Response.chunks, h1.Response.read):
        assert not inspect.isasyncgenfunction(method), method.__qualname__


def test_a_large_result_is_spliced_as_a_view_of_the_response_body() -> None:
    body = bytearray(b'{"jsonrpc":"2.0","id":1,"result":{"text":"' + b"x" * (1 << 20) + b'"}}')
    spliced = jsonrpc.spliced_result(body, 1, secrets_registered=False)
    assert spliced is not None
    view = spliced.view()
    assert isinstance(view, memoryview) and view.obj is body


def test_the_hot_path_modules_imported_are_the_compiled_ones_exactly_when_make_compile_made_them() -> None:
    # After `make compile` (mypyc_build.py) every module of HOT_PATH must load compiled: one left out of the build,
    # or an extension that failed to load and fell back to its source, would otherwise go unnoticed. Without it
    # (`make pure`, a fresh clone) the plain sources run. The compiled half of `make test` says it expects them.
    in_place = bool(compiled_in_place())
    assert in_place or os.environ.get("MCPX_EXPECT_COMPILED") != "1", "make compile put no compiled module in place"
    for module in HOT_PATH:
        name = module.removesuffix(".py").replace("/", ".")
        assert (not (importlib.import_module(name).__file__ or "").endswith(".py")) == in_place, name
    assert compiled() == in_place
