"""`mcpxctl doctor` on a healthy setup (exit 0) and on broken ones: each problem is printed with the command
that fixes it, and the exit status is 1."""

from __future__ import annotations

import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from mcpx import __version__
from mcpx.cli import ctl, doctor, launcher
from tests.support.daemon import Sandbox, agent, mcpxctl, running_daemon, upstream_toml
from tests.support.notify import fake_service_managers
from tests.support.upstream import TokenCheck, Upstream, reserve_port, running

BIN = Path(sys.executable).parent


def _lines(output: str, level: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(level)]


async def test_a_healthy_setup_is_all_ok_and_exits_0(sandbox: Sandbox) -> None:
    sandbox.env.update(fake_service_managers(sandbox.root, sandbox.env["PATH"]))  # systemctl: units are enabled
    alpha = Upstream("alpha", json_response=True)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    code, _, stderr = await mcpxctl(sandbox, "install", "--manager", "systemd")
    assert code == 0, stderr
    async with running(alpha), running_daemon(sandbox) as daemon:
        async with agent(sandbox) as client:
            await client.list_tools()  # the upstream's first connection attempt has ended
        code, stdout, stderr = await mcpxctl(sandbox, "doctor", "--manager", "systemd")

    assert code == 0, stdout + stderr
    assert _lines(stdout, "FAIL") == []
    assert stdout.splitlines()[-1] == "all is well"
    assert daemon.process is not None
    assert f"ok    config: {sandbox.config} is valid (1 upstream)" in stdout
    assert f"ok    state directory: {sandbox.state} is private" in stdout
    assert f"ok    socket: {sandbox.socket} is private" in stdout
    assert f"ok    daemon: mcpxd {__version__} (pid {daemon.process.pid}) answers on {sandbox.socket}" in stdout
    assert "ok    upstream alpha: ready, 5 tools" in stdout
    assert f"ok    shim: {BIN / 'mcpx-shim'}" in stdout
    assert "ok    service: installed: " in stdout
    # The sandbox forces keyring's `fail` backend: not a problem with token_store = "auto".
    assert "note  keyring: not usable (no OS keyring is available): OAuth tokens go to " in stdout


async def test_a_broken_setup_names_each_problem_with_its_fix_and_exits_1(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=True, tokens=TokenCheck({"the-right-token"}))
    closed = reserve_port()
    down_url = f"http://127.0.0.1:{closed.getsockname()[1]}/mcp"
    sandbox.env["ALPHA_TOKEN"] = "a-wrong-token"
    sandbox.write_config(
        upstream_toml("alpha", alpha.url, auth={"type": "bearer_env", "env": "ALPHA_TOKEN"})
        + upstream_toml("gone", down_url)
    )
    try:
        async with running(alpha), running_daemon(sandbox) as daemon:
            async with agent(sandbox) as client:
                await client.list_tools()
            sandbox.state.chmod(0o755)
            sandbox.log.chmod(0o644)
            sandbox.env["PATH"] = "/usr/bin:/bin"  # no mcpx-shim (and no systemctl: nothing installed either)
            code, stdout, stderr = await mcpxctl(sandbox, "doctor", "--manager", "systemd")
    finally:
        closed.close()

    assert code == 1, stdout + stderr
    assert daemon.process is not None
    text = stdout
    assert (
        f"FAIL  state directory: {sandbox.state} has mode 0755, must be 0700\n      fix: chmod 700 {sandbox.state}"
        in text
    )
    assert (
        f"FAIL  state directory: {sandbox.log} has mode 0644, must be 0600\n      fix: chmod 600 {sandbox.log}" in text
    )
    assert "FAIL  upstream alpha: credential rejected: " in text
    assert (
        f"      fix: set ALPHA_TOKEN in mcpxd's environment, then: kill {daemon.process.pid}  "
        "(the next agent's shim starts the new one)"
    ) in text
    assert "FAIL  upstream gone: unreachable: " in text
    assert f"      fix: check that {down_url} answers" in text
    assert "FAIL  shim: mcpx-shim is not on PATH" in text
    assert "      fix: mcpxctl install-shim  (writes ~/.local/bin/mcpx-shim; with ~/.local/bin on PATH)" in text
    assert "FAIL  service: not installed as a systemd user service\n      fix: mcpxctl install" in text
    assert "a-wrong-token" not in text
    assert text.splitlines()[-1] == "6 problems found"


