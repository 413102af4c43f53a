"""The wheel's build hook: the daemon's hot path compiled with mypyc (`mypyc_build.py`) into a platform wheel.

A wheel built where a C compiler and the Python headers are at hand carries the compiled modules next to their
sources (the `.py` files stay: an extension module is imported before the source beside it). Where compiling
fails, the wheel is the plain-Python one and says so on stderr; `MCPX_COMPILE=never` skips compiling, and
`MCPX_COMPILE=always` makes a failure fail the build. Editable installs (`make venv`) are never compiled here:
`make compile` does that in place.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

# The mypyc that compiles the hot path; its output is tested with this version (requirements/constraints.txt).
MYPYC = "mypy==2.4.1"


class CompileHotPath(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def _compiling(self) -> bool:
        return self.target_name == "wheel" and os.environ.get("MCPX_COMPILE") != "never"

    def dependencies(self) -> list[str]:
        # mypy reads the whole package with its imports, so the runtime dependencies are needed to build. (Hatchling
        # does not say here whether the wheel is an editable one: `make venv` sets MCPX_COMPILE=never.)
        return [MYPYC, "setuptools", *self.metadata.core.dependencies] if self._compiling() else []

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if not self._compiling() or version == "editable":
            return
        sys.path.insert(0, self.root)
        from mypyc_build import compile_to

        self._build_dir = tempfile.TemporaryDirectory(prefix="mcpx-wheel-mypyc-")
        build_dir = Path(self._build_dir.name)
        try:
            extensions = compile_to(build_dir)
        except Exception as exc:  # any failure to compile means: ship the plain sources
            if os.environ.get("MCPX_COMPILE") == "always":
                raise
            print(f"mcpx: the hot path was not compiled ({exc}); building the plain-Python wheel", file=sys.stderr)
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        for relative in extensions:
            build_data["force_include"][str(build_dir / "lib" / relative)] = str(relative)

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        build_dir = getattr(self, "_build_dir", None)
        if build_dir is not None:
            build_dir.cleanup()
