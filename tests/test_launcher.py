"""`mcpxctl install-shim`: the launcher it writes starts the real shim with Python's -I -S (shown at run time),
agents reach real upstreams through it (in its `#!` form and its `/bin/sh` form), and it overwrites only its own
launchers, never pip's console script."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mcpx.cli import launcher
from tests.support.daemon import BIN, SHIM, Sandbox, agent, mcpxctl, run, running_daemon, upstream_toml
from tests.support.lifecycle import shim_started_daemons, stopping_the_next_daemon
from tests.support.results import text_of
from tests.support.upstream import TOOLS, Upstream, running

SHIM_DIR = Path(__file__).resolve().parent.parent / "shim"

# Stands in for mcpx_shim: reports how its Python was started and the arguments it got.
PROBE_SHIM = """\
import json, sys

def main():
    print(json.dumps({
        "isolated": sys.flags.isolated,
        "no_site": sys.flags.no_site,
        "site_imported": "site" in sys.modules,
        "argv": sys.argv[1:],
        "path": sys.path,
    }))
    return 0
"""
# Arguments an agent might pass, and what sh would mangle if the launcher quoted them wrongly.
AWKWARD_ARGS = ["--config", "a b", "it's", '"quoted"', "$HOME", "", "*", "back\\slash"]


async def _install(sandbox: Sandbox, *args: str) -> tuple[int, str, str]:
    return await mcpxctl(sandbox, "install-shim", *args)


async def _list_and_call(sandbox: Sandbox, command: str) -> None:
    async with agent(sandbox, shim=command) as client:
        names = sorted(tool.name for tool in (await client.list_tools()).tools)
        assert names == sorted(f"alpha__{tool}" for tool in TOOLS)
        result = await client.call_tool("alpha__echo", {"text": "via launcher"})
        assert text_of(result) == "alpha:via launcher"


def _long_python(root: Path) -> str:
    """A path to this Python long enough that `#!<it> -IS` does not fit the 127 bytes older kernels read. A link
    outside the venv: Python no longer finds the venv from it, and the launcher must not need it."""
    directory = root / ("d" * 60) / ("e" * 60)
    directory.mkdir(parents=True)
    (directory / "python3").symlink_to(sys.executable)
    interpreter = str(directory / "python3")
    assert len(f"#!{interpreter} -IS".encode()) > launcher.MAX_SHEBANG_BYTES
    return interpreter


def _spaced_python(root: Path) -> str:
    """A short path to this Python with a space in it, which a `#!` line cannot carry."""
    directory = root / "py thon"
    directory.mkdir()
    (directory / "python3").symlink_to(sys.executable)
    return str(directory / "python3")


PYTHONS = {"long path": _long_python, "path with a space": _spaced_python}


async def test_install_shim_writes_an_executable_launcher_that_agents_reach_upstreams_through(
    sandbox: Sandbox,
) -> None:
    alpha = Upstream("alpha", json_response=True)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    path = sandbox.root / "bin" / "mcpx-shim"  # bin/ does not exist yet

    code, stdout, stderr = await _install(sandbox, "--to", str(path))

    assert code == 0, stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert os.access(path, os.X_OK)
    lines = path.read_text().splitlines()
    assert lines[0] == f"#!{sys.executable} -IS"
    assert launcher.MARKER in lines[1]
    assert f'sys.path.append("{SHIM_DIR}")' in lines
    assert f"wrote {path}" in stdout
    assert f'"command": "{path}"' in stdout
    assert f"{path.parent} is not on PATH" in stdout
    async with running(alpha), running_daemon(sandbox):
        await _list_and_call(sandbox, str(path))


async def test_the_launcher_ignores_the_environment_that_breaks_the_console_script(sandbox: Sandbox) -> None:
    """-I at run time: a PYTHONPATH holding another `mcpx_shim` takes over pip's console script (Python without -I
    reads PYTHONPATH) but not the launcher, which still runs the real shim."""
    shadow = sandbox.root / "shadow"
    shadow.mkdir()
    (shadow / "mcpx_shim.py").write_text("def main():\n    print('shadowed')\n    return 3\n")
    path = sandbox.root / "bin" / "mcpx-shim"
    code, _, stderr = await _install(sandbox, "--to", str(path))
    assert code == 0, stderr
    env = {**sandbox.env, "PYTHONPATH": str(shadow)}

    code, stdout, _ = await run(SHIM, "--bogus", env=env)
    assert (code, stdout.strip()) == (3, "shadowed")  # the environment does break a Python without -I

    code, stdout, stderr = await run(str(path), "--bogus", env=env)
    assert code == 1
    assert stdout == ""
    assert stderr.startswith("mcpx-shim: usage: mcpx-shim")


@pytest.mark.parametrize("python", ["venv python", *PYTHONS])
async def test_the_launcher_runs_python_isolated_without_site_and_passes_the_arguments_unchanged(
    sandbox: Sandbox, python: str
) -> None:
    """Both forms, run: a probe in place of the shim reports its Python's flags, its `sys.path` (the standard
    library first, the shim's directory last) and its arguments. The probe's directory has quotes, a space and a
    `$` in its name, which both the Python literal and sh's quoting must keep."""
    probe_dir = sandbox.root / "probe 'it' \"is\" $HOME"
    probe_dir.mkdir()
    (probe_dir / "mcpx_shim.py").write_text(PROBE_SHIM)
    interpreter = sys.executable if python == "venv python" else PYTHONS[python](sandbox.root)
    planned = launcher.plan(
        sandbox.root / "bin" / "mcpx-shim", force=False, interpreter=interpreter, shim_dir=str(probe_dir)
    )
    launcher.write(planned)
    first_line = planned.path.read_text().splitlines()[0]
    if python == "venv python":
        assert not planned.through_sh
        assert first_line == f"#!{sys.executable} -IS"
    else:
        assert planned.through_sh
        assert first_line == "#!/bin/sh"

    code, stdout, stderr = await run(str(planned.path), *AWKWARD_ARGS, env=sandbox.env)

    assert code == 0, stderr
    seen: dict[str, Any] = json.loads(stdout)
    assert seen["isolated"] == 1
    assert seen["no_site"] == 1
    assert seen["site_imported"] is False
    assert seen["argv"] == AWKWARD_ARGS
    assert seen["path"][-1] == str(probe_dir)
    assert all(entry.startswith(sys.base_prefix) for entry in seen["path"][:-1]), seen["path"]


