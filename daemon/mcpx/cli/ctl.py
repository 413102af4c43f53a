"""`mcpxctl`: ask the running daemon for its status, to reload its config, to log in to an upstream or to forget
a login."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

from mcpx import __version__, paths
from mcpx.cli.opener import open_url
from mcpx.control.client import ControlError, DaemonNotRunning, call


def _socket_from_config(config: Path) -> Path | None:
    try:
        document = tomllib.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None  # the daemon reports config problems; here only the socket path matters
    daemon = document.get("daemon")
    configured = daemon.get("socket") if isinstance(daemon, dict) else None
    return Path(configured) if isinstance(configured, str) else None


def resolve_socket(args: argparse.Namespace) -> Path:
    if args.socket is not None:
        return Path(args.socket)
    return paths.socket_path(_socket_from_config(paths.config_path(args.config)))


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
    rows = [["UPSTREAM", "STATE", "TOOLS", "AUTH", "URL", "LAST ERROR"]]
    rows += [[u["name"], u["state"], str(u["tools"]), u["auth"], u["url"], u["last_error"] or "-"] for u in upstreams]
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
    return "\n".join(lines)


def _login(socket_path: Path, name: str, *, no_browser: bool, timeout: float) -> int:
    started = call(socket_path, "mcpx/login", {"upstream": name, "action": "start"})
    url = started["url"]
    print(f"To log in to {name}, open this URL in a browser:\n\n  {url}\n", file=sys.stderr)
    if no_browser:
        print("Then paste the address the browser ended on (or the code) here:", file=sys.stderr)
        pasted = sys.stdin.readline().strip()
        params = {"upstream": name, "action": "paste", "response": pasted}
    else:
        if not open_url(url):
            print("(could not open a browser; open the URL yourself)", file=sys.stderr)
        print("Waiting for the browser…", file=sys.stderr)
        params = {"upstream": name, "action": "wait"}
    result = call(socket_path, "mcpx/login", params, timeout=timeout + 30)
    print(f"logged in to {name}: {result['state']}, {result['tools']} tools")
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
    login.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the browser (default 300)")
    logout = commands.add_parser("logout", help="forget what is stored for an upstream")
    logout.add_argument("name")
    args = parser.parse_args(argv)

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
            return _login(socket_path, args.name, no_browser=args.no_browser, timeout=args.timeout)
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
