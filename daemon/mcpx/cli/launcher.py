"""`mcpxctl install-shim`: writes a launcher that starts mcpx-shim with Python's `-I -S` (standard library only).

An agent starts the shim for every session, so the interpreter's start is what it waits for. pip's console
script runs Python with `site` (every .pth file of the venv) before importing `mcpx_shim`; the shim needs none
of that, since it imports only the standard library, and its own directory appended to `sys.path` (after the
standard library) is all it has to find. pip rewrites a script's `#!` line and drops flags, so the wheel cannot
ship such a launcher: this module writes one for the Python that runs mcpxctl.

A launcher is `#!<python> -IS` and four lines of Python. Where that `#!` line cannot work (longer than the 127
bytes older Linux kernels read, or a Python path with whitespace, which `#!` cannot quote), it is a `#!/bin/sh`
script that execs the same Python with the same four lines. Every launcher carries `MARKER`, and a file without
it is not overwritten unless forced.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mcpx import __version__
from mcpx.cli.files import atomic_write, has_marker

MARKER = "Written by `mcpxctl install-shim`"
LAUNCHER_NAME = "mcpx-shim"
CONSOLE_SCRIPT = "mcpx-shim"  # pip's, beside the Python of the installation
# BINPRM_BUF_SIZE is 128 bytes on Linux before 5.1 (a `#!` line is cut at 127); macOS allows 512.
MAX_SHEBANG_BYTES = 127
MODE = 0o755


class Refused(Exception):
    """The launcher cannot or must not be written there (a file mcpxctl did not write, pip's own script)."""


@dataclass(frozen=True)
class Launcher:
    path: Path
    text: str
    interpreter: str

    @property
    def through_sh(self) -> bool:
        """The `#!/bin/sh` form (see `needs_sh`)."""
        return self.text.startswith("#!/bin/sh\n")


def default_path(env: Mapping[str, str] = os.environ) -> Path:
    """`$XDG_BIN_HOME/mcpx-shim`, else `~/.local/bin/mcpx-shim`."""
    bin_home = env.get("XDG_BIN_HOME")
    directory = Path(bin_home).expanduser() if bin_home else Path.home() / ".local" / "bin"
    return directory / LAUNCHER_NAME


def shim_directory() -> str:
    """The directory `mcpx_shim` is imported from, found without running it."""
    spec = importlib.util.find_spec("mcpx_shim")
    if spec is None or spec.origin is None:
        raise Refused("the mcpx_shim module is not importable by this Python: is mcpx installed in it?")
    return os.path.dirname(os.path.abspath(spec.origin))


def _header(comment_lines: list[str]) -> str:
    lines = [
        f"{MARKER} (mcpx {__version__}): mcpx-shim without site-packages, for a faster start.",
        "Run `mcpxctl install-shim` again after moving the installation or upgrading its Python.",
        *comment_lines,
    ]
    return "".join(f"# {line}\n" for line in lines)


def _python_lines(shim_dir: str) -> str:
    literal = repr(shim_dir)
    if literal.startswith("'") and '"' not in shim_dir:  # then it holds no quote: sh's '…' needs no escapes
        literal = f'"{literal[1:-1]}"'
    return f"import sys\nsys.path.append({literal})\nfrom mcpx_shim import main\nsys.exit(main())\n"


def needs_sh(interpreter: str) -> bool:
    """Whether `#!<interpreter> -IS` would not work: too long for older Linux kernels, or not one word."""
    too_long = len(f"#!{interpreter} -IS".encode(errors="surrogateescape")) > MAX_SHEBANG_BYTES
    return too_long or any(char.isspace() for char in interpreter)


def launcher_text(interpreter: str, shim_dir: str) -> str:
    """The launcher that runs `mcpx_shim.main` from `shim_dir` with `interpreter -I -S`, the agent's arguments
    being the shim's `sys.argv[1:]` (with `-c`, Python puts what follows the code there)."""
    code = _python_lines(shim_dir)
    if not needs_sh(interpreter):
        return f"#!{interpreter} -IS\n{_header([])}{code}"
    why = "has whitespace" if any(char.isspace() for char in interpreter) else "is too long"
    header = _header([f"A #! line cannot carry the Python path (it {why}): sh starts it."])
    return f'#!/bin/sh\n{header}exec {shlex.quote(interpreter)} -I -S -c {shlex.quote(code)} "$@"\n'


def is_own_launcher(path: Path) -> bool:
    """A regular file (not a link) with mcpxctl's marker in its first lines."""
    return not path.is_symlink() and path.is_file() and has_marker(path, MARKER)


def _same_place(one: Path, other: Path) -> bool:
    """The same directory entry (the directories' links resolved, not the entries themselves)."""
    return one.name == other.name and one.parent.resolve() == other.parent.resolve()


def _check_destination(path: Path, console_script: Path, *, force: bool) -> None:
    if _same_place(path, console_script):
        raise Refused(f"{path} is pip's console script of this installation: choose another path with --to")
    if path.is_dir() and not path.is_symlink():
        raise Refused(f"{path} is a directory: give the launcher's file name with --to")
    if force or not (path.exists() or path.is_symlink()) or is_own_launcher(path):
        return
    if path.is_symlink():
        target = os.readlink(path)
        points_at_ours = path.exists() and path.resolve() == console_script.resolve()
        what = "pip's console script of this installation" if points_at_ours else "a file mcpxctl did not write"
        raise Refused(
            f"{path} is a link to {target} ({what}): --force replaces the link (not what it points to), "
            "or choose another path with --to"
        )
    raise Refused(f"not overwriting {path}, a file mcpxctl did not write: move it aside, use --force, or --to")


def plan(to: Path | None, *, force: bool, interpreter: str | None = None, shim_dir: str | None = None) -> Launcher:
    """The launcher to write and where (`to`, else `default_path()`), for `interpreter` (default: the Python running
    mcpxctl, whose bin directory also holds the mcpxd the shim starts) and the shim's directory (default: where
    this Python imports it from). Raises `Refused` when it must not be written there."""
    interpreter = interpreter or sys.executable
    if not interpreter:
        raise Refused("cannot tell which Python runs mcpxctl (sys.executable is empty)")
    path = Path(os.path.abspath((to or default_path()).expanduser()))
    text = launcher_text(interpreter, shim_dir or shim_directory())
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise Refused("the Python or the shim's path is not valid UTF-8: a launcher cannot name it") from None
    _check_destination(path, Path(sys.executable).parent / CONSOLE_SCRIPT, force=force)
    return Launcher(path=path, text=text, interpreter=interpreter)


def write(launcher: Launcher) -> None:
    """Replace the launcher's file in one step (mode 0755), creating its directory if needed."""
    try:
        launcher.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(launcher.path, launcher.text, MODE)
    except OSError as exc:
        raise Refused(f"cannot write {launcher.path}: {exc.strerror or exc}") from None


def _on_path(directory: Path, env: Mapping[str, str]) -> bool:
    wanted = directory.resolve()
    return any(entry and Path(entry).resolve() == wanted for entry in env.get("PATH", "").split(os.pathsep))


def describe_dry_run(launcher: Launcher) -> str:
    indented = "    " + launcher.text.rstrip("\n").replace("\n", "\n    ")
    return f"would write {launcher.path} (mode {MODE:04o}):\n\n{indented}\n"


def describe_written(launcher: Launcher, env: Mapping[str, str] = os.environ) -> str:
    how = (
        f"/bin/sh execs {launcher.interpreter} -I -S"
        if launcher.through_sh
        else f"{launcher.interpreter} -IS, no site-packages"
    )
    lines = [
        f"wrote {launcher.path} (mcpx-shim started by {how})",
        "the line for your agents' MCP configs:",
        "",
        f'  "command": {json.dumps(str(launcher.path), ensure_ascii=False)}',
        "",
    ]
    if not _on_path(launcher.path.parent, env):
        lines.append(f"note: {launcher.path.parent} is not on PATH: configure agents with the full path above")
    lines.append("run `mcpxctl install-shim` again after moving this installation or upgrading its Python")
    return "\n".join(lines)