@pytest.mark.parametrize("python", PYTHONS)
async def test_a_python_path_a_shebang_cannot_carry_gets_a_sh_launcher_that_agents_use(
    sandbox: Sandbox, python: str
) -> None:
    alpha = Upstream("alpha", json_response=True)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    planned = launcher.plan(sandbox.root / "bin" / "mcpx-shim", force=False, interpreter=PYTHONS[python](sandbox.root))
    assert planned.through_sh
    launcher.write(planned)
    text = planned.path.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert launcher.MARKER in text
    async with running(alpha), running_daemon(sandbox):
        await _list_and_call(sandbox, str(planned.path))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_the_launcher_starts_the_mcpxd_beside_its_python_when_none_runs(sandbox: Sandbox) -> None:
    """sys.executable is still the venv's Python, so the shim finds mcpxd beside it (here PATH has no mcpxd)."""
    alpha = Upstream("alpha", json_response=True)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    path = sandbox.root / "bin" / "mcpx-shim"
    code, _, stderr = await _install(sandbox, "--to", str(path))
    assert code == 0, stderr
    sandbox.env["PATH"] = "/usr/bin:/bin"
    assert not sandbox.socket.exists()
    async with running(alpha), stopping_the_next_daemon(sandbox):
        await _list_and_call(sandbox, str(path))
        [started] = shim_started_daemons(sandbox)
        assert str(BIN / "mcpxd") in Path(f"/proc/{started}/cmdline").read_bytes().decode().split("\0")


