"""`mcpxctl install` / `uninstall`: the files written into a temp HOME, what the service manager is asked to do
(fake `systemctl` / `launchctl` on PATH that record their argv), `systemd-analyze verify` on the written units
when the machine has it, the plist parsed back with plistlib, and the repository's copies kept in step."""

from __future__ import annotations

import asyncio
import os
import plistlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mcpx import paths
from mcpx.cli import ctl, service
from mcpx.cli.files import atomic_write
from mcpx.control.client import daemon_answers, lock_is_free
from tests.support.daemon import MCPXCTL, Sandbox, mcpxctl, running_daemon, upstream_toml
from tests.support.notify import fake_service_managers
from tests.support.upstream import Upstream, running

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@dataclass
class Home:
    root: Path
    home: Path
    runtime: Path
    record: Path

    @property
    def units(self) -> Path:
        return self.home / ".config" / "systemd" / "user"

    @property
    def plist(self) -> Path:
        return self.home / "Library" / "LaunchAgents" / f"{service.LABEL}.plist"

    def commands(self) -> list[str]:
        return self.record.read_text().splitlines() if self.record.exists() else []


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Home]:
    """A fresh HOME and runtime dir, none of mcpx's variables, and recording service managers first on PATH."""
    home_dir, runtime = tmp_path / "home", tmp_path / "run"
    home_dir.mkdir()
    runtime.mkdir(mode=0o700)
    for name in ("MCPX_CONFIG", "MCPX_SOCKET", "MCPX_STATE_DIR", "XDG_CONFIG_HOME", "XDG_STATE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(home_dir))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    for name, value in fake_service_managers(tmp_path, os.environ.get("PATH", "/usr/bin:/bin")).items():
        monkeypatch.setenv(name, value)
    yield Home(tmp_path, home_dir, runtime, tmp_path / "record")


def _ctl(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = ctl.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _verify(home: Home, *units: Path) -> None:
    """`systemd-analyze --user verify`: unknown keys, bad values and a missing ExecStart binary all show up."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    env = {**os.environ, "HOME": str(home.home), "XDG_RUNTIME_DIR": str(home.runtime)}
    result = subprocess.run(
        [analyze, "--user", "verify", *map(str, units)], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


# --- systemd -----------------------------------------------------------------------------------------------------


def test_install_writes_marked_units_with_this_installation_and_enables_the_socket(
    home: Home, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _ctl(capsys, "install", "--manager", "systemd")

    assert code == 0, err
    socket_unit, service_unit = home.units / "mcpx.socket", home.units / "mcpx.service"
    assert f"wrote {socket_unit}" in out
    assert f"wrote {service_unit}" in out
    socket_text, service_text = socket_unit.read_text(), service_unit.read_text()
    assert service.MARKER in socket_text.splitlines()[0]
    assert service.MARKER in service_text.splitlines()[0]
    assert "ListenStream=%t/mcpx/mcpx.sock\n" in socket_text
    assert "SocketMode=0600\n" in socket_text
    assert "DirectoryMode=0700\n" in socket_text
    assert "FileDescriptorName=mcpx\n" in socket_text
    assert "Type=notify\n" in service_text
    assert f"ExecStart={BIN}/mcpxd\n" in service_text
    assert f"ExecReload={BIN}/mcpxctl --socket %t/mcpx/mcpx.sock reload\n" in service_text
    assert "Restart=on-failure\n" in service_text
    assert "ProtectSystem=strict\n" in service_text
    assert "PrivateTmp=yes\n" in service_text
    assert "ReadWritePaths=%t/mcpx %h/.local/state/mcpx\n" in service_text
    assert "EnvironmentFile=-%h/.config/mcpx/env\n" in service_text
    # The state directory exists (0700) before the sandbox needs it writable.
    state = home.home / ".local" / "state" / "mcpx"
    assert state.is_dir()
    assert state.stat().st_mode & 0o777 == 0o700
    assert home.commands() == [
        "systemctl --user daemon-reload",
        "systemctl --user enable --now mcpx.socket mcpx.service",
    ]
    _verify(home, socket_unit, service_unit)


def test_a_named_config_and_state_dir_reach_the_daemon_and_odd_paths_are_quoted(
    home: Home, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = home.root / "my configs" / "mcpx 100%.toml"
    config.parent.mkdir()
    config.write_text("")
    monkeypatch.setenv("MCPX_STATE_DIR", str(home.root / "state"))

    code, _, err = _ctl(capsys, "--config", str(config), "install", "--manager", "systemd")

    assert code == 0, err
    text = (home.units / "mcpx.service").read_text()
    assert f'ExecStart={BIN}/mcpxd --config "{str(config).replace("%", "%%")}"\n' in text
    assert f"Environment=MCPX_STATE_DIR={home.root / 'state'}\n" in text
    assert f"ReadWritePaths=%t/mcpx {home.root / 'state'}\n" in text
    # A private /tmp would hide that state directory (it is under /tmp here) from the daemon.
    assert "PrivateTmp=yes" not in text
    assert "# PrivateTmp is off: the socket or state directory is under /tmp\n" in text
    _verify(home, home.units / "mcpx.socket", home.units / "mcpx.service")


def test_dry_run_prints_the_files_and_commands_and_touches_nothing(
    home: Home, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _ctl(capsys, "install", "--manager", "systemd", "--dry-run")

    assert code == 0, err
    assert f"would write {home.units / 'mcpx.service'}:" in out
    assert f"    ExecStart={BIN}/mcpxd" in out
    assert "would run: systemctl --user enable --now mcpx.socket mcpx.service" in out
    assert not home.units.exists()
    assert not (home.home / ".local").exists()
    assert home.commands() == []


def test_install_refuses_to_overwrite_a_unit_it_did_not_write_unless_forced(
    home: Home, capsys: pytest.CaptureFixture[str]
) -> None:
    home.units.mkdir(parents=True)
    mine = "[Service]\nExecStart=/usr/bin/true\n"
    (home.units / "mcpx.service").write_text(mine)

    code, out, err = _ctl(capsys, "install", "--manager", "systemd")
    assert code == 1
    assert out == ""
    assert err.strip() == (
        f"mcpxctl: not overwriting a file mcpxctl did not write: {home.units / 'mcpx.service'} "
        "(move it aside, or use --force)"
    )
    assert (home.units / "mcpx.service").read_text() == mine
    assert not (home.units / "mcpx.socket").exists()
    assert home.commands() == []

    code, _, err = _ctl(capsys, "install", "--manager", "systemd", "--force")
    assert code == 0, err
    assert service.MARKER in (home.units / "mcpx.service").read_text()


def test_reinstall_is_a_no_op_when_nothing_changed_and_restarts_when_something_did(
    home: Home, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _ctl(capsys, "install", "--manager", "systemd")[0] == 0
    first = home.commands()

    code, out, _ = _ctl(capsys, "install", "--manager", "systemd")
    assert code == 0
    assert "nothing to do" in out
    assert home.commands() == first

    code, _, err = _ctl(capsys, "install", "--manager", "systemd", "--no-sandbox")
    assert code == 0, err
    assert "ProtectSystem" not in (home.units / "mcpx.service").read_text()
    assert home.commands()[len(first) :] == [
        "systemctl --user daemon-reload",
        "systemctl --user stop mcpx.service mcpx.socket",
        "systemctl --user enable --now mcpx.socket mcpx.service",
    ]
    _verify(home, home.units / "mcpx.socket", home.units / "mcpx.service")


def test_a_failing_service_manager_makes_install_fail_with_its_message(
    home: Home, capsys: pytest.CaptureFixture[str]
) -> None:
    failing = home.root / "fakebin" / "systemctl"
    failing.write_text('#!/bin/sh\necho "Failed to connect to bus: No medium found" >&2\nexit 1\n')

    code, _, err = _ctl(capsys, "install", "--manager", "systemd")

    assert code == 1
    assert err.splitlines() == [
        "mcpxctl: `systemctl --user daemon-reload` failed (exit 1): Failed to connect to bus: No medium found",
        "the files are written: once the cause is fixed, run `mcpxctl install --force` (or `mcpxctl uninstall`)",
    ]


def test_uninstall_disables_and_removes_only_what_install_wrote(home: Home, capsys: pytest.CaptureFixture[str]) -> None:
    assert _ctl(capsys, "install", "--manager", "systemd")[0] == 0
    before = len(home.commands())

    code, out, err = _ctl(capsys, "uninstall", "--manager", "systemd")

    assert code == 0, err
    assert f"removed {home.units / 'mcpx.service'}" in out
    assert list(home.units.iterdir()) == []
    assert home.commands()[before:] == [
        "systemctl --user disable --now mcpx.socket mcpx.service",
        "systemctl --user daemon-reload",
    ]
    code, out, _ = _ctl(capsys, "uninstall", "--manager", "systemd")
    assert code == 0
    assert "not installed" in out

    home.units.mkdir(parents=True, exist_ok=True)
    (home.units / "mcpx.socket").write_text("[Socket]\nListenStream=/tmp/x\n")
    code, _, err = _ctl(capsys, "uninstall", "--manager", "systemd")
    assert code == 1
    assert "not removing a file mcpxctl did not write" in err
    assert (home.units / "mcpx.socket").exists()


def test_uninstall_works_from_a_python_without_mcpxd_beside_it_where_install_refuses(
    home: Home, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _ctl(capsys, "install", "--manager", "systemd")[0] == 0
    elsewhere = home.root / "other-venv" / "bin"
    elsewhere.mkdir(parents=True)
    monkeypatch.setattr(sys, "executable", str(elsewhere / "python3"))

    code, _, err = _ctl(capsys, "install", "--manager", "systemd", "--force")
    assert code == 1
    assert err.startswith(f"mcpxctl: mcpxd is not beside this Python ({elsewhere})")

    code, out, err = _ctl(capsys, "uninstall", "--manager", "systemd")
    assert code == 0, err
    assert "mcpx is no longer a user service" in out
    assert list(home.units.iterdir()) == []


async def test_install_stops_a_daemon_that_runs_outside_the_service_manager(sandbox: Sandbox) -> None:
    sandbox.env.update(fake_service_managers(sandbox.root, sandbox.env["PATH"]))
    sandbox.write_config("")
    async with running_daemon(sandbox) as daemon:
        assert daemon.process is not None
        pid = daemon.process.pid
        code, out, err = await mcpxctl(sandbox, "install", "--manager", "systemd")
        assert code == 0, err
        assert f"stopping the mcpxd running outside the service manager (pid {pid})" in out
        assert not daemon_answers(sandbox.socket)  # install waited for that before starting the service
        async with asyncio.timeout(15):
            assert await daemon.process.wait() == 0
    assert (sandbox.root / "record").read_text().splitlines()[-1] == (
        "systemctl --user enable --now mcpx.socket mcpx.service"
    )


async def test_install_waits_until_the_stopped_daemon_lets_go_of_its_lock(sandbox: Sandbox) -> None:
    sandbox.env.update(fake_service_managers(sandbox.root, sandbox.env["PATH"]))
    alpha = Upstream("alpha", json_response=True)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    lock = paths.socket_lock(sandbox.socket)
    async with running(alpha), running_daemon(sandbox) as daemon:
        assert (await mcpxctl(sandbox, "tools"))[0] == 0  # alpha's session is open: mcpxd ends it when it stops
        assert not lock_is_free(lock)
        # Run to completion with this event loop blocked: alpha (served by it) does not answer the stopping
        # daemon's session DELETE, so mcpxd closes its socket at once but holds its lock for the DELETE's bound.
        completed = subprocess.run(  # noqa: ASYNC221 (blocking on purpose)
            [MCPXCTL, "install", "--manager", "systemd"],
            env=sandbox.env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert completed.returncode == 0, completed.stderr
        assert lock_is_free(lock)  # what the service's mcpxd needs, or it exits 4 (another mcpxd serves it)
        assert daemon.process is not None
        async with asyncio.timeout(15):
            assert await daemon.process.wait() == 0


def test_uninstall_without_a_service_manager_still_removes_the_files(
    home: Home, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _ctl(capsys, "install", "--manager", "systemd")[0] == 0
    monkeypatch.setenv("PATH", str(home.root / "empty"))

    code, out, err = _ctl(capsys, "uninstall", "--manager", "systemd")

    assert code == 0, err
    assert "skipped: systemctl --user disable --now mcpx.socket mcpx.service (systemctl is not on PATH)" in out
    assert not (home.units / "mcpx.service").exists()


def test_install_without_a_service_manager_writes_nothing(
    home: Home, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(home.root / "empty"))

    code, _, err = _ctl(capsys, "install", "--manager", "systemd")

    assert code == 1
    assert "systemctl is not on PATH" in err
    assert not home.units.exists()


def test_files_are_replaced_whole_with_their_mode_and_a_failed_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    unit = tmp_path / "mcpx.service"
    unit.write_text("old\n")
    atomic_write(unit, "new\n", 0o644)
    assert unit.read_text() == "new\n"
    assert unit.stat().st_mode & 0o777 == 0o644

    occupied = tmp_path / "mcpx.socket"
    occupied.mkdir()  # rename(2) cannot put a file over a directory
    with pytest.raises(IsADirectoryError):
        atomic_write(occupied, "text\n", 0o644)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mcpx.service", "mcpx.socket"]
    assert list(occupied.iterdir()) == []


# --- launchd -----------------------------------------------------------------------------------------------------


def test_launchd_install_writes_a_valid_plist_and_bootstraps_it(home: Home, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _ctl(capsys, "install", "--manager", "launchd")

    assert code == 0, err
    assert f"wrote {home.plist}" in out
    text = home.plist.read_text()
    assert service.MARKER in text.splitlines()[2]
    document = plistlib.loads(home.plist.read_bytes())  # what `plutil -lint` checks: it parses
    state = home.home / ".local" / "state" / "mcpx"
    assert document["Label"] == service.LABEL
    assert document["ProgramArguments"] == [str(BIN / "mcpxd")]
    assert document["RunAtLoad"] is True
    assert document["KeepAlive"] == {"SuccessfulExit": False}
    assert document["StandardOutPath"] == str(state / "launchd.out.log")
    assert document["StandardErrorPath"] == str(state / "launchd.err.log")
    assert document["EnvironmentVariables"]["PATH"].startswith(f"{BIN}:")
    assert state.is_dir()  # launchd does not create the log files' directory
    assert home.commands() == [f"launchctl bootstrap gui/{os.getuid()} {home.plist}"]

    code, _, err = _ctl(capsys, "install", "--manager", "launchd", "--force")
    assert code == 0, err
    assert home.commands()[1:] == [
        f"launchctl bootout gui/{os.getuid()}/{service.LABEL}",
        f"launchctl bootstrap gui/{os.getuid()} {home.plist}",
    ]

    code, out, err = _ctl(capsys, "uninstall", "--manager", "launchd")
    assert code == 0, err
    assert not home.plist.exists()
    assert home.commands()[-1] == f"launchctl bootout gui/{os.getuid()}/{service.LABEL}"


# --- the repository's copies -------------------------------------------------------------------------------------


def test_the_repository_unit_files_and_plist_are_what_install_renders() -> None:
    for relative, text in service.template_files().items():
        assert (REPO / relative).read_text() == text, (
            f"{relative} is stale: regenerate with `.venv/bin/python -m mcpx.cli.service .`"
        )
    plistlib.loads((REPO / "launchd" / f"{service.LABEL}.plist").read_bytes())


def test_the_repository_units_pass_systemd_analyze_verify(home: Home) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("needs systemd-analyze")
    # The template's ExecStart is the README's install location; put this installation's binaries there.
    target = home.home / ".local" / "share" / "mcpx" / "bin"
    target.mkdir(parents=True)
    for name in ("mcpxd", "mcpxctl"):
        (target / name).symlink_to(BIN / name)
    _verify(home, REPO / "systemd" / "mcpx.socket", REPO / "systemd" / "mcpx.service")


def test_paths_are_spelled_with_specifiers_and_percent_signs_doubled(home: Home) -> None:
    assert service.systemd_path(home.runtime / "mcpx" / "mcpx.sock") == "%t/mcpx/mcpx.sock"
    assert service.systemd_path(home.home / "a 100%" / "x") == "%h/a 100%%/x"
    assert service.systemd_path(home.home) == "%h"
    assert service.systemd_path(Path("/opt/50%")) == "/opt/50%%"
