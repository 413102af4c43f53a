"""`mcpxctl doctor`: check a setup end to end and say, for each problem, the command that fixes it.

Checks, in order: the config file (validated by the config loader, imported here only), the state and socket
directories and files (owner, 0700 / 0600), the daemon (reachable, same version as this mcpxctl, reading the
config this mcpxctl resolves), each upstream (ready, logged in), where the daemon keeps OAuth tokens when that is
not the keyring (its status's `storage_note`), the OS keyring (probed in a child process under a time limit, as it
can hang), the shim on PATH, and the user service. Exit status 0 only when nothing failed.
Standard library only, except the lazy import of the config loader.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcpx import __version__, paths
from mcpx.cli import launcher, service
from mcpx.control.client import ControlError, DaemonNotRunning, call

OK, NOTE, FAIL = "ok", "note", "FAIL"
_STATUS_TIMEOUT = 5.0
_KEYRING_TIMEOUT = 5.0
_SYSTEMCTL_TIMEOUT = 5.0

# The daemon's own probe (auth/oauth/store.py), in the child process: a backend other than `fail`, and a read that
# answers. The child imports the daemon's modules; mcpxctl itself does not.
_KEYRING_PROBE = """
from mcpx.auth.oauth.store import StoreError, probe_keyring
try:
    backend = probe_keyring().get_keyring()
except StoreError as exc:
    print("none:", exc)
else:
    print("ok:", type(backend).__module__ + "." + type(backend).__name__)