async def test_install_shim_again_replaces_its_own_launcher(sandbox: Sandbox) -> None:
    path = sandbox.root / "bin" / "mcpx-shim"
    code, _, stderr = await _install(sandbox, "--to", str(path))
    assert code == 0, stderr
    fresh = path.read_text()
    path.write_text(fresh.replace(sys.executable, "/an/older/python3"))  # as a venv that moved leaves it
    sandbox.env["PATH"] = f"{path.parent}{os.pathsep}{sandbox.env['PATH']}"

    code, stdout, stderr = await _install(sandbox, "--to", str(path))

    assert code == 0, stderr
    assert path.read_text() == fresh
    assert "not on PATH" not in stdout


async def test_a_file_mcpxctl_did_not_write_is_refused_and_replaced_with_force(sandbox: Sandbox) -> None:
    path = sandbox.root / "bin" / "mcpx-shim"
    path.parent.mkdir()
    path.write_text("#!/bin/sh\nexec my-own-shim\n")

    code, stdout, stderr = await _install(sandbox, "--to", str(path))

    assert code == 1
    assert stdout == ""
    assert str(path) in stderr and "--force" in stderr
    assert path.read_text() == "#!/bin/sh\nexec my-own-shim\n"

    code, _, stderr = await _install(sandbox, "--to", str(path), "--force")

    assert code == 0, stderr
    assert launcher.MARKER in path.read_text()


async def test_a_link_to_the_console_script_is_refused_and_with_force_only_the_link_is_replaced(
    sandbox: Sandbox,
) -> None:
    """The README's install links pip's mcpx-shim into ~/.local/bin: the default destination."""
    path = Path(sandbox.env["HOME"]) / ".local" / "bin" / "mcpx-shim"
    path.parent.mkdir(parents=True)
    path.symlink_to(SHIM)
    console_script = Path(SHIM).read_bytes()

    code, _, stderr = await _install(sandbox)

    assert code == 1
    assert f"{path} is a link to {SHIM}" in stderr
    assert "pip's console script" in stderr and "--force" in stderr
    assert path.is_symlink()

    code, _, stderr = await _install(sandbox, "--force")

    assert code == 0, stderr
    assert not path.is_symlink()
    assert launcher.MARKER in path.read_text()
    assert Path(SHIM).read_bytes() == console_script


async def test_the_console_script_itself_is_never_written_over(sandbox: Sandbox) -> None:
    # --dry-run: the refusal comes first either way, and this file belongs to the venv every test uses.
    before = Path(SHIM).read_bytes()

    code, stdout, stderr = await _install(sandbox, "--to", SHIM, "--force", "--dry-run")

    assert code == 1
    assert stdout == ""
    assert "pip's console script" in stderr
    assert Path(SHIM).read_bytes() == before


async def test_dry_run_prints_the_launcher_and_where_and_writes_nothing(sandbox: Sandbox) -> None:
    path = sandbox.root / "bin" / "mcpx-shim"

    code, stdout, stderr = await _install(sandbox, "--to", str(path), "--dry-run")

    assert code == 0, stderr
    assert f"would write {path} (mode 0755)" in stdout
    assert f"    #!{sys.executable} -IS" in stdout.splitlines()
    assert not path.parent.exists()


@pytest.mark.parametrize("xdg_bin_home", [None, "elsewhere/bin"])
async def test_the_default_place_is_xdg_bin_home_else_local_bin(sandbox: Sandbox, xdg_bin_home: str | None) -> None:
    home = Path(sandbox.env["HOME"])
    if xdg_bin_home is not None:
        sandbox.env["XDG_BIN_HOME"] = str(sandbox.root / xdg_bin_home)
    expected = sandbox.root / xdg_bin_home if xdg_bin_home is not None else home / ".local" / "bin"

    code, stdout, stderr = await _install(sandbox, "--dry-run")

    assert code == 0, stderr
    assert stdout.startswith(f"would write {expected / 'mcpx-shim'} ")


def test_the_launcher_module_imports_only_the_standard_library_and_finds_the_shim_without_importing_it() -> None:
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "from mcpx.cli import launcher\n"
        "print(launcher.shim_directory())\n"
        "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] not in sys.stdlib_module_names"
        " and m.split('.')[0] != 'mcpx' or m == 'mcpx_shim'))"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert completed.stdout.splitlines() == [str(SHIM_DIR), "[]"]
