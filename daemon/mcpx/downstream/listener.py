"""Creating the daemon's socket safely: a 0700 directory we own, a 0600 socket, one daemon per socket.

A lock file beside the socket makes two daemons racing for the same path impossible; a socket file that no
daemon answers on is stale and replaced.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
from pathlib import Path

from mcpx.errors import McpxError

# sockaddr_un.sun_path is 108 bytes on Linux and 104 on macOS, including the terminating NUL.
_MAX_SOCKET_PATH = 103


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
        self.path = socket_path.with_name(socket_path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                socket_path = self.path.with_name(self.path.name.removesuffix(".lock"))
                raise AlreadyRunning(f"mcpxd is already running on {socket_path} (it holds {self.path})") from None
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def daemon_answers(path: Path) -> bool:
    """True when something accepts connections on the Unix socket at `path`."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:
        return False
    else:
        return True
    finally:
        probe.close()


def bind_socket(path: Path) -> socket.socket:
    """Bind and listen on `path` with mode 0600, replacing a stale socket file.

    Raises:
        AlreadyRunning: a live daemon answers on `path`.
        StartupError: the path is unusable (too long, not a socket, not ours).
    """
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise StartupError(f"socket path {path} is longer than {_MAX_SOCKET_PATH} bytes: choose a shorter one")
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
