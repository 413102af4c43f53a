"""`mcpxctl install` / `uninstall`: mcpxd as a user service (systemd user units on Linux, a LaunchAgent on macOS).

The unit and plist texts are rendered here, from the paths of this installation; `systemd/` and `launchd/` in
the repository hold the same texts rendered for the layout of the README's Install section (a test keeps them
in step; `python -m mcpx.cli.service TEMPLATES_ROOT` rewrites them). Every file `install` writes starts with
a header naming it, and neither command overwrites or removes a file without that header unless forced.
Standard library only.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mcpx import __version__, paths
from mcpx.cli.files import atomic_write, has_marker
from mcpx.control.client import ControlError, DaemonNotRunning, call, lock_is_free

MARKER = "Written by mcpxctl install"
LABEL = "io.github.mcpx.mcpxd"
SOCKET_UNIT = "mcpx.socket"
SERVICE_UNIT = "mcpx.service"
_COMMAND_TIMEOUT = 60.0
_STOP_TIMEOUT = 20.0  # a stopping mcpxd lets its calls finish first (mcpxd --stop-timeout, 10 s)


def _installed_header(comment: str) -> str:
    return (
        f"{comment} {MARKER} (mcpx {__version__}); `mcpxctl uninstall` removes it.\n"
        f"{comment} Reinstalling overwrites it: for local changes use `systemctl --user edit`.\n"
    )


INSTALLED_SYSTEMD_HEADER = _installed_header("#")
TEMPLATE_SYSTEMD_HEADER = (
    "# mcpx user unit for the layout of the README's Install section. `mcpxctl install` writes this file with\n"
    "# the paths of your installation (and enables it); copy it by hand only if that layout is yours.\n"
)


@dataclass(frozen=True)
class Layout:
    """Where this installation's pieces are, as the service files spell them (systemd specifiers allowed)."""

    bin_dir: str
    socket: str
    state_dir: str
    env_file: str
    config: str | None = None  # only when the user named one (--config / $MCPX_CONFIG)
    environment: dict[str, str] = field(default_factory=dict)  # extra variables for the daemon
    sandbox: bool = True


# --- rendering ---------------------------------------------------------------------------------------------------


def _unit_word(value: str) -> str:
    """One word of a unit file line: quoted when it holds a space, quote or backslash."""
    if value and not any(char in value for char in " \t\"\\'"):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _command(layout: Layout, program: str, *args: str) -> str:
    words = [f"{layout.bin_dir}/{program}"]
    if layout.config is not None:
        words += ["--config", layout.config]
    return " ".join(_unit_word(word) for word in [*words, *args])


def systemd_units(layout: Layout, header: str = INSTALLED_SYSTEMD_HEADER) -> dict[str, str]:
    """The text of `mcpx.socket` and `mcpx.service`."""
    socket_unit = f"""{header}
[Unit]
Description=mcpx agent socket (starts mcpxd on the first connection)

[Socket]
ListenStream={layout.socket}
SocketMode=0600
DirectoryMode=0700
FileDescriptorName=mcpx
RemoveOnStop=yes

[Install]
WantedBy=sockets.target
"""
    environment = "".join(
        f"Environment={_unit_word(f'{name}={value}')}\n" for name, value in sorted(layout.environment.items())
    )
    sandbox = ""
    if layout.sandbox:
        writable_paths = (str(Path(layout.socket).parent), layout.state_dir)
        writable = " ".join(_unit_word(path) for path in writable_paths)
        # A private /tmp would hide a socket or state directory that lives under /tmp from the daemon.
        under_tmp = any(path == "/tmp" or path.startswith("/tmp/") for path in writable_paths)
        private_tmp = (
            "# PrivateTmp is off: the socket or state directory is under /tmp\n" if under_tmp else "PrivateTmp=yes\n"
        )
        sandbox = f"""
# Sandbox. A user manager can set up the namespaces below only with PrivateUsers=yes (your uid keeps its
# identity inside; other users appear as nobody, and mcpxd refuses them anyway). The OS keyring still works: it
# is reached over the D-Bus session socket, and read-only paths do not stop AF_UNIX connections. If the service
# fails with status 218 or 226 (no unprivileged user namespaces), run `mcpxctl install --force --no-sandbox`.
NoNewPrivileges=yes
PrivateUsers=yes
{private_tmp}ProtectSystem=strict
ReadWritePaths={writable}
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
RestrictRealtime=yes
LockPersonality=yes
SystemCallArchitectures=native
"""
    service_unit = f"""{header}
[Unit]
Description=mcpx: one daemon holding the credentials of every remote MCP server your agents use
Requires={SOCKET_UNIT}
After={SOCKET_UNIT}

[Service]
Type=notify
NotifyAccess=main
ExecStart={_command(layout, "mcpxd")}
ExecReload={_command(layout, "mcpxctl", "--socket", layout.socket, "reload")}
Restart=on-failure
RestartSec=2
# 2: the configuration is invalid (fix it, then `systemctl --user restart mcpx`); 4: another mcpxd serves it.
RestartPreventExitStatus=2 4
WatchdogSec=60
TimeoutStopSec=20
UMask=0077
# Variables for `bearer_env` and `${{VAR}}` credentials (NAME=value lines, mode 0600): a user service does not
# see your shell's environment.
EnvironmentFile=-{layout.env_file}
{environment}{sandbox}
[Install]
WantedBy=default.target
Also={SOCKET_UNIT}
"""
    return {SOCKET_UNIT: socket_unit, SERVICE_UNIT: service_unit}


