"""mcpx-shim: the stdio MCP server an agent launches; it bridges stdin/stdout to the mcpx daemon's socket.

Standard library only and nothing from the daemon package, so it starts in milliseconds: at start it imports
only built-in modules (`_socket`, `_thread`, `os`, `sys`). Bytes are relayed unchanged in both directions,
and the shim exits when either side closes. If no daemon answers, it starts `mcpxd` in the background with
the same config and socket, waits for it (bounded), and otherwise prints one actionable line on stderr and
exits non-zero. Its stdout carries MCP messages only.

When stdin and stdout are pipes or sockets (as agents spawn MCP servers), the shim hands them to the daemon
over the socket (SCM_RIGHTS) and leaves the data path: it only waits for the daemon to end the session.
Otherwise (a terminal, a file) or with `MCPX_SHIM_RELAY=1`, it relays the bytes itself.

Socket resolution repeats `mcpx.paths` (a test keeps the two in step): `--socket`, else `[daemon] socket`
in the config, else `$MCPX_SOCKET`, else `$XDG_RUNTIME_DIR/mcpx/mcpx.sock`, else `/tmp/mcpx-<uid>/mcpx.sock`.
"""

import _socket
import _thread
import os
import sys

_CHUNK = 1 << 16
_START_TIMEOUT = 10.0
_USAGE = "usage: mcpx-shim [--config FILE] [--socket PATH]"
# Must match mcpx.downstream.server.ATTACH_HELLO (the shim imports nothing from the daemon package).
_ATTACH_HELLO = b"MCPX-ATTACH 1\n"


def _fail(message: str) -> int:
    os.write(2, f"mcpx-shim: {message}\n".encode("utf-8", "replace"))
    return 1


def _home() -> str:
    return os.environ.get("HOME") or os.path.expanduser("~")


def config_path(explicit: str | None) -> str:
    if explicit:
        return os.path.expanduser(explicit)
    if os.environ.get("MCPX_CONFIG"):
        return os.path.expanduser(os.environ["MCPX_CONFIG"])
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(_home(), ".config")
    return os.path.join(base, "mcpx", "config.toml")


def _socket_from_config(path: str) -> str | None:
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except OSError:
        return None
    if b"socket" not in raw:  # skip the TOML parser (and its import) in the common case
        return None
    import tomllib

    try:
        daemon = tomllib.loads(raw.decode("utf-8")).get("daemon")
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None  # mcpxd reports config errors; here only the socket path matters
    configured = daemon.get("socket") if isinstance(daemon, dict) else None
    return configured if isinstance(configured, str) else None


def socket_path(explicit_socket: str | None, explicit_config: str | None) -> str:
    if explicit_socket:
        return os.path.expanduser(explicit_socket)
    configured = _socket_from_config(config_path(explicit_config))
    if configured:
        return os.path.expanduser(configured)
    if os.environ.get("MCPX_SOCKET"):
        return os.path.expanduser(os.environ["MCPX_SOCKET"])
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "mcpx", "mcpx.sock")
    return f"/tmp/mcpx-{os.getuid()}/mcpx.sock"


def _connect(path: str) -> "_socket.socket | None":
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    return sock


def _find_daemon() -> str | None:
    beside = os.path.join(os.path.dirname(sys.executable), "mcpxd")
    if os.access(beside, os.X_OK):
        return beside
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = os.path.join(directory, "mcpxd")
        if directory and os.access(candidate, os.X_OK):
            return candidate
    return None


def _start_daemon(path: str, explicit_config: str | None) -> "tuple[_socket.socket | None, str]":
    """Start mcpxd in its own session and wait until it answers. Returns (socket, why-not)."""
    import subprocess
    import time

    daemon = _find_daemon()
    if daemon is None:
        return None, "mcpxd is not running and was not found beside this Python or on PATH"
    command = [daemon, "--socket", path]
    if explicit_config:
        command += ["--config", explicit_config]
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        close_fds=True,
    )
    deadline = time.monotonic() + _START_TIMEOUT
    delay = 0.002
    try:
        while time.monotonic() < deadline:
            sock = _connect(path)
            if sock is not None:
                return sock, ""
            code = process.poll()
            if code is not None and code != 4:  # 4: another mcpxd won the race to start; wait for it
                assert process.stderr is not None
                lines = process.stderr.read().decode("utf-8", "replace").strip().splitlines()
                detail = " ".join(line.strip() for line in lines[:4]) or f"exit status {code}"
                return None, f"mcpxd could not start: {detail}"
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return None, f"mcpxd did not start listening on {path} within {_START_TIMEOUT:g} s"
    finally:
        if process.stderr is not None:
            process.stderr.close()


def _attachable() -> bool:
    """True when stdin and stdout are pipes or sockets, which the daemon can drive itself."""
    if os.environ.get("MCPX_SHIM_RELAY"):
        return False
    for fd in (0, 1):
        try:
            kind = os.fstat(fd).st_mode & 0o170000
        except OSError:
            return False
        if kind not in (0o010000, 0o140000):  # S_IFIFO, S_IFSOCK
            return False
    return True


def _attach(sock: "_socket.socket") -> bool:
    """Hand stdin and stdout to the daemon (SCM_RIGHTS) and wait until it closes our socket.

    From then on the agent and the daemon talk directly and the shim is out of the data path; it stays alive
    because the agent watches its process, and exits when the daemon ends the session.
    """
    fds = (0).to_bytes(4, sys.byteorder, signed=True) + (1).to_bytes(4, sys.byteorder, signed=True)
    try:
        sock.sendmsg([_ATTACH_HELLO], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
    except OSError:
        return False
    # Keep no copy of the agent's pipes: the agent must see EOF as soon as the daemon closes them.
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    while True:
        try:
            if not sock.recv(64):
                return True
        except InterruptedError:
            continue
        except OSError:
            return True


def _pump_stdin(sock: "_socket.socket") -> None:
    try:
        while True:
            data = os.read(0, _CHUNK)
            if not data:
                break
            sock.sendall(data)
    except OSError:
        pass
    try:
        sock.shutdown(_socket.SHUT_WR)
    except OSError:
        pass


def _pump_socket(sock: "_socket.socket") -> None:
    while True:
        try:
            data = sock.recv(_CHUNK)
        except OSError:
            return
        if not data:
            return
        view = memoryview(data)
        while view:
            try:
                written = os.write(1, view)
            except OSError:
                return  # the agent went away
            view = view[written:]


def _parse_args(argv: "list[str]") -> "tuple[str | None, str | None] | None":
    config = socket = None
    index = 0
    while index < len(argv):
        flag = argv[index]
        if flag in ("--config", "--socket") and index + 1 < len(argv):
            if flag == "--config":
                config = argv[index + 1]
            else:
                socket = argv[index + 1]
            index += 2
        elif flag.startswith("--config="):
            config = flag.partition("=")[2]
            index += 1
        elif flag.startswith("--socket="):
            socket = flag.partition("=")[2]
            index += 1
        else:
            return None
    return config, socket


def main(argv: "list[str] | None" = None) -> int:
    parsed = _parse_args(sys.argv[1:] if argv is None else argv)
    if parsed is None:
        return _fail(_USAGE)
    explicit_config, explicit_socket = parsed
    path = socket_path(explicit_socket, explicit_config)
    sock = _connect(path)
    if sock is None:
        sock, why = _start_daemon(path, explicit_config)
        if sock is None:
            return _fail(f"{why} (socket {path}; run `mcpxd` in a terminal to see more)")
    if _attachable() and _attach(sock):
        return 0
    _thread.start_new_thread(_pump_stdin, (sock,))
    _pump_socket(sock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