async def test_an_invalid_config_and_a_stopped_service_are_reported_with_their_fixes(sandbox: Sandbox) -> None:
    sandbox.env.update(fake_service_managers(sandbox.root, sandbox.env["PATH"]))  # systemctl: units are enabled
    code, _, stderr = await mcpxctl(sandbox, "install", "--manager", "systemd")
    assert code == 0, stderr
    sandbox.write_config(upstream_toml("broken", "ftp://example.com/mcp"))

    code, stdout, _ = await mcpxctl(sandbox, "doctor", "--manager", "systemd")

    assert code == 1
    lines = stdout.splitlines()
    at = lines.index("FAIL  config: invalid:")
    assert lines[at + 1].startswith(f"        {sandbox.config}: upstream 'broken': url: ")
    assert lines[at + 2] == f"      fix: edit {sandbox.config}, then: mcpxctl reload"
    assert f"FAIL  daemon: not running on {sandbox.socket}" in lines
    assert "      fix: systemctl --user start mcpx.socket mcpx.service" in lines


async def test_with_an_invalid_config_the_socket_and_state_dir_it_names_are_the_ones_checked(
    sandbox: Sandbox,
) -> None:
    socket_path, state = sandbox.root / "elsewhere" / "mcpx.sock", sandbox.root / "other-state"
    settings = f'[daemon]\nsocket = "{socket_path}"\nstate_dir = "{state}"\n\n'
    sandbox.write_config(settings)
    async with running_daemon(sandbox) as daemon:
        sandbox.write_config(settings + upstream_toml("broken", "ftp://example.com/mcp"))  # a typo since it started
        code, stdout, _ = await mcpxctl(sandbox, "doctor", "--manager", "systemd")

    assert code == 1
    assert daemon.process is not None
    assert "FAIL  config: invalid:" in stdout
    assert f"ok    state directory: {state} is private" in stdout
    assert f"ok    socket: {socket_path} is private" in stdout
    assert f"ok    daemon: mcpxd {__version__} (pid {daemon.process.pid}) answers on {socket_path}" in stdout


