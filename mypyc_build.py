"""Compiling the daemon's hot path with mypyc: what the wheel ships, and the compiled half of `make test`.

The modules a tool call passes through (`HOT_PATH`) compile to C extensions from the same typed source; the
daemon's instructions per small call fall by about 40 % (benchmarks/README.md, "Fifth pass"). An extension is
imported before the `.py` beside it, so the sources stay where they are and the plain-Python package is the
fallback wherever nothing was compiled. The wheel's build hook (hatch_build.py) calls `compile_to`.

Usage: python mypyc_build.py --build     (compile into build/mypyc: the first half of `make compile`)
       python mypyc_build.py --install   (the last build next to the sources: the second half)
       python mypyc_build.py --clean     (remove them again, the build kept: `make pure`)
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SOURCES = ROOT / "daemon"
BUILD = ROOT / "build" / "mypyc"  # kept between runs: `make pure` and `make compile` only move its output

# Every module on the path of a tool call, both eras, both answer kinds (JSON and SSE), but:
# - `upstream/httpbase.py`: mypyc cannot compile its async generators; the fast path calls only its two small answer
#   readers, `response_result` and `stream_message`, which hand the body to the compiled `jsonrpc`;
# - `errors.py`: exceptions are made on the error path only, and a compiled exception class loses the class
#   attribute `code` its subclasses set;
# - the upstream lifecycle (`peer.py`, `supervisor.py`): compiled, a daemon stopping with per-agent stdio sessions
#   hung in asyncio's final cancellation; a call spends about 3 µs there.
HOT_PATH = (
    "mcpx/audit.py",
    "mcpx/busypoll.py",
    "mcpx/jsonrpc.py",
    "mcpx/redact.py",
    "mcpx/framing/ndjson.py",
    "mcpx/framing/sse.py",
    "mcpx/downstream/modern.py",
    "mcpx/downstream/server.py",
    "mcpx/downstream/session.py",
    "mcpx/router/catalog.py",
    "mcpx/router/router.py",
    "mcpx/upstream/auto.py",
    "mcpx/upstream/h1.py",
    "mcpx/upstream/http.py",
)
# mypyc compiles the modules as one group: one shared library holds their code, each module a small shim to it.
GROUP = "mcpx_hot"
EXT_SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")  # what a compiled module's file name ends with


def compile_to(build_dir: Path) -> list[Path]:
    """Compile `HOT_PATH` under `build_dir`; the extensions made, as paths relative to it."""
    from mypyc.build import mypycify
    from setuptools import Distribution
    from setuptools.command.build_ext import build_ext

    cwd = Path.cwd()
    os.chdir(ROOT)  # (the project's mypy configuration, strict, is read from here)
    try:
        extensions = mypycify(
            [f"daemon/{module}" for module in HOT_PATH],
            opt_level="3",
            debug_level="0",
            group_name=GROUP,
            target_dir=str(build_dir / "c"),
        )
        command = build_ext(Distribution({"name": "mcpx", "ext_modules": extensions}))
        command.build_lib = str(build_dir / "lib")
        command.build_temp = str(build_dir / "temp")
        command.parallel = os.cpu_count() or 1
        command.ensure_finalized()
        command.run()
    finally:
        os.chdir(cwd)
    return [path.relative_to(build_dir / "lib") for path in extensions_in(build_dir / "lib")]


def extensions_in(directory: Path) -> list[Path]:
    """The compiled modules under `directory`."""
    return sorted(directory.rglob(f"*{EXT_SUFFIX}"))


def compiled_in_place() -> list[Path]:
    """The extensions `--install` put next to the sources."""
    return extensions_in(SOURCES)


def stale_in_place() -> bool:
    """Whether a compiled module's source changed after it was compiled (`make compile` also compiles again when
    another module changes, since mypyc may have taken its constants)."""
    compiled = compiled_in_place()
    if not compiled:
        return False
    made = min(path.stat().st_mtime for path in compiled)
    return any((SOURCES / module).stat().st_mtime > made for module in HOT_PATH)


def clean() -> None:
    """Back to the plain sources: the extensions next to them removed (the build in `BUILD` is kept)."""
    for path in compiled_in_place():
        path.unlink()


def build() -> None:
    """Compile `HOT_PATH` anew into `BUILD`."""
    shutil.rmtree(BUILD, ignore_errors=True)
    compile_to(BUILD)


def install() -> None:
    """Put the extensions of the last `build()` next to the sources, where the daemon imports them first."""
    clean()
    for path in extensions_in(BUILD / "lib"):
        shutil.copy2(path, SOURCES / path.relative_to(BUILD / "lib"))


if __name__ == "__main__":
    commands = {"--build": build, "--install": install, "--clean": clean}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        sys.exit(__doc__)
    commands[sys.argv[1]]()