def launchd_plist(layout: Layout, *, installed: bool = True) -> str:
    """The LaunchAgent property list: started at login, restarted when it exits unsuccessfully."""
    import plistlib

    path = ":".join([layout.bin_dir, "/usr/local/bin", "/opt/homebrew/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"])
    arguments = [f"{layout.bin_dir}/mcpxd"] + (["--config", layout.config] if layout.config else [])
    document = {
        "Label": LABEL,
        "ProgramArguments": arguments,
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": 10,
        "ExitTimeOut": 20,
        "StandardOutPath": f"{layout.state_dir}/launchd.out.log",
        "StandardErrorPath": f"{layout.state_dir}/launchd.err.log",
        "EnvironmentVariables": {"PATH": path, **dict(sorted(layout.environment.items()))},
    }
    text = plistlib.dumps(document, sort_keys=False).decode()
    if installed:
        comment = f"<!-- {MARKER} (mcpx {__version__}); `mcpxctl uninstall` removes it. -->"
    else:
        comment = (
            "<!-- mcpx LaunchAgent for the layout of the README's Install section, with /Users/you as the home\n"
            "     directory. `mcpxctl install` writes it with the paths of your installation and loads it. -->"
        )
    head, doctype, rest = text.partition("<!DOCTYPE")
    line_end = rest.index("\n") + 1
    return f"{head}{doctype}{rest[:line_end]}{comment}\n{rest[line_end:]}"


def template_files() -> dict[str, str]:
    """The repository's copies (relative path → text), for the layout of the README's Install section."""
    systemd_layout = Layout(
        bin_dir="%h/.local/share/mcpx/bin",
        socket="%t/mcpx/mcpx.sock",
        state_dir="%h/.local/state/mcpx",
        env_file="%h/.config/mcpx/env",
    )
    home = "/Users/you"
    launchd_layout = Layout(
        bin_dir=f"{home}/.local/share/mcpx/bin",
        socket="",
        state_dir=f"{home}/.local/state/mcpx",
        env_file=f"{home}/.config/mcpx/env",
    )
    files = {f"systemd/{name}": text for name, text in systemd_units(systemd_layout, TEMPLATE_SYSTEMD_HEADER).items()}
    files[f"launchd/{LABEL}.plist"] = launchd_plist(launchd_layout, installed=False)
    return files


# --- where things go ---------------------------------------------------------------------------------------------


def _under(path: Path, base: Path | None, specifier: str) -> str | None:
    if base is None:
        return None
    try:
        relative = path.relative_to(base)
    except ValueError:
        return None
    escaped = str(relative).replace("%", "%%")
    return f"{specifier}/{escaped}" if escaped != "." else specifier


def systemd_path(path: Path) -> str:
    """`path` as a unit file writes it: `%t/…` under $XDG_RUNTIME_DIR, `%h/…` under the home directory, and
    `%` doubled (specifiers would expand it)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    spelled = _under(path, Path(runtime) if runtime else None, "%t") or _under(path, Path.home(), "%h")
    return spelled if spelled is not None else str(path).replace("%", "%%")


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]
    must_succeed: bool = True  # stopping what may not run is allowed to fail
    starts: bool = False  # starts the service: a daemon started outside the manager must be stopped first


@dataclass
class Plan:
    """What an install or uninstall does: files to write (path → text) or remove, then commands to run."""

    manager: str
    write: dict[Path, str] = field(default_factory=dict)
    remove: list[Path] = field(default_factory=list)
    unchanged: list[Path] = field(default_factory=list)
    directories: list[Path] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Target:
    """The resolved paths of this installation and of the user's mcpx setup."""

    bin_dir: Path
    socket: Path
    state_dir: Path
    config: Path
    config_explicit: bool