def empty_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty config in `tmp_path`, which is also $HOME."""
    monkeypatch.setenv("HOME", str(tmp_path))
    config = tmp_path / "config.toml"
    config.write_text("")
    return config


def doctor_with_daemon_status(
    tmp_path: Path, config: Path, monkeypatch: pytest.MonkeyPatch, status: dict[str, Any]
) -> int:
    """`mcpxctl doctor` with `config`, the daemon answering `mcpx/status` with `status`; its exit code."""

    def fake_call(socket_path: Path, method: str, params: Any = None, **_: Any) -> Any:
        assert method == "mcpx/status"
        return status

    monkeypatch.setattr(doctor, "call", fake_call)
    return ctl.main(["--config", str(config), "--socket", str(tmp_path / "s.sock"), "doctor", "--manager", "systemd"])


def test_a_daemon_of_another_version_or_reading_another_config_is_a_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = empty_config(tmp_path, monkeypatch)
    status = {"version": "0.0.1", "pid": 4242, "config": "/elsewhere/config.toml", "upstreams": []}

    code = doctor_with_daemon_status(tmp_path, config, monkeypatch, status)

    out = capsys.readouterr().out
    assert code == 1
    assert f"FAIL  daemon: mcpxd is version 0.0.1, this mcpxctl is {__version__}" in out
    assert "      fix: kill 4242  (the next agent's shim starts the new one)" in out
    assert f"FAIL  daemon: it reads /elsewhere/config.toml, not {config}: your edits do not reach it" in out


def test_the_daemon_keeping_tokens_out_of_the_keyring_is_a_note_with_its_fixes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = empty_config(tmp_path, monkeypatch)
    note = "the OS keyring did not answer within 3 s"
    oauth = {"logged_in": True, "storage": "file", "storage_note": note}
    upstreams = [
        {"name": name, "state": "ready", "tools": 1, "url": f"https://{name}.example/mcp", "oauth": oauth}
        for name in ("one", "two")  # one store for all: said once
    ]
    upstreams.append({"name": "plain", "state": "ready", "tools": 2, "url": "https://plain.example/mcp"})
    status = {"version": __version__, "pid": 4242, "config": str(config), "upstreams": upstreams}

    doctor_with_daemon_status(tmp_path, config, monkeypatch, status)

    out = capsys.readouterr().out
    assert out.count("not the OS keyring") == 1
    assert (
        f"note  token store: tokens are kept in a private file, not the OS keyring: {note}\n"
        "      fix: unlock or set up the OS keyring (Secret Service / Keychain), then: kill 4242  "
        "(the next agent's shim starts the new one)\n"
        '      fix: or, to keep them in the file, set token_store = "file" in [daemon], then: kill 4242  '
        "(the next agent's shim starts the new one)\n"
    ) in out

    oauth["storage_note"], oauth["storage"] = None, "keyring"
    doctor_with_daemon_status(tmp_path, config, monkeypatch, status)
    assert "token store" not in capsys.readouterr().out


def test_a_socket_open_to_others_is_a_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    monkeypatch.setenv("HOME", str(tmp_path))
    directory = tmp_path / "run"
    directory.mkdir(mode=0o700)
    path = directory / "s.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        path.chmod(0o666)
        checker = doctor.Doctor(ctl._service_target(ctl_args(tmp_path, path)), manager="systemd")
        checker.check_socket(path)
    finally:
        sock.close()
    [finding] = [finding for finding in checker.findings if finding.subject == "socket"]
    assert finding.level == doctor.FAIL
    assert finding.message == f"{path} has mode 0666, must be 0600"
    assert finding.fixes == (f"chmod 600 {path}",)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def ctl_args(tmp_path: Path, socket_path: Path) -> Any:
    import argparse

    return argparse.Namespace(config=tmp_path / "config.toml", socket=socket_path)


def test_the_keyring_is_probed_as_the_daemon_probes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checker = doctor.Doctor(ctl._service_target(ctl_args(tmp_path, tmp_path / "s.sock")), manager="systemd")
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyring.backends.null.Keyring")  # answers every read: None
    checker.check_keyring("keyring", tmp_path)
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyring.backends.fail.Keyring")
    checker.check_keyring("keyring", tmp_path)

    assert [(finding.level, finding.message) for finding in checker.findings] == [
        (doctor.OK, "usable (keyring.backends.null.Keyring)"),
        (
            doctor.FAIL,
            'not usable: no OS keyring is available; token_store = "keyring" makes OAuth logins fail',
        ),
    ]


def test_a_launcher_of_install_shim_on_path_is_checked_against_what_it_would_write_now(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    written = launcher.plan(bin_dir / "mcpx-shim", force=False)
    launcher.write(written)
    checker = doctor.Doctor(ctl._service_target(ctl_args(tmp_path, tmp_path / "s.sock")), manager="systemd")
    checker.check_shim()
    # The same launcher for another Python (a venv moved, Python upgraded) no longer starts this installation.
    stale = launcher.plan(bin_dir / "mcpx-shim", force=False, interpreter="/opt/elsewhere/bin/python3")
    launcher.write(stale)
    checker.check_shim()

    assert [(finding.level, finding.message, finding.fixes) for finding in checker.findings] == [
        (doctor.OK, f"{written.path} (launcher)", ()),
        (
            doctor.FAIL,
            f"{written.path} was written for another Python, installation or version of mcpx",
            (f"mcpxctl install-shim --to {written.path}",),
        ),
    ]
