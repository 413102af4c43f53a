"""`mcpxctl`: ask the running daemon for its status, to reload its config, to log in to an upstream or to forget
a login; install it as a user service; show its tools and its log; check a setup; import agents' MCP configs;
write a faster launcher for the shim.

Standard library only, so it starts fast; each command's module is imported when that command runs."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tomllib
from pathlib import Path
from typing import Any

from mcpx import __version__, paths
from mcpx.control.client import ControlError, DaemonNotRunning, call

LOGIN_TIMEOUT = 300.0  # the daemon's default wait for a browser login (auth/oauth/credential.py)


def _daemon_setting(config: Path, key: str) -> Path | None:
    """A path from the config's `[daemon]` table, read leniently: the daemon and `doctor` report config problems."""
    try:
        document = tomllib.loads(paths.read_config_file(config).decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    daemon = document.get("daemon")
    configured = daemon.get(key) if isinstance(daemon, dict) else None
    return Path(configured) if isinstance(configured, str) else None


def resolve_socket(args: argparse.Namespace) -> Path:
    if args.socket is not None:
        return Path(args.socket)
    return paths.socket_path(_daemon_setting(paths.config_path(args.config), "socket"))


def resolve_state_dir(args: argparse.Namespace) -> Path:
    return paths.state_dir(_daemon_setting(paths.config_path(args.config), "state_dir"))


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def render_status(status: dict[str, Any]) -> str:
    lines = [
        f"mcpxd {status['version']}  pid {status['pid']}  up {_duration(status['uptime_s'])}  "
        f"agents {status['agents']}",
        f"socket  {status['socket']}",
        f"config  {status['config']}",
        f"log     {status['log_file']}",
        "",
    ]
    upstreams = status["upstreams"]
    if not upstreams:
        lines.append("no upstreams configured")
        return "\n".join(lines)
    rows = [["UPSTREAM", "STATE", "TOOLS", "PROTOCOL", "AUTH", "URL", "LAST ERROR"]]
    rows += [
        [
            u["name"],
            u["state"],
            str(u["tools"]),
            u.get("protocol_version") or "-",
            u["auth"],
            u["url"],
            u["last_error"] or "-",
        ]
        for u in upstreams
    ]
    lines.append(_table(rows))
    for upstream in upstreams:
        oauth = upstream.get("oauth")
        if oauth:
            if oauth["logged_in"]:
                expiry = oauth.get("expires_in")
                when = f", token expires in {_duration(expiry)}" if isinstance(expiry, int) and expiry > 0 else ""
                lines.append(f"\n{upstream['name']}: logged in (OAuth, {oauth['storage'] or 'store'}{when})")
            else:
                lines.append(f"\n{upstream['name']}: not logged in: run `mcpxctl login {upstream['name']}`")
        if upstream["withheld_tools"]:
            withheld = ", ".join(upstream["withheld_tools"])
            lines.append(f"\n{upstream['name']}: withheld (name collision): {withheld}")
    # The OAuth upstreams share one token store: where it is, said once.
    notes = {note for u in upstreams if (note := (u.get("oauth") or {}).get("storage_note"))}
    lines += [f"\nOAuth tokens are kept in a private file, not the OS keyring: {note}" for note in sorted(notes)]
    return "\n".join(lines)


def _login(socket_path: Path, name: str, *, no_browser: bool, device: bool, timeout: float | None) -> int:
    params: dict[str, Any] = {"upstream": name, "action": "wait"}
    if timeout is not None:
        params["timeout"] = timeout
    if device:
        expires_in = _start_device_login(socket_path, name, timeout)
        timeout = expires_in if timeout is None else min(timeout, expires_in)
    else:
        started = call(socket_path, "mcpx/login", {"upstream": name, "action": "start"})
        url = started["url"]
        print(f"To log in to {name}, open this URL in a browser:\n\n  {url}\n", file=sys.stderr)
        if no_browser:
            if started.get("device_grant"):
                print(
                    f"(this server also offers `mcpxctl login {name} --device`: enter a code on any device instead "
                    "of pasting an address)",
                    file=sys.stderr,
                )
            print("Then paste the address the browser ended on (or the code) here:", file=sys.stderr)
            params.update(action="paste", response=sys.stdin.readline().strip())
        else:
            from mcpx.cli.opener import open_url  # webbrowser and friends: only a browser login pays for them

            if not open_url(url):
                print("(could not open a browser; open the URL yourself)", file=sys.stderr)
            print("Waiting for the browser…", file=sys.stderr)
    waited = LOGIN_TIMEOUT if timeout is None else timeout
    try:
        # The daemon ends the login after `waited` (and then reconnects the upstream): a margin for that.
        result = call(socket_path, "mcpx/login", params, timeout=waited + 30)
    except TimeoutError:
        print(f"mcpxctl: the login to {name} did not complete within {waited:g} s; run it again", file=sys.stderr)
        return 1
    print(f"logged in to {name}: {result['state']}, {result['tools']} tools")
    return 0


def _start_device_login(socket_path: Path, name: str, timeout: float | None) -> float:
    """The device authorization grant: the daemon gets a code; the user enters it at the server's address, on this
    or any other device (nothing is opened here: the browser is usually elsewhere). Returns the code's lifetime."""
    started = call(socket_path, "mcpx/login", {"upstream": name, "action": "device"})
    lines = [
        f"To log in to {name}, open this address on any device:",
        "",
        f"  {started['verification_uri']}",
        "",
        "and enter the code:",
        "",
        f"  {started['user_code']}",
        "",
    ]
    if started.get("verification_uri_complete"):
        lines += ["or open this address, which carries the code:", "", f"  {started['verification_uri_complete']}", ""]
    expires_in = float(started["expires_in"])
    if timeout is not None and timeout < expires_in:
        lines.append(
            f"Waiting for the approval for up to {_duration(timeout)} (--timeout; the code expires in "
            f"{_duration(expires_in)})…"
        )
    else:
        lines.append(f"Waiting for the approval (the code expires in {_duration(expires_in)})…")
    print("\n".join(lines), file=sys.stderr)
    return expires_in


def _service_target(args: argparse.Namespace) -> Any:
    from mcpx.cli import service

    return service.Target(
        bin_dir=Path(sys.executable).parent,
        socket=resolve_socket(args),
        state_dir=resolve_state_dir(args),
        config=paths.config_path(args.config).absolute(),
        config_explicit=paths.config_is_explicit(args.config),
    )


def _log_path(args: argparse.Namespace) -> Path:
    """The running daemon's log file (it knows best), else the one its config and environment point at."""
    try:
        status = call(resolve_socket(args), "mcpx/status", timeout=5.0)
    except (DaemonNotRunning, ControlError, OSError, ValueError):
        return resolve_state_dir(args) / paths.LOG_FILE_NAME
    return Path(status["log_file"])


def _doctor(args: argparse.Namespace) -> int:
    from mcpx.cli import doctor, service

    findings = doctor.Doctor(_service_target(args), args.manager or service.default_manager()).run()
    print(doctor.render(findings))
    return 1 if any(finding.level == doctor.FAIL for finding in findings) else 0


def _uninstall(args: argparse.Namespace) -> int:
    from mcpx.cli import service

    try:
        plan = service.plan_uninstall(args.manager or service.default_manager(), force=args.force)
        service.show(plan, dry_run=args.dry_run)
        if args.dry_run or not plan.remove:
            return 0
        service.carry_out_uninstall(plan)
    except service.Refused as exc:
        print(f"mcpxctl: {exc}", file=sys.stderr)
        return 1
    print("mcpx is no longer a user service (agents' shims start mcpxd themselves when needed)")
    return 0


def _install(args: argparse.Namespace) -> int:
    from mcpx.cli import service

    target = _service_target(args)
    manager = args.manager or service.default_manager()
    try:
        missing = [name for name in ("mcpxd", "mcpxctl") if not (target.bin_dir / name).is_file()]
        if missing:
            raise service.Refused(
                f"{missing[0]} is not beside this Python ({target.bin_dir}): run the mcpxctl of the installation "
                "that should become the service"
            )
        plan = service.plan_install(target, manager, force=args.force, sandbox=not args.no_sandbox)
        service.show(plan, dry_run=args.dry_run)
        if args.dry_run or not plan.write:
            return 0
        service.carry_out_install(plan, target)
    except service.Refused as exc:
        print(f"mcpxctl: {exc}", file=sys.stderr)
        return 1
    print(f"mcpx runs as a user service ({manager}); agents reach it on {target.socket}")
    if manager == "systemd":
        print(f"variables for bearer_env / ${{VAR}} credentials go in {paths.env_file(target.config)} (NAME=value)")
    else:
        print("a LaunchAgent does not see your shell's variables: prefer bearer_file credentials")
    return 0


def _install_shim(args: argparse.Namespace) -> int:
    from mcpx.cli import launcher

    try:
        planned = launcher.plan(args.to, force=args.force)
        if args.dry_run:
            print(launcher.describe_dry_run(planned))
            return 0
        launcher.write(planned)
    except launcher.Refused as exc:
        print(f"mcpxctl: {exc}", file=sys.stderr)
        return 1
    print(launcher.describe_written(planned))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mcpxctl", description="Control the running mcpx daemon.")
    parser.add_argument("--config", type=Path, help="config file (default: $MCPX_CONFIG, else XDG config)")
    parser.add_argument("--socket", type=Path, help="daemon socket (default: from the config / $MCPX_SOCKET)")
    parser.add_argument("--version", action="version", version=f"mcpxctl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser("status", help="show the daemon, its upstreams and agents")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    commands.add_parser("reload", help="re-read the config file; keeps the running config if it is invalid")
    login = commands.add_parser("login", help="log in to an OAuth upstream (once; the daemon keeps it fresh)")
    login.add_argument("name")
    login.add_argument(
        "--no-browser", action="store_true", help="print the URL and paste back where the browser landed (SSH)"
    )
    login.add_argument(
        "--device",
        action="store_true",
        help="log in on any device: print an address and a code to enter there (RFC 8628, where the server offers it)",
    )
    login.add_argument(
        "--timeout",
        type=float,
        help="seconds to wait for the browser (default 300) or, with --device, the approval (default: until the "
        "code expires)",
    )
    logout = commands.add_parser("logout", help="forget what is stored for an upstream")
    logout.add_argument("name")
    tools = commands.add_parser("tools", help="the tools agents see, per upstream")
    tools.add_argument("--json", action="store_true", help="machine-readable output (each tool as agents see it)")
    logs = commands.add_parser("logs", help="print the daemon's log (<state_dir>/mcpxd.log)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing lines as they are written")
    logs.add_argument("-n", "--lines", type=int, default=50, metavar="N", help="print the last N lines (default 50)")
    logs.add_argument("--json", action="store_true", help="print the JSON lines as they are")
    doctor = commands.add_parser("doctor", help="check the whole setup; prints the fix for each problem")
    doctor.add_argument("--manager", choices=["systemd", "launchd"], help="default: launchd on macOS, else systemd")
    importing = commands.add_parser(
        "import", help="turn the remote MCP servers in agents' configs into mcpx upstreams (prints TOML)"
    )
    importing.add_argument(
        "--from",
        dest="source",
        metavar="CLIENT|FILE",
        help="claude-desktop, claude-code, cursor, vscode, codex, or a config file (default: every client found)",
    )
    importing.add_argument("--write", action="store_true", help="append to the config file (validated first)")
    for name, what in (("install", "run mcpxd as a user service"), ("uninstall", "remove the user service")):
        command = commands.add_parser(name, help=f"{what} (systemd user units, or a LaunchAgent on macOS)")
        command.add_argument("--dry-run", action="store_true", help="print what would be written and run")
        command.add_argument("--force", action="store_true", help="also overwrite/remove files mcpxctl did not write")
        command.add_argument(
            "--manager", choices=["systemd", "launchd"], help="default: launchd on macOS, else systemd"
        )
        if name == "install":
            command.add_argument("--no-sandbox", action="store_true", help="systemd: leave out the sandbox settings")
    install_shim = commands.add_parser(
        "install-shim", help="write a launcher that starts mcpx-shim faster than pip's script (Python -I -S)"
    )
    install_shim.add_argument(
        "--to",
        type=Path,
        metavar="PATH",
        help="where to write it (default: $XDG_BIN_HOME/mcpx-shim, else ~/.local/bin/mcpx-shim)",
    )
    install_shim.add_argument("--force", action="store_true", help="also overwrite a file mcpxctl did not write")
    install_shim.add_argument("--dry-run", action="store_true", help="print the launcher and where it would go")
    args = parser.parse_args(argv)
    if args.command == "install":
        return _install(args)
    if args.command == "uninstall":
        return _uninstall(args)
    if args.command == "install-shim":
        return _install_shim(args)
    if args.command == "doctor":
        return _doctor(args)
    if args.command == "import":
        from mcpx.cli import importer

        return importer.run(args.source, paths.config_path(args.config), write_it=args.write)
    if args.command == "logs":
        from mcpx.cli import logs as log_file

        return log_file.show(_log_path(args), count=args.lines, follow_on=args.follow, raw=args.json)

    socket_path = resolve_socket(args)
    try:
        if args.command == "status":
            result = call(socket_path, "mcpx/status")
            print(json.dumps(result, indent=2) if args.json else render_status(result))
        elif args.command == "reload":
            result = call(socket_path, "mcpx/reload")
            changes = [f"{kind}: {', '.join(names)}" for kind, names in result.items() if kind != "notes" and names]
            print("reloaded" + (f" ({'; '.join(changes)})" if changes else " (no upstream changed)"))
            for note in result.get("notes", []):
                print(f"note: {note}")
        elif args.command == "login":
            return _login(socket_path, args.name, no_browser=args.no_browser, device=args.device, timeout=args.timeout)
        elif args.command == "tools":
            from mcpx.cli import tools as catalog

            result = catalog.catalog(socket_path)
            width = shutil.get_terminal_size((120, 24)).columns
            print(json.dumps(result, indent=2) if args.json else catalog.render(result, width))
        elif args.command == "logout":
            result = call(socket_path, "mcpx/logout", {"upstream": args.name})
            print(result["message"])
    except DaemonNotRunning:
        print(f"mcpxctl: mcpxd is not running (nothing answers on {socket_path})", file=sys.stderr)
        return 1
    except ControlError as exc:
        print(f"mcpxctl: {exc}", file=sys.stderr)
        for problem in exc.error.get("data", {}).get("problems", []):
            print(f"  {problem}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"mcpxctl: cannot talk to mcpxd on {socket_path}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
