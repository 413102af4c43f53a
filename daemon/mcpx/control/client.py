"""A minimal blocking JSON-RPC client for the daemon's socket (standard library only)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any


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


def lock_is_free(path: Path) -> bool:
    """True when no process holds the `flock` on `path` (a daemon's `<socket>.lock`, held until it has shut its
    upstreams down), or there is no such file. Probes by taking the lock and letting it go at once."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


class DaemonNotRunning(Exception):
    """Nothing answers on the socket."""


class ControlError(Exception):
    """The daemon answered with a JSON-RPC error."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(str(error.get("message", "error")))
        self.error = error


def call(socket_path: Path, method: str, params: dict[str, Any] | None = None, *, timeout: float = 60.0) -> Any:
    """Send one request to the daemon and return its result.

    Raises:
        DaemonNotRunning: no daemon listens on `socket_path`.
        ControlError: the daemon refused the request.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(socket_path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonNotRunning(str(socket_path)) from exc
        request = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}}
        sock.sendall(json.dumps(request).encode() + b"\n")
        buffer = b""
        while b"\n" not in buffer:
            chunk = sock.recv(65536)
            if not chunk:
                raise DaemonNotRunning(str(socket_path))
            buffer += chunk
        response = json.loads(buffer.split(b"\n", 1)[0])
    finally:
        sock.close()
    if "error" in response:
        raise ControlError(response["error"])
    return response.get("result")
