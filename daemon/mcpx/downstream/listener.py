"""Creating the daemon's socket safely: a 0700 directory we own, a 0600 socket, one daemon per socket.

A lock file beside the socket makes two daemons racing for the same path impossible; a socket file that no
daemon answers on is stale and replaced. Under systemd socket activation the socket unit owns the socket file:
the daemon serves the listening socket it was passed and leaves the file in place when it stops.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
from collections.abc import MutableMapping
from pathlib import Path

from mcpx import paths
from mcpx.control.client import daemon_answers
from mcpx.errors import McpxError


class StartupError(McpxError):
    """mcpxd cannot start (socket path unusable, or another daemon already serves it)."""


class AlreadyRunning(StartupError):
    pass


def ensure_private_dir(directory: Path) -> None:
    """Create `directory` (0700) or check that an existing one is ours and private."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise StartupError(f"{directory} is not a directory")
    if info.st_uid != os.geteuid():
        raise StartupError(f"{directory} belongs to uid {info.st_uid}, not to us: choose another path")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(directory, 0o700)


class SocketLock:
    """An exclusive `flock` on `<socket>.lock`, held for the daemon's lifetime."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.path = paths.socket_lock(socket_path)
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise AlreadyRunning(f"mcpxd is already running on {self.socket_path} (it holds {self.path})") from None
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def bind_socket(path: Path) -> socket.socket:
    """Bind and listen on `path` with mode 0600, replacing a stale socket file.

    Raises:
        AlreadyRunning: a live daemon answers on `path`.
        StartupError: the path is unusable (too long, not a socket, not ours).
    """
    if len(os.fsencode(path)) > paths.MAX_SOCKET_PATH:
        raise StartupError(f"socket path {path} is longer than {paths.MAX_SOCKET_PATH} bytes: choose a shorter one")
    ensure_private_dir(path.parent)
    with contextlib.suppress(FileNotFoundError):
        info = path.lstat()
        if not stat.S_ISSOCK(info.st_mode):
            raise StartupError(f"{path} exists and is not a socket: remove it or choose another path")
        if daemon_answers(path):
            raise AlreadyRunning(f"a daemon already answers on {path}")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot bind {path}: {exc.strerror}") from None
    finally:
        os.umask(previous_umask)
    os.chmod(path, 0o600)
    sock.listen(256)
    sock.setblocking(False)
    return sock


# sd_listen_fds(3): passed descriptors start at 3; the socket unit names ours with FileDescriptorName=mcpx.
_LISTEN_FDS_START = 3
LISTEN_FD_NAME = "mcpx"


def inherited_socket(env: MutableMapping[str, str] | None = None) -> socket.socket | None:
    """The listening socket a service manager passed us (systemd socket activation), or None.

    Honoured only when `LISTEN_PID` is our pid and `LISTEN_FDS` >= 1: the descriptor named `mcpx` in
    `LISTEN_FDNAMES`, else the only one passed. The `LISTEN_*` variables are removed from the environment
    either way, so that no child process believes they are meant for it.

    Raises:
        StartupError: descriptors were passed but none is a listening Unix stream socket we can use.
    """
    environ = os.environ if env is None else env
    pid, count, names = (environ.pop(name, "") for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"))
    if pid != str(os.getpid()):
        return None
    try:
        passed = int(count)
    except ValueError:
        raise StartupError(f"LISTEN_FDS={count!r} is not a number") from None
    if passed < 1:
        return None
    labels = names.split(":") if names else []
    if LISTEN_FD_NAME in labels:
        fd = _LISTEN_FDS_START + labels.index(LISTEN_FD_NAME)
    elif passed == 1:
        fd = _LISTEN_FDS_START
    else:
        raise StartupError(
            f"{passed} sockets were passed ({names or 'unnamed'}) and none is named {LISTEN_FD_NAME!r}: "
            f"set FileDescriptorName={LISTEN_FD_NAME} in the socket unit"
        )
    for other in range(_LISTEN_FDS_START, _LISTEN_FDS_START + passed):
        with contextlib.suppress(OSError):
            os.set_inheritable(other, False)
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise StartupError(f"the passed socket (fd {fd}) is unusable: {exc.strerror}") from None
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening:
        sock.detach()
        raise StartupError(f"the passed socket (fd {fd}) is not a listening Unix stream socket")
    sock.setblocking(False)
    return sock


def socket_file(sock: socket.socket) -> Path | None:
    """The path a Unix socket is bound to (None for an abstract or unnamed one)."""
    name = sock.getsockname()
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    return Path(name) if name and not name.startswith("\0") else None


def make_private(path: Path) -> None:
    """Mode 0600 for a socket file we own that is more open than that (a service manager may bind it 0666)."""
    with contextlib.suppress(OSError):
        info = path.lstat()
        if stat.S_ISSOCK(info.st_mode) and info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) & 0o077:
            os.chmod(path, 0o600)


def activated_socket(configured: Path) -> tuple[socket.socket | None, Path]:
    """The socket passed by socket activation (if any) and the path the daemon serves: the passed socket's own
    path wins over `configured`, since that is where the service manager listens.

    Raises:
        StartupError: see `inherited_socket`.
    """
    sock = inherited_socket()
    if sock is None:
        return None, configured
    path = socket_file(sock) or configured
    make_private(path)
    return sock, path
