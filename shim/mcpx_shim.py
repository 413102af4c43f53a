"""mcpx-shim: the stdio MCP server an agent launches; it bridges stdin/stdout to the mcpx daemon's socket.

Standard library only and nothing from the daemon package, so it starts in milliseconds: at start it imports
only built-in modules (`_socket`, `_thread`, `os`, `sys`; and `stat`, which `os` imports anyway). Bytes are
relayed unchanged in both directions, and the shim exits when either side closes. If no daemon answers, it
starts `mcpxd` in the background with the same config and socket, waits for it (bounded), and otherwise prints
one actionable line on stderr and exits non-zero. Its stdout carries MCP messages only.

When stdin and stdout are pipes or sockets (as agents spawn MCP servers), the shim hands them to the daemon
over the socket (SCM_RIGHTS) and leaves the data path: it only waits for the daemon to end the session.
Otherwise (a terminal, a file) or with `MCPX_SHIM_RELAY=1`, it relays the bytes itself.

Reconnect: in attach mode the shim keeps its own copies of the agent's pipes (fds 0 and 1 become /dev/null), and
the daemon tells it on the socket what a next daemon needs: the agent's initialize params (`MCPX-SESSION`), and
at a graceful stop the requests it read but did not start (`MCPX-HELD`). `MCPX-END` means the session is over
(exit). When the socket closes without it, mcpxd stopped or crashed: unless the agent is gone too, the shim
connects again (starting mcpxd if none answers) and hands the pipes over with `MCPX-RESUME`, so the agent goes on
without a new handshake. At most `_RECONNECTS` times in `_RECONNECT_WINDOW` seconds; a relay-mode session ends
with its daemon.

Socket resolution repeats `mcpx.paths` (a test keeps the two in step): `--socket`, else `[daemon] socket`
in the config, else `$MCPX_SOCKET`, else `$XDG_RUNTIME_DIR/mcpx/mcpx.sock`, else `/tmp/mcpx-<uid>/mcpx.sock`.
"""

import _socket
import _thread
import os
import stat  # (imported by os already: free)
import sys

_CHUNK = 1 << 16
_START_TIMEOUT = 10.0
_RESPAWN_DELAY = 0.5  # after an mcpxd exited 4 (another one holds the socket's lock) without the socket answering
_RECONNECTS = 5
_RECONNECT_WINDOW = 60.0
_MAX_LINE = 1 << 20
_MAX_CONFIG = 1 << 20  # as mcpx.paths.MAX_CONFIG_BYTES
_USAGE = "usage: mcpx-shim [--config FILE] [--socket PATH]"
# Must match mcpx.downstream.server (the shim imports nothing from the daemon package).
_ATTACH_HELLO = b"MCPX-ATTACH 1\n"
_RESUME_HELLO = b"MCPX-RESUME 1 "
_SESSION = b"MCPX-SESSION "
_HELD = b"MCPX-HELD "
_END = b"MCPX-END"


def _fail(message: str) -> int:
    _note(message)
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


