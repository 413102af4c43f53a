"""Compiling the daemon's hot path with mypyc, in place: an experiment, not yet what mcpx ships.

The modules a tool call passes through (`HOT_PATH`) compile to C extensions from the same typed source; the
daemon's instructions per small call fall by about 40 % (benchmarks/README.md, "Fifth pass"). The test suite does
not pass against the compiled build yet (mypyc checks declared types at run time, and some are not true), so
`make test`, the install and the benchmark run the plain sources unless `make compile` was run.

Usage: python mypyc_build.py --inplace   (compile next to the sources: `make compile`)
       python mypyc_build.py --clean     (remove what --inplace made: `make pure`)
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SOURCES = ROOT / "daemon"

# Every module on the path of a tool call, both eras, both answer kinds (JSON and SSE). `upstream/httpbase.py`
# is not here: mypyc cannot compile async generators, and it is off the fast path.
HOT_PATH = (
    "mcpx/audit.py",
    "mcpx/busypoll.py",
    "mcpx/errors.py",
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
    "mcpx/upstream/peer.py",
    "mcpx/upstream/supervisor.py",
)
# mypyc compiles the modules as one group: one shared library holds their code, each module a small shim to it.
GROUP = "mcpx_hot"


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
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    return sorted(path.relative_to(build_dir / "lib") for path in (build_dir / "lib").rglob(f"*{suffix}"))


def compiled_in_place() -> list[Path]:
    """The extensions `--inplace` put next to the sources."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    return sorted(SOURCES.rglob(f"*{suffix}"))


def stale_in_place() -> bool:
    """Whether a compiled module's source changed after `--inplace` compiled it (`make compile` also compiles again
    when another module changes, since mypyc may have taken its constants)."""
    compiled = compiled_in_place()
    if not compiled:
        return False
    made = min(path.stat().st_mtime for path in compiled)
    return any((SOURCES / module).stat().st_mtime > made for module in HOT_PATH)


def clean() -> None:
    for path in compiled_in_place():
        path.unlink()


def compile_in_place() -> None:
    clean()
    with tempfile.TemporaryDirectory(prefix="mcpx-mypyc-") as build_dir:
        for relative in compile_to(Path(build_dir)):
            shutil.copy2(Path(build_dir) / "lib" / relative, SOURCES / relative)


if __name__ == "__main__":
    if sys.argv[1:] == ["--inplace"]:
        compile_in_place()
    elif sys.argv[1:] == ["--clean"]:
        clean()
    else:
        sys.exit(__doc__)