def unit_dir() -> Path:
    return paths.config_home() / "systemd" / "user"


def plist_path() -> Path:
    return Path.home() / "Library" / "LaunchAgents" / f"{LABEL}.plist"


def service_files(manager: str) -> list[Path]:
    if manager == "launchd":
        return [plist_path()]
    return [unit_dir() / SOCKET_UNIT, unit_dir() / SERVICE_UNIT]


def written_by_mcpx(path: Path) -> bool:
    return has_marker(path, MARKER)


def default_manager() -> str:
    return "launchd" if sys.platform == "darwin" else "systemd"


def _environment() -> dict[str, str]:
    """mcpx's variables the daemon must get because this setup relies on them (a service manager does not pass
    the shell's environment on)."""
    names = ("MCPX_STATE_DIR", "MCPX_SOCKET")
    return {name: str(Path(os.environ[name]).expanduser()) for name in names if os.environ.get(name)}


def layout_for(target: Target, manager: str, *, sandbox: bool) -> Layout:
    config = str(target.config) if target.config_explicit else None
    env_file = paths.env_file(target.config)
    if manager == "launchd":
        return Layout(
            bin_dir=str(target.bin_dir),
            socket=str(target.socket),
            state_dir=str(target.state_dir),
            env_file=str(env_file),
            config=config,
            environment=_environment(),
        )
    environment = {name: systemd_path(Path(value)) for name, value in _environment().items()}
    environment.pop("MCPX_SOCKET", None)  # the socket unit decides where mcpxd listens
    return Layout(
        bin_dir=systemd_path(target.bin_dir),
        socket=systemd_path(target.socket),
        state_dir=systemd_path(target.state_dir),
        env_file=systemd_path(env_file),
        config=systemd_path(target.config) if config else None,
        environment=environment,
        sandbox=sandbox,
    )


class Refused(Exception):
    """The plan would overwrite or remove a file mcpx did not write (or cannot run at all)."""


def plan_install(target: Target, manager: str, *, force: bool, sandbox: bool) -> Plan:
    layout = layout_for(target, manager, sandbox=sandbox)
    if manager == "launchd":
        files = {plist_path(): launchd_plist(layout)}
    else:
        files = {unit_dir() / name: text for name, text in systemd_units(layout).items()}
    plan = Plan(manager)
    foreign = [path for path in files if path.exists() and not written_by_mcpx(path)]
    if foreign and not force:
        raise Refused(
            "not overwriting a file mcpxctl did not write: "
            + ", ".join(map(str, foreign))
            + " (move it aside, or use --force)"
        )
    for path, text in files.items():
        try:
            current = path.read_text(encoding="utf-8")
        except OSError:
            current = None
        if current == text and not force:
            plan.unchanged.append(path)
        else:
            plan.write[path] = text
    plan.directories = [target.state_dir]
    if not plan.write:
        plan.notes.append("already installed with these paths; nothing to do (use --force to reinstall)")
        return plan
    updating = any(path.exists() for path in files)
    uid = os.getuid()
    if manager == "launchd":
        if updating:
            plan.commands.append(Command(("launchctl", "bootout", f"gui/{uid}/{LABEL}"), must_succeed=False))
        plan.commands.append(Command(("launchctl", "bootstrap", f"gui/{uid}", str(plist_path())), starts=True))
    else:
        plan.commands.append(Command(("systemctl", "--user", "daemon-reload")))
        if updating:
            plan.commands.append(
                Command(("systemctl", "--user", "stop", SERVICE_UNIT, SOCKET_UNIT), must_succeed=False)
            )
        plan.commands.append(
            Command(("systemctl", "--user", "enable", "--now", SOCKET_UNIT, SERVICE_UNIT), starts=True)
        )
    return plan


def plan_uninstall(manager: str, *, force: bool) -> Plan:
    plan = Plan(manager)
    present = [path for path in service_files(manager) if path.exists() or path.is_symlink()]
    foreign = [path for path in present if not written_by_mcpx(path)]
    if foreign and not force:
        raise Refused("not removing a file mcpxctl did not write: " + ", ".join(map(str, foreign)) + " (use --force)")
    if not present:
        plan.notes.append("mcpx is not installed as a service; nothing to do")
        return plan
    plan.remove = present
    if manager == "launchd":
        plan.commands.append(Command(("launchctl", "bootout", f"gui/{os.getuid()}/{LABEL}"), must_succeed=False))
    else:
        stop = ("systemctl", "--user", "disable", "--now", SOCKET_UNIT, SERVICE_UNIT)
        plan.commands.append(Command(stop, must_succeed=False))
        plan.commands.append(Command(("systemctl", "--user", "daemon-reload"), must_succeed=False))
    return plan