"""


@dataclass(frozen=True)
class Finding:
    level: str
    subject: str
    message: str
    fixes: tuple[str, ...] = ()


@dataclass
class Doctor:
    """The checks of one setup: `target` holds its paths as mcpxctl resolves them (the config's `[daemon]` table
    read leniently, so they are right even when the config is invalid)."""

    target: service.Target
    manager: str
    findings: list[Finding] = field(default_factory=list)
    daemon_pid: int | None = None

    def add(self, level: str, subject: str, message: str, *fixes: str) -> None:
        self.findings.append(Finding(level, subject, message, fixes))

    # --- the checks ----------------------------------------------------------------------------------------------

    def run(self) -> list[Finding]:
        config = self.check_config()
        state_dir = self.target.state_dir
        self.check_private_dir("state directory", state_dir, [paths.LOG_FILE_NAME, "oauth-tokens.json"])
        self.check_socket(self.target.socket)
        status = self.check_daemon(self.target.socket)
        if status is not None:
            self.check_upstreams(status, config)
            self.check_token_store(status)
        self.check_keyring(getattr(getattr(config, "daemon", None), "token_store", "auto"), state_dir)
        self.check_shim()
        self.check_service()
        return self.findings

    def check_config(self) -> Any:
        path = self.target.config
        if not path.exists() and not self.target.config_explicit:
            self.add(NOTE, "config", f"no file at {path}: no upstreams", f"mcpxctl import --write  (or create {path})")
            return None
        from mcpx.config import load_config
        from mcpx.errors import ConfigError

        try:
            config = load_config(path)
        except ConfigError as exc:
            self.add(FAIL, "config", "invalid:\n" + "\n".join(exc.problems), f"edit {path}, then: mcpxctl reload")
            return None
        count = len(config.upstreams)
        self.add(OK, "config", f"{path} is valid ({count} upstream{'s' if count != 1 else ''})")
        return config

    def check_private_dir(self, subject: str, directory: Path, files: list[str]) -> None:
        try:
            info = directory.lstat()
        except FileNotFoundError:
            self.add(NOTE, subject, f"{directory} does not exist yet (mcpxd creates it)")
            return
        problems = _ownership_problems(directory, info, 0o700)
        for name in files:
            try:
                problems += _ownership_problems(directory / name, (directory / name).lstat(), 0o600)
            except FileNotFoundError:
                continue
        if not problems:
            self.add(OK, subject, f"{directory} is private")
        for message, fix in problems:
            self.add(FAIL, subject, message, fix)

    def check_socket(self, path: Path) -> None:
        if len(os.fsencode(path)) > paths.MAX_SOCKET_PATH:
            too_long = f"{path} is longer than {paths.MAX_SOCKET_PATH} bytes"
            self.add(FAIL, "socket", too_long, "set a shorter [daemon] socket")
            return
        self.check_private_dir("socket directory", path.parent, [])
        try:
            info = path.lstat()
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(info.st_mode):
            self.add(FAIL, "socket", f"{path} is not a socket", f"rm {path}")
            return
        problems = _ownership_problems(path, info, 0o600)
        for message, fix in problems:
            self.add(FAIL, "socket", message, fix)
        if not problems:
            self.add(OK, "socket", f"{path} is private")

    def check_daemon(self, socket_path: Path) -> dict[str, Any] | None:
        installed = self._installed()
        try:
            status: dict[str, Any] = call(socket_path, "mcpx/status", timeout=_STATUS_TIMEOUT)
        except DaemonNotRunning:
            if installed:
                self.add(FAIL, "daemon", f"not running on {socket_path}", self._start_command())
            else:
                self.add(NOTE, "daemon", f"not running on {socket_path} (an agent's mcpx-shim starts it on demand)")
            return None
        except (ControlError, OSError, ValueError) as exc:
            self.add(FAIL, "daemon", f"does not answer properly on {socket_path}: {exc}", self._restart_command())
            return None
        self.daemon_pid = status["pid"]
        self.add(OK, "daemon", f"mcpxd {status['version']} (pid {status['pid']}) answers on {socket_path}")
        if status["version"] != __version__:
            self.add(
                FAIL,
                "daemon",
                f"mcpxd is version {status['version']}, this mcpxctl is {__version__}",
                self._restart_command(),
            )
        if Path(status["config"]).resolve() != self.target.config.resolve():
            self.add(
                FAIL,
                "daemon",
                f"it reads {status['config']}, not {self.target.config}: your edits do not reach it",
                "mcpxctl install --force  (from the environment with the config you use), or pass --config",
            )
        return status

    def check_upstreams(self, status: dict[str, Any], config: Any) -> None:
        auth = {upstream.name: upstream.auth for upstream in getattr(config, "upstreams", ())}
        local = {upstream.name for upstream in getattr(config, "upstreams", ()) if upstream.command is not None}
        for upstream in status["upstreams"]:
            name, state, error = upstream["name"], upstream["state"], upstream.get("last_error")
            subject = f"upstream {name}"
            oauth = upstream.get("oauth")
            if state == "needs_login" or (oauth and not oauth.get("logged_in")):
                self.add(FAIL, subject, f"needs a login ({upstream['url']})", f"mcpxctl login {name}")
            elif state == "auth_failed":
                self.add(FAIL, subject, f"credential rejected: {error}", *self._credential_fixes(auth.get(name)))
            elif state == "down" and name in local:
                self.add(
                    FAIL,
                    subject,
                    f"not running: {error}",
                    f"check that `{upstream['url']}` runs (its stderr is in `mcpxctl logs`; mcpxd restarts it by "
                    "itself), or fix command, args, env or cwd in the config",
                )
            elif state == "down":
                self.add(
                    FAIL,
                    subject,
                    f"unreachable: {error}",
                    f"check that {upstream['url']} answers (mcpxd retries by itself), or fix the url in the config",
                )
            elif state == "ready":
                tools = upstream["tools"]
                self.add(OK, subject, f"ready, {tools} tool{'s' if tools != 1 else ''}")
            else:
                self.add(NOTE, subject, f"{state}{': ' + error if error else ''}")
            if upstream.get("withheld_tools"):
                self.add(
                    NOTE,
                    subject,
                    "withheld (another upstream exposes the same name): " + ", ".join(upstream["withheld_tools"]),
                    f"set namespace = true or exclude_tools for {name}",
                )

    def check_token_store(self, status: dict[str, Any]) -> None:
        """Where the running daemon keeps OAuth tokens, when that is not the keyring `token_store` asked for (its
        OAuth upstreams share one store: the note is the same for each)."""
        notes: set[str] = {
            note for upstream in status["upstreams"] if (note := (upstream.get("oauth") or {}).get("storage_note"))
        }
        restart = self._restart_command()
        for note in sorted(notes):
            self.add(
                NOTE,
                "token store",
                f"tokens are kept in a private file, not the OS keyring: {note}",
                f"unlock or set up the OS keyring (Secret Service / Keychain), then: {restart}",
                f'or, to keep them in the file, set token_store = "file" in [daemon], then: {restart}',
            )

    def _credential_fixes(self, auth: Any) -> tuple[str, ...]:
        kind = getattr(auth, "type", None)
        restart = self._restart_command()
        if kind == "bearer_env":
            where = paths.env_file(self.target.config) if self._installed() else "mcpxd's environment"
            return (f"set {auth.env} in {where}, then: {restart}",)
        if kind == "bearer_file":
            return (f"put a valid token in {auth.path} (mcpxd re-reads it on the next call)",)
        if kind == "static_header":
            return (f"fix the value of {auth.header} (and the variables it names), then: {restart}",)
        return (f"fix the credential in {self.target.config}, then: mcpxctl reload",)

    def check_keyring(self, token_store: str, state_dir: Path) -> None:
        if token_store == "file":
            self.add(OK, "keyring", 'not used (token_store = "file")')
            return
        try:
            probe = subprocess.run(
                [sys.executable, "-c", _KEYRING_PROBE],
                capture_output=True,
                text=True,
                timeout=_KEYRING_TIMEOUT,
                check=False,
            )
            answer = probe.stdout.strip() or f"error: {(probe.stderr.strip().splitlines() or ['no answer'])[-1]}"
        except subprocess.TimeoutExpired:
            answer = f"error: it did not answer within {_KEYRING_TIMEOUT:g} s (a locked or absent Secret Service)"
        if answer.startswith("ok:"):
            self.add(OK, "keyring", f"usable ({answer.removeprefix('ok:').strip()})")
            return
        reason = answer.partition(":")[2].strip()
        if token_store == "keyring":
            self.add(
                FAIL,
                "keyring",
                f'not usable: {reason}; token_store = "keyring" makes OAuth logins fail',
                'set token_store = "file" in [daemon], or unlock the keyring (Secret Service / Keychain)',
            )
        else:
            self.add(NOTE, "keyring", f"not usable ({reason}): OAuth tokens go to {state_dir / 'oauth-tokens.json'}")

    def check_shim(self) -> None:
        found = shutil.which("mcpx-shim")
        ours = self.target.bin_dir / "mcpx-shim"
        if found is None:
            self.add(
                FAIL,
                "shim",
                "mcpx-shim is not on PATH: agents configured with `mcpx-shim` cannot start it",
                "mcpxctl install-shim  (writes ~/.local/bin/mcpx-shim; with ~/.local/bin on PATH)",
            )
            return
        if launcher.is_own_launcher(Path(found)):
            self._check_launcher(Path(found))
            return
        if ours.exists() and Path(found).resolve() != ours.resolve():
            self.add(NOTE, "shim", f"PATH finds {found}, not this installation's {ours}")
            return
        self.add(OK, "shim", f"{found} (`mcpxctl install-shim` writes a launcher that starts faster)")

    def _check_launcher(self, found: Path) -> None:
        """A launcher of `mcpxctl install-shim` is fine when it is what that command would write now."""
        try:
            expected = launcher.plan(found, force=True).text
        except launcher.Refused as exc:
            self.add(FAIL, "shim", f"{found}: {exc}")
            return
        if found.read_text(encoding="utf-8", errors="replace") != expected:
            self.add(
                FAIL,
                "shim",
                f"{found} was written for another Python, installation or version of mcpx",
                f"mcpxctl install-shim --to {found}",
            )
            return
        self.add(OK, "shim", f"{found} (launcher)")

    def check_service(self) -> None:
        files = service.service_files(self.manager)
        present = [path for path in files if path.exists()]
        if not present:
            self.add(FAIL, "service", f"not installed as a {self.manager} user service", "mcpxctl install")
            return
        if len(present) != len(files) or not all(service.written_by_mcpx(path) for path in present):
            self.add(FAIL, "service", "some service files are missing or not mcpx's: " + ", ".join(map(str, files)))
            return
        sandbox = any("ProtectSystem=" in path.read_text() for path in present)  # as installed (--no-sandbox)
        plan = service.plan_install(self.target, self.manager, force=False, sandbox=sandbox)
        if plan.write:
            self.add(
                FAIL,
                "service",
                "the installed files differ from what `mcpxctl install` writes now (another installation, "
                "changed paths, or another version): " + ", ".join(map(str, plan.write)),
                "mcpxctl install",
            )
        else:
            self.add(OK, "service", "installed: " + ", ".join(map(str, present)))
        if self.manager == "systemd":
            self._check_enabled()

    def _check_enabled(self) -> None:
        systemctl = shutil.which("systemctl")
        if systemctl is None:
            self.add(NOTE, "service", "systemctl is not on PATH: cannot tell whether the units are enabled")
            return
        try:
            answer = subprocess.run(
                [systemctl, "--user", "is-enabled", service.SOCKET_UNIT],
                capture_output=True,
                text=True,
                timeout=_SYSTEMCTL_TIMEOUT,
                check=False,
            ).stdout.strip()
        except subprocess.TimeoutExpired:
            answer = "no answer"
        if answer != "enabled":
            self.add(
                FAIL,
                "service",
                f"{service.SOCKET_UNIT} is {answer or 'not enabled'}",
                f"systemctl --user enable --now {service.SOCKET_UNIT}",
            )

    # --- helpers -------------------------------------------------------------------------------------------------

    def _installed(self) -> bool:
        return any(path.exists() for path in service.service_files(self.manager))

    def _start_command(self) -> str:
        if self.manager == "launchd":
            return f"launchctl kickstart gui/{os.getuid()}/{service.LABEL}"
        return f"systemctl --user start {service.SOCKET_UNIT} {service.SERVICE_UNIT}"

    def _restart_command(self) -> str:
        if self._installed():
            if self.manager == "launchd":
                return f"launchctl kickstart -k gui/{os.getuid()}/{service.LABEL}"
            return f"systemctl --user restart {service.SERVICE_UNIT}"
        if self.daemon_pid is not None:
            return f"kill {self.daemon_pid}  (the next agent's shim starts the new one)"
        return "restart mcpxd"


def _ownership_problems(path: Path, info: os.stat_result, mode: int) -> list[tuple[str, str]]:
    problems = []
    if info.st_uid != os.geteuid():
        problems.append((f"{path} belongs to uid {info.st_uid}, not to you", f"sudo chown {os.geteuid()} {path}"))
    if stat.S_IMODE(info.st_mode) & ~mode & 0o777:
        problems.append(
            (f"{path} has mode {stat.S_IMODE(info.st_mode):04o}, must be {mode:04o}", f"chmod {mode:o} {path}")
        )
    return problems


def render(findings: list[Finding]) -> str:
    lines = []
    for finding in findings:
        first, *more = finding.message.splitlines()
        lines.append(f"{finding.level:<4}  {finding.subject}: {first}")
        lines.extend(f"        {line}" for line in more)
        lines.extend(f"      fix: {fix}" for fix in finding.fixes)
    failures = sum(finding.level == FAIL for finding in findings)
    lines.append("")
    lines.append("all is well" if not failures else f"{failures} problem{'s' if failures != 1 else ''} found")
    return "\n".join(lines)