def _read_config(path: str) -> bytes | None:
    """The config file's bytes, if it is a regular file of at most `_MAX_CONFIG` bytes (opened without blocking:
    a FIFO there must not hang the agent's start; mcpxd reports such a file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_CONFIG:
            return None
        return os.read(fd, _MAX_CONFIG + 1)
    except OSError:
        return None
    finally:
        os.close(fd)


def _socket_from_config(path: str) -> str | None:
    raw = _read_config(path)
    if raw is None:
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
    """Start mcpxd in its own session and wait until it answers. Returns (socket, why-not).

    An mcpxd that exits with status 4 found another one holding the socket's lock: one that is starting (it will
    answer) or one that is stopping (it lets its calls finish first), so after `_RESPAWN_DELAY` without an answer
    another is started."""
    import subprocess
    import time

    daemon = _find_daemon()
    if daemon is None:
        return None, "mcpxd is not running and was not found beside this Python or on PATH"
    command = [daemon, "--socket", path]
    if explicit_config:
        command += ["--config", explicit_config]

    def spawn() -> "subprocess.Popen[bytes]":
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
        )

    process = spawn()
    deadline = time.monotonic() + _START_TIMEOUT
    delay = 0.002
    respawn_at: float | None = None
    try:
        while time.monotonic() < deadline:
            sock = _connect(path)
            if sock is not None:
                return sock, ""
            code = process.poll()
            if code is not None and code != 4:
                assert process.stderr is not None
                lines = process.stderr.read().decode("utf-8", "replace").strip().splitlines()
                detail = " ".join(line.strip() for line in lines[:4]) or f"exit status {code}"
                return None, f"mcpxd could not start: {detail}"
            if code == 4:
                if respawn_at is None:
                    respawn_at = time.monotonic() + _RESPAWN_DELAY
                elif time.monotonic() >= respawn_at:
                    if process.stderr is not None:
                        process.stderr.close()
                    process = spawn()
                    respawn_at = None
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return None, f"mcpxd did not start listening on {path} within {_START_TIMEOUT:g} s"
    finally:
        if process.stderr is not None:
            process.stderr.close()


def _reach_daemon(path: str, explicit_config: str | None) -> "tuple[_socket.socket | None, str]":
    sock = _connect(path)
    if sock is not None:
        return sock, ""
    return _start_daemon(path, explicit_config)


def _attachable() -> bool:
    """True when stdin and stdout are pipes or sockets, which the daemon can drive itself."""
    if os.environ.get("MCPX_SHIM_RELAY"):
        return False
    for fd in (0, 1):
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            return False
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            return False
    return True


def _send_pipes(sock: "_socket.socket", hello: bytes, payload: bytes, pipes: "tuple[int, int]") -> bool:
    """Hand the agent's stdin and stdout to the daemon (SCM_RIGHTS) with `hello`, then `payload`."""
    fds = pipes[0].to_bytes(4, sys.byteorder, signed=True) + pipes[1].to_bytes(4, sys.byteorder, signed=True)
    try:
        sent = sock.sendmsg([hello], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
        if sent < len(hello):
            sock.sendall(hello[sent:])
        if payload:
            sock.sendall(payload)
    except OSError:
        return False
    return True


def _attach(sock: "_socket.socket", path: str, explicit_config: str | None) -> "int | None":
    """Hand stdin and stdout to the daemon and stay beside the agent until the session ends; None if the daemon
    could not take them (then the caller relays).

    From then on the agent and the daemon talk directly and the shim is out of the data path; it stays alive
    because the agent watches its process, and exits when the daemon ends the session. Its own copies of the pipes
    (close-on-exec, so no mcpxd it starts inherits them) are what lets a next daemon take the session over.
    """
    pipes = (os.dup(0), os.dup(1))
    if not _send_pipes(sock, _ATTACH_HELLO, b"", pipes):
        os.close(pipes[0])
        os.close(pipes[1])
        return None
    # fds 0 and 1 point at /dev/null from now on: only the daemon and the shim's copies hold the agent's pipes.
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    session = held = b""
    reconnects: list[float] = []
    while True:
        ended, session, more = _watch(sock, session)
        held += more
        sock.close()
        if ended or not _agent_alive(pipes):
            return 0
        import time

        now = time.monotonic()
        reconnects = [at for at in reconnects if now - at < _RECONNECT_WINDOW] + [now]
        if len(reconnects) > _RECONNECTS:
            return _fail(f"mcpxd went away {len(reconnects)} times within {_RECONNECT_WINDOW:g} s: giving up")
        _note("mcpxd went away: reconnecting this session")
        reached, why = _reach_daemon(path, explicit_config)
        if reached is None:
            return _fail(f"{why} (socket {path}); the session could not be resumed")
        sock = reached
        hello = _RESUME_HELLO + str(len(session)).encode() + b" " + str(len(held)).encode() + b"\n"
        if _send_pipes(sock, hello, session + held, pipes):
            held = b""  # the next daemon has them (on failure, the next _watch sees the socket closed)


def _watch(sock: "_socket.socket", session: bytes) -> "tuple[bool, bytes, bytes]":
    """Read the daemon's lines until the socket closes: (whether it said MCPX-END, the latest MCPX-SESSION params,
    the MCPX-HELD requests)."""
    buffer = bytearray()
    held = b""
    while True:
        try:
            data = sock.recv(_CHUNK)
        except InterruptedError:
            continue
        except OSError:
            data = b""
        if not data:
            return False, session, held  # an incomplete MCPX-HELD block is dropped with the buffer
        buffer += data
        while True:
            newline = buffer.find(b"\n")
            if newline < 0:
                if len(buffer) > _MAX_LINE and not buffer.startswith(_HELD):
                    del buffer[:]  # not a line of ours: drop it
                break
            line = bytes(buffer[:newline])
            if line.startswith(_HELD):
                size_text = line[len(_HELD) :]
                if not size_text.isdigit():
                    del buffer[: newline + 1]
                    continue
                size = int(size_text)
                if len(buffer) - newline - 1 < size:
                    break  # the rest of the block is still coming
                held += bytes(buffer[newline + 1 : newline + 1 + size])
                del buffer[: newline + 1 + size]
                continue
            del buffer[: newline + 1]
            if line == _END:
                return True, session, held
            if line.startswith(_SESSION):
                session = line[len(_SESSION) :]


def _agent_alive(pipes: "tuple[int, int]") -> bool:
    """False when the agent is gone: it closed its end of our stdout, or closed its input with nothing left in it."""
    import select

    poller = select.poll()
    poller.register(pipes[0], select.POLLIN)
    poller.register(pipes[1], 0)  # a pipe's write end reports POLLERR once its reader has closed it
    events = dict(poller.poll(0))
    if events.get(pipes[1], 0) & (select.POLLERR | select.POLLHUP):
        return False
    stdin = events.get(pipes[0], 0)
    return not (stdin & select.POLLHUP and not stdin & select.POLLIN)


def _note(message: str) -> None:
    os.write(2, f"mcpx-shim: {message}\n".encode("utf-8", "replace"))


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
    sock, why = _reach_daemon(path, explicit_config)
    if sock is None:
        return _fail(f"{why} (socket {path}; run `mcpxd` in a terminal to see more)")
    if _attachable():
        code = _attach(sock, path, explicit_config)
        if code is not None:
            return code
    _thread.start_new_thread(_pump_stdin, (sock,))
    _pump_socket(sock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