# --- carrying a plan out -----------------------------------------------------------------------------------------


def _run(command: Command) -> None:
    """Run a service manager command, echoing it and its output. A failure of a command that must succeed ends
    the install (`Refused`); others are reported and ignored."""
    shown = " ".join(command.argv)
    print(f"running: {shown}")
    try:  # the callers have made sure the command is on PATH
        completed = subprocess.run(command.argv, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise Refused(f"`{shown}` did not finish within {_COMMAND_TIMEOUT:g} s") from None
    output = (completed.stdout + completed.stderr).strip()
    if completed.returncode != 0 and command.must_succeed:
        raise Refused(f"`{shown}` failed (exit {completed.returncode}): {output or 'no output'}")
    if completed.returncode != 0:
        output = f"(exit {completed.returncode}, ignored) {output}".rstrip()
    if output:
        print("  " + output.replace("\n", "\n  "))


def _stop_foreign_daemon(socket_path: Path, manager: str) -> None:
    """A daemon the service manager did not start (a shim starts one when none answers) would keep serving the
    socket path and hold its lock, so the service could not start: ask it to stop, and wait (bounded) until it
    has let go of its lock (held until its upstreams are shut down, after it has closed its socket).

    Its agents' shims reconnect once it has exited. Under systemd the socket unit is started first, so that they
    reach the service's socket (and wait there for the service's mcpxd) instead of starting another daemon that
    would take the lock from the service."""
    try:
        status = call(socket_path, "mcpx/status", timeout=5.0)
    except (DaemonNotRunning, ControlError, OSError):
        return
    pid = status.get("pid") if isinstance(status, dict) else None
    if not isinstance(pid, int):
        return
    if manager == "systemd":
        _run(Command(("systemctl", "--user", "start", SOCKET_UNIT), must_succeed=False))
    print(f"stopping the mcpxd running outside the service manager (pid {pid}); the service takes over")
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    lock = paths.socket_lock(socket_path)
    deadline = time.monotonic() + _STOP_TIMEOUT
    while time.monotonic() < deadline and not lock_is_free(lock):
        time.sleep(0.05)


def show(plan: Plan, *, dry_run: bool) -> None:
    for note in plan.notes:
        print(note)
    for path in plan.unchanged:
        print(f"unchanged: {path}")
    if not dry_run:
        return
    for path, text in plan.write.items():
        print(f"would write {path}:\n")
        print("    " + text.rstrip("\n").replace("\n", "\n    ") + "\n")
    for path in plan.remove:
        print(f"would remove {path}")
    for command in plan.commands:
        print(f"would run: {' '.join(command.argv)}")


def carry_out_install(plan: Plan, target: Target) -> None:
    missing = sorted({command.argv[0] for command in plan.commands if shutil.which(command.argv[0]) is None})
    if missing:
        raise Refused(f"{missing[0]} is not on PATH: there is no {plan.manager} user session to install into")
    for directory in plan.directories:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for path, text in plan.write.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, text, 0o644)
        print(f"wrote {path}")
    try:
        for command in plan.commands:
            if command.starts:
                _stop_foreign_daemon(target.socket, plan.manager)
            _run(command)
    except Refused as exc:
        raise Refused(
            f"{exc}\nthe files are written: once the cause is fixed, run `mcpxctl install --force` "
            "(or `mcpxctl uninstall`)"
        ) from None


def carry_out_uninstall(plan: Plan) -> None:
    """Stop and disable, remove the files, then let the manager forget them. Without the manager's command
    (its session is gone) the files are removed all the same."""
    runnable = [command for command in plan.commands if shutil.which(command.argv[0]) is not None]
    for command in plan.commands:
        if command not in runnable:
            print(f"skipped: {' '.join(command.argv)} ({command.argv[0]} is not on PATH)")
    for command in runnable[:1]:
        _run(command)
    for path in plan.remove:
        path.unlink(missing_ok=True)
        print(f"removed {path}")
    for command in runnable[1:]:
        _run(command)


def write_templates(root: Path) -> list[Path]:
    written = []
    for relative, text in template_files().items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for written_path in write_templates(Path(sys.argv[1] if len(sys.argv) > 1 else ".")):
        print(f"wrote {written_path}")
