"""Who is on the other end of a Unix socket: SO_PEERCRED on Linux, LOCAL_PEERCRED (getpeereid) on macOS/BSD."""

from __future__ import annotations

import contextlib
import socket
import struct
import sys
from dataclasses import dataclass

# A plain flag rather than an inline sys.platform test, so the type checker checks both branches on any OS.
_LINUX = sys.platform.startswith("linux")


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    uid: int
    pid: int | None


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """The connecting process's uid (and pid where the OS tells). Raises OSError when the OS cannot say."""
    if _LINUX:
        pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        return PeerCredentials(uid=uid, pid=pid)
    # struct xucred { u_int cr_version; uid_t cr_uid; short cr_ngroups; gid_t cr_groups[16]; }
    sol_local = 0
    local_peercred = getattr(socket, "LOCAL_PEERCRED", 1)
    raw = sock.getsockopt(sol_local, local_peercred, struct.calcsize("2Ih16I"))
    _version, uid, *_ = struct.unpack("2Ih16I", raw)
    peer_pid: int | None = None
    with contextlib.suppress(OSError):
        peer_pid = struct.unpack("i", sock.getsockopt(sol_local, getattr(socket, "LOCAL_PEERPID", 2), 4))[0]
    return PeerCredentials(uid=uid, pid=peer_pid)
