"""The asyncio layer of the agent socket: accepting connections, and one connection object per agent.

Every accepted connection's peer uid is checked before a single byte is read; a connection from another user is
closed at once. The first read decides the mode:
- **attach**: the shim sent `MCPX-ATTACH 1` with the agent's stdin and stdout pipes (SCM_RIGHTS). The daemon
  then reads and writes those pipes itself and the shim leaves the data path; its socket stays open only as a
  lifeline (closed when the session ends, so the shim exits; if the shim dies, the session ends).
- **relay**: anything else is newline-delimited JSON-RPC on the socket itself (the shim's byte relay, mcpxctl).
Writes the agent does not read pause reading from it (backpressure), and a connection whose unread output passes
a hard bound is dropped rather than letting memory grow without limit.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import fcntl
import os
import socket
import stat
from collections.abc import Callable, Coroutine
from typing import Any, cast

from mcpx.downstream.peercred import PeerCredentials, peer_credentials
from mcpx.downstream.session import AgentSession, Control
from mcpx.framing.ndjson import LineFramer, Oversized
from mcpx.log import get_logger
from mcpx.router.router import Router

_log = get_logger("mcpx.agent")

ATTACH_HELLO = b"MCPX-ATTACH 1\n"
_FD_SIZE = array.array("i").itemsize
# accept(2) failing for want of descriptors or memory: the pending connection stays queued, so accept again after
# a pause (asyncio's own servers wait as long, `asyncio.constants.ACCEPT_RETRY_DELAY`) rather than spin or stop.
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_RETRY_DELAY = 1.0


class AgentConnection(asyncio.Protocol):
    """One agent: reads lines from its input transport, writes to its output transport (the same socket in relay
    mode, two pipes in attach mode)."""

    def __init__(
        self,
        router: Router,
        control: Control,
        connections: set[AgentConnection],
        max_message_bytes: int,
        *,
        peer: PeerCredentials,
        lifeline: socket.socket | None = None,
    ) -> None:
        self._connections = connections
        self._framer = LineFramer(max_message_bytes)
        self._max_buffered = 4 * max_message_bytes
        self._input: asyncio.ReadTransport | None = None
        self._output: asyncio.WriteTransport | None = None
        self._lifeline = lifeline
        self.session = AgentSession(router, control, self._write, peer)
        connections.add(self)

    # --- transports ----------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._input = cast(asyncio.ReadTransport, transport)
        if self._output is None:  # relay mode: the socket carries both directions
            self._output = cast(asyncio.WriteTransport, transport)

    def attach_output(self, transport: asyncio.WriteTransport) -> None:
        self._output = transport

    def data_received(self, data: bytes) -> None:
        session = self.session
        for item in self._framer.feed(data):
            try:
                if isinstance(item, Oversized):
                    session.on_oversized(item.limit)
                else:
                    session.on_line(item)
            except Exception:  # noqa: BLE001 - callback top: one bad message must not end the session
                _log.exception("failed to handle an agent message")

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def close(self) -> None:
        """End the session and release everything it holds (idempotent)."""
        if self not in self._connections:
            return
        self._connections.discard(self)
        self.session.close()
        for transport in (self._input, self._output):
            if transport is not None and not transport.is_closing():
                transport.close()
        if self._lifeline is not None:
            with contextlib.suppress(OSError):
                asyncio.get_running_loop().remove_reader(self._lifeline.fileno())
            self._lifeline.close()
            self._lifeline = None

    # --- backpressure --------------------------------------------------------------------------------------------

    def pause_writing(self) -> None:
        if self._input is not None:
            self._input.pause_reading()

    def resume_writing(self) -> None:
        if self._input is not None and not self._input.is_closing():
            self._input.resume_reading()

    def _write(self, data: bytes) -> None:
        output = self._output
        if output is None or output.is_closing():
            return
        output.writelines((data, b"\n"))
        if output.get_write_buffer_size() > self._max_buffered:
            _log.warning("agent does not read its responses: closing the connection")
            self.close()


class _OutputSide(asyncio.BaseProtocol):
    """Protocol of the write pipe in attach mode: forwards flow control and loss to the connection."""

    def __init__(self, connection: AgentConnection) -> None:
        self._connection = connection

    def pause_writing(self) -> None:
        self._connection.pause_writing()

    def resume_writing(self) -> None:
        self._connection.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._connection.close()


ConnectionFactory = Callable[[PeerCredentials, "socket.socket | None"], AgentConnection]


class AgentListener:
    """Accepts agent connections on the daemon's socket and sets each up in attach or relay mode."""

    def __init__(self, sock: socket.socket, make_connection: ConnectionFactory) -> None:
        self._sock = sock
        self._make_connection = make_connection
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        """Accept until cancelled. A connection aborted before it was accepted is skipped; running out of
        descriptors or memory pauses accepting for `ACCEPT_RETRY_DELAY` (one warning per spell). Any other error
        ends the loop, and the daemon with it (see `Daemon.run`)."""
        loop = asyncio.get_running_loop()
        starved_since: float | None = None
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except (ConnectionAbortedError, InterruptedError):
                continue
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    raise
                if starved_since is None:
                    _log.warning(
                        "cannot accept agent connections: out of resources; retrying",
                        error=exc.strerror,
                        retry_in_s=ACCEPT_RETRY_DELAY,
                    )
                    starved_since = loop.time()
                await asyncio.sleep(ACCEPT_RETRY_DELAY)
                continue
            if starved_since is not None:  # the end of the incident, with its length (a warning too: not routine)
                _log.warning("accepting agent connections again", after_s=round(loop.time() - starved_since, 3))
                starved_since = None
            self._accepted(conn)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._sock.close()

    def _accepted(self, conn: socket.socket) -> None:
        try:
            peer = peer_credentials(conn)
        except OSError:
            peer = None
        if peer is None or peer.uid != os.geteuid():
            _log.warning("refused a connection from another user", uid=peer.uid if peer else None)
            conn.close()
            return
        conn.setblocking(False)
        asyncio.get_running_loop().add_reader(conn.fileno(), self._first_read, conn, peer)

    def _first_read(self, conn: socket.socket, peer: PeerCredentials) -> None:
        loop = asyncio.get_running_loop()
        try:
            data, ancillary, _flags, _ = conn.recvmsg(1 << 16, socket.CMSG_SPACE(2 * _FD_SIZE))
        except BlockingIOError:
            return
        except OSError:
            loop.remove_reader(conn.fileno())
            conn.close()
            return
        loop.remove_reader(conn.fileno())
        fds = _received_fds(ancillary)
        if fds:
            if data == ATTACH_HELLO and len(fds) == 2 and all(_is_stream(fd) for fd in fds):
                self._spawn(self._attach(conn, peer, fds[0], fds[1]))
            else:
                _log.warning("refused an attach request with unexpected descriptors", count=len(fds))
                for fd in fds:
                    os.close(fd)
                conn.close()
        elif not data:
            conn.close()
        else:
            self._spawn(self._relay(conn, peer, data))

    async def _relay(self, conn: socket.socket, peer: PeerCredentials, first: bytes) -> None:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.connect_accepted_socket(lambda: self._make_connection(peer, None), conn)
        protocol.data_received(first)

    async def _attach(self, conn: socket.socket, peer: PeerCredentials, stdin_fd: int, stdout_fd: int) -> None:
        loop = asyncio.get_running_loop()
        connection = self._make_connection(peer, conn)
        _enlarge_pipe(stdout_fd)
        stdin = os.fdopen(stdin_fd, "rb", buffering=0)
        stdout = os.fdopen(stdout_fd, "wb", buffering=0)
        try:
            output, _ = await loop.connect_write_pipe(lambda: _OutputSide(connection), stdout)
            connection.attach_output(output)
            await loop.connect_read_pipe(lambda: connection, stdin)
        except OSError as exc:
            _log.warning("could not attach the agent's pipes", error=str(exc))
            connection.close()
            stdin.close()
            stdout.close()
            return
        # The shim's socket is now only a lifeline: when it closes, the agent is gone.
        loop.add_reader(conn.fileno(), self._lifeline_readable, conn, connection)

    @staticmethod
    def _lifeline_readable(conn: socket.socket, connection: AgentConnection) -> None:
        try:
            data = conn.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            connection.close()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % _FD_SIZE
            fds.extend(array.array("i", data[:usable]))
    return fds


def _is_stream(fd: int) -> bool:
    """Only pipes and sockets can be driven by the event loop (ttys and files stay with the relay)."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


# Large results cross the agent's stdout pipe in fewer wake-ups with a 1 MiB buffer than with the default 64 KiB
# (Linux; 1 MiB is the default unprivileged maximum, /proc/sys/fs/pipe-max-size).
_PIPE_BYTES = 1024 * 1024


def _enlarge_pipe(fd: int) -> None:
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    if set_size is None or not stat.S_ISFIFO(os.fstat(fd).st_mode):
        return
    with contextlib.suppress(OSError):  # over the user's pipe quota: keep the default size
        fcntl.fcntl(fd, set_size, _PIPE_BYTES)
