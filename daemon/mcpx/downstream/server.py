"""The asyncio layer of the agent socket: accepting connections, and one connection object per agent.

Every accepted connection's peer uid is checked before a single byte is read; a connection from another user is
closed at once. The first read decides the mode:
- **attach**: the shim sent `MCPX-ATTACH 1` with the agent's stdin and stdout pipes (SCM_RIGHTS). The daemon
  then reads and writes those pipes itself and the shim leaves the data path; its socket stays open as a
  lifeline (if the shim dies, the session ends).
- **resume**: the same with `MCPX-RESUME 1`, from a shim whose daemon stopped or crashed: the agent's session
  goes on here without a new handshake (see below).
- **relay**: anything else is newline-delimited JSON-RPC on the socket itself (the shim's byte relay, mcpxctl).
Writes the agent does not read pause reading from it (backpressure), and a connection whose unread output passes
a hard bound is dropped rather than letting memory grow without limit.

The lifeline, daemon → shim, carries lines the shim keeps for the next daemon:
- `MCPX-SESSION <json>`: the params of the agent's `initialize`, sent when it arrives;
- `MCPX-HELD <n>` and n bytes: at a graceful stop, the requests read but not started (newline-terminated lines);
- `MCPX-END`: the session is over (the agent closed its input, stopped reading, or went away): the shim exits.
When the lifeline closes without `MCPX-END`, the daemon has stopped or crashed and the shim reconnects with
`MCPX-RESUME 1 <session bytes> <held bytes>`, followed by those bytes. The new daemon repeats the agent's
`initialize` under an id of its own (its answer is dropped), runs the held requests, then reads the pipes.

At a graceful stop (`AgentConnection.stop`) an attach-mode connection keeps reading: answers and notifications
(a cancellation, an answer to an elicitation) reach the session, new requests are held for the next daemon. Once
the calls in flight are done (or cut short), it stops reading at a message boundary, so what the agent writes from
then on waits in the pipe; it flushes the responses, hands the held requests to the shim and closes its copies of
the pipes. A relay-mode connection stops reading at once and is closed after its calls.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import fcntl
import functools
import os
import socket
import stat
from collections.abc import Callable, Coroutine
from typing import Any, cast

from mcpx import jsonrpc
from mcpx.downstream.peercred import PeerCredentials, peer_credentials
from mcpx.downstream.session import AgentSession, Control
from mcpx.errors import McpxError
from mcpx.framing.ndjson import LineFramer, Oversized
from mcpx.log import get_logger
from mcpx.router.router import Router

_log = get_logger("mcpx.agent")

# What the shim sends first, with the agent's stdin and stdout (mcpx_shim.py has copies of these constants).
ATTACH_HELLO = b"MCPX-ATTACH 1\n"
RESUME_HELLO = b"MCPX-RESUME 1 "  # then "<session bytes> <held bytes>\n" and those bytes
# What the daemon tells the shim on the lifeline.
LIFELINE_SESSION = b"MCPX-SESSION "
LIFELINE_HELD = b"MCPX-HELD "
LIFELINE_END = b"MCPX-END\n"
# The initialize params are small; larger ones are not kept for a resume (the session still works).
MAX_SESSION_BYTES = 64 * 1024
_MAX_RESUME_HEADER = 128
RESUME_TIMEOUT = 10.0  # to receive a resume request's bytes
STOP_BOUNDARY_TIMEOUT = 2.0  # for a message the agent is half-way through writing when its calls are done
STOP_FLUSH_TIMEOUT = 2.0  # for the agent to read the last responses
_LIFELINE_SEND_TIMEOUT = 5.0

_FD_SIZE = array.array("i").itemsize
_CMSG_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0)  # Linux
# accept(2) failing for want of descriptors or memory: the pending connection stays queued, so accept again after
# a pause (asyncio's own servers wait as long, `asyncio.constants.ACCEPT_RETRY_DELAY`) rather than spin or stop.
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_RETRY_DELAY = 1.0

_LIST_CHANGED_KINDS = ("tools", "prompts", "resources")


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
        self._overflowed = False  # more unread output than allowed: closing, nothing more is written
        self._max_held = max_message_bytes
        self._input: asyncio.ReadTransport | None = None
        self._output: asyncio.WriteTransport | None = None
        self._lifeline = lifeline
        # Attach mode: the agent's initialize is passed to the shim (for a resume) when it arrives.
        self._watch_initialize = lifeline is not None
        # A resumed session: the id of the repeated initialize, whose answer is dropped.
        self._resume_id: str | None = None
        self._resume_marker = b""
        # Stopping: requests read meanwhile (id, line), kept for the next daemon; set once reading has stopped.
        self._stopping = False
        self._drained = False
        self._held: list[tuple[object, bytes]] | None = None
        self._held_bytes = 0
        self._reading_stopped: asyncio.Event | None = None
        self._flushed: asyncio.Event | None = None
        self.session = AgentSession(router, control, self._write, peer)
        self._busy_poll = router.busy_poll
        connections.add(self)

    @property
    def attached(self) -> bool:
        """Attach mode: the daemon holds the agent's pipes, and a shim waits on the lifeline."""
        return self._lifeline is not None

    # --- transports ----------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._input = cast(asyncio.ReadTransport, transport)
        if self._output is None:  # relay mode: the socket carries both directions
            self._output = cast(asyncio.WriteTransport, transport)

    def attach_output(self, transport: asyncio.WriteTransport) -> None:
        self._output = transport

    def data_received(self, data: bytes) -> None:
        self._busy_poll.received()
        session = self.session
        for item in self._framer.feed(data):
            if self._overflowed:
                break  # closing: the rest of the batch has no one to answer
            try:
                if isinstance(item, Oversized):
                    session.on_oversized(item.limit)
                    continue
                if self._watch_initialize and b'"initialize"' in item:
                    self._remember_initialize(item)
                if self._held is not None and self._hold(item):
                    continue
                session.on_line(item)
            except Exception:  # noqa: BLE001 - callback top: one bad message must not end the session
                _log.exception("failed to handle an agent message")
        if self._stopping:
            self._maybe_stop_reading()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def close(self, *, end: bool = True, abort: bool = False) -> None:
        """End the session and release everything it holds (idempotent). The shim is told the session is over,
        unless `end` is false (the daemon stops before the agent was served: the shim reconnects). `abort` drops
        what is still unwritten (an agent that does not read would keep a closing transport open for good)."""
        if self not in self._connections:
            return
        self._connections.discard(self)
        self.session.close()
        self._close_transports(abort=abort)
        lifeline = self._take_lifeline()
        if lifeline is not None:
            if end:
                with contextlib.suppress(OSError):
                    lifeline.send(LIFELINE_END)
            lifeline.close()

    def _close_transports(self, *, abort: bool = False) -> None:
        if abort and self._output is not None:
            self._output.abort()
        for transport in (self._input, self._output):
            if transport is not None and not transport.is_closing():
                transport.close()

    def _take_lifeline(self) -> socket.socket | None:
        lifeline, self._lifeline = self._lifeline, None
        if lifeline is not None:
            with contextlib.suppress(OSError, ValueError):
                asyncio.get_running_loop().remove_reader(lifeline.fileno())
        return lifeline

    # --- backpressure --------------------------------------------------------------------------------------------

    def pause_writing(self) -> None:
        if self._input is not None:
            self._input.pause_reading()

    def resume_writing(self) -> None:
        if self._flushed is not None:
            self._flushed.set()
        stopped = self._reading_stopped is not None and self._reading_stopped.is_set()
        if self._input is not None and not self._input.is_closing() and not stopped:
            self._input.resume_reading()

    def _write(self, data: bytes) -> None:
        if self._resume_id is not None and self._resume_marker in data and self._resumed(data):
            return
        output = self._output
        if output is None or output.is_closing() or self._overflowed:
            return
        output.writelines((data, b"\n"))
        self._busy_poll.sent()
        if output.get_write_buffer_size() > self._max_buffered:
            _log.warning("agent does not read its responses: closing the connection")
            self._overflowed = True
            # Closed at the loop's next turn, not inside this write: it may be one of a broadcast's, or in the
            # middle of a batch of the agent's own lines, whose loops must not see the agent leave under them.
            asyncio.get_running_loop().call_soon(functools.partial(self.close, abort=True))

    # --- resuming a session across a daemon restart --------------------------------------------------------------

    def _remember_initialize(self, line: bytes) -> None:
        """Give the shim the agent's initialize params, which a next daemon needs to resume the session."""
        try:
            message = jsonrpc.loads(line)
        except McpxError:
            return
        if not isinstance(message, dict) or message.get("method") != "initialize" or "id" not in message:
            return
        self._watch_initialize = False
        params = message.get("params")
        encoded = jsonrpc.dumps(params) if isinstance(params, dict) else b""
        if self._lifeline is None or not encoded or len(encoded) > MAX_SESSION_BYTES:
            return
        with contextlib.suppress(OSError):  # a few hundred bytes into an idle socket: never blocks in practice
            self._lifeline.send(LIFELINE_SESSION + encoded + b"\n")

    def resume(self, initialize: dict[str, Any] | None, held: bytes) -> None:
        """Go on with a session another daemon had: repeat the agent's initialize under an id of our own (its answer
        is dropped, and the agent is told to list again, as this daemon's lists may differ), then run the requests
        the old daemon held. Call before reading the agent's input."""
        self._watch_initialize = False
        if initialize is not None:
            self._resume_id = f"mcpx-resume-{os.urandom(8).hex()}"
            self._resume_marker = jsonrpc.dumps(self._resume_id)
            self.session.on_line(jsonrpc.dumps(jsonrpc.request(self._resume_id, "initialize", initialize)))
        if held:
            self.data_received(held)

    def _resumed(self, data: bytes) -> bool:
        """True (and the agent told to list again) when `data` answers the repeated initialize."""
        try:
            message = jsonrpc.loads(data)
        except McpxError:
            return False
        if not isinstance(message, dict) or message.get("id") != self._resume_id or "method" in message:
            return False
        self._resume_id = None
        result = message.get("result")
        capabilities = result.get("capabilities") if isinstance(result, dict) else None
        offered = capabilities if isinstance(capabilities, dict) else {"tools": {}}
        for kind in _LIST_CHANGED_KINDS:
            if kind in offered:
                self._write(jsonrpc.dumps(jsonrpc.notification(f"notifications/{kind}/list_changed")))
        _log.debug("agent session resumed", pid=self.session.peer.pid, ok="result" in message)
        return True

    # --- graceful stop -------------------------------------------------------------------------------------------

    async def stop(self, timeout: float, notice: bytes | None = None) -> socket.socket | None:
        """The daemon is stopping: tell the agent (`notice`, if initialized), let its calls finish within `timeout`
        (those that do not are answered with an error), stop reading at a message boundary and flush.

        Attach mode: the agent is handed back to its shim, which reconnects once this daemon is gone: the lifeline
        is returned, to be closed when the daemon exits. Otherwise (relay mode, or the agent did not read its last
        responses) the session ends here and None is returned."""
        self._stopping = True
        self._reading_stopped = asyncio.Event()
        if self._lifeline is not None:
            self._held = []
        if notice is not None and self.session.initialized:
            self._write(notice)
        self._maybe_stop_reading()
        cut = await self.session.drain(timeout)
        if cut:
            _log.warning("calls cut short by the stop", count=cut, pid=self.session.peer.pid)
        self._drained = True
        self._maybe_stop_reading()
        try:
            async with asyncio.timeout(STOP_BOUNDARY_TIMEOUT):
                await self._reading_stopped.wait()
        except TimeoutError:
            _log.warning("an agent's message was incomplete at the stop: its start is lost", pid=self.session.peer.pid)
            if self._input is not None:
                self._input.pause_reading()
            self._reading_stopped.set()
        flushed = await self._flush(STOP_FLUSH_TIMEOUT)
        if self not in self._connections:  # the agent went away meanwhile
            return None
        if self._lifeline is None or not flushed:
            self.close()
            return None
        return await self._release()

    def _hold(self, line: bytes) -> bool:
        """Stopping: keep a request for the next daemon instead of starting it (True if kept). A cancellation of a
        held request drops it; answers and other notifications go to the session."""
        assert self._held is not None
        try:
            message = jsonrpc.loads(line)
        except McpxError:
            return False
        if not isinstance(message, dict) or not isinstance(message.get("method"), str):
            return False
        if "id" in message:
            self._held.append((message["id"], line))
            self._held_bytes += len(line) + 1
            return True
        params = message.get("params")
        if message["method"] == "notifications/cancelled" and isinstance(params, dict):
            kept = [(request_id, held) for request_id, held in self._held if request_id != params.get("requestId")]
            if len(kept) < len(self._held):
                self._held = kept
                return True
        return False

    def _maybe_stop_reading(self) -> None:
        """Stopping: stop reading once the calls are done (at once in relay mode, or when the held requests reach
        their bound), but only between messages, so nothing half-read is lost."""
        stopped = self._reading_stopped
        if stopped is None or stopped.is_set() or self._framer.buffered:
            return
        if self._held is None or self._drained or self._held_bytes >= self._max_held:
            if self._input is not None and not self._input.is_closing():
                self._input.pause_reading()
            stopped.set()

    async def _flush(self, timeout: float) -> bool:
        """Wait (bounded) until everything written to the agent has left our buffer."""
        output = self._output
        if output is None or output.is_closing():
            return False
        if output.get_write_buffer_size() == 0:
            return True
        self._flushed = asyncio.Event()
        output.set_write_buffer_limits(high=0)  # resume_writing comes when the buffer is empty
        try:
            async with asyncio.timeout(timeout):
                while output.get_write_buffer_size():
                    self._flushed.clear()
                    await self._flushed.wait()
        except TimeoutError:
            _log.warning("an agent did not read its last responses before the stop", pid=self.session.peer.pid)
            return False
        return True

    async def _release(self) -> socket.socket | None:
        """Let go of the agent without ending its session: close our copies of its pipes (the shim keeps its own, and
        what the agent writes waits in them), give the shim the held requests, return the lifeline."""
        self._connections.discard(self)
        self.session.close()
        self._close_transports()
        lifeline = self._take_lifeline()
        held = b"".join(line + b"\n" for _, line in self._held or ())
        if lifeline is not None and held:
            try:
                async with asyncio.timeout(_LIFELINE_SEND_TIMEOUT):
                    await asyncio.get_running_loop().sock_sendall(lifeline, LIFELINE_HELD + b"%d\n" % len(held) + held)
            except (TimeoutError, OSError) as exc:
                _log.warning("could not hand held requests to the shim", count=len(self._held or ()), error=str(exc))
        return lifeline


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
    """Accepts agent connections on the daemon's socket and sets each up in attach, resume or relay mode."""

    def __init__(
        self, sock: socket.socket, make_connection: ConnectionFactory, *, max_resume_bytes: int = 1 << 28
    ) -> None:
        self._sock = sock
        self._make_connection = make_connection
        self._max_resume_bytes = max_resume_bytes
        self._tasks: set[asyncio.Task[None]] = set()
        self._unread: dict[int, socket.socket] = {}  # accepted, first bytes not read yet

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
        """Stop accepting. Connections not set up yet are dropped without a word, so a shim among them tries again
        (with the next daemon)."""
        for task in self._tasks:
            task.cancel()
        loop = asyncio.get_running_loop()
        for fd, conn in self._unread.items():
            loop.remove_reader(fd)
            conn.close()
        self._unread.clear()
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
        self._unread[conn.fileno()] = conn
        asyncio.get_running_loop().add_reader(conn.fileno(), self._first_read, conn, peer)

    def _first_read(self, conn: socket.socket, peer: PeerCredentials) -> None:
        loop = asyncio.get_running_loop()
        try:
            # Close-on-exec at once (where the flag exists; below where it does not): a stdio upstream spawned
            # later must not inherit an agent's pipes (it could read its requests or write into its stdout, and the
            # agent would never see the end of its output).
            data, ancillary, _flags, _ = conn.recvmsg(1 << 16, socket.CMSG_SPACE(2 * _FD_SIZE), _CMSG_CLOEXEC)
        except BlockingIOError:
            return
        except OSError:
            self._unread.pop(conn.fileno(), None)
            loop.remove_reader(conn.fileno())
            conn.close()
            return
        self._unread.pop(conn.fileno(), None)
        loop.remove_reader(conn.fileno())
        fds = _received_fds(ancillary)
        if fds:
            pipes = len(fds) == 2 and all(_is_stream(fd) for fd in fds)
            if pipes and data == ATTACH_HELLO:
                self._spawn(self._attach(conn, peer, fds[0], fds[1]))
            elif pipes and data.startswith(RESUME_HELLO):
                self._spawn(self._resume(conn, peer, fds[0], fds[1], data))
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

    async def _resume(
        self, conn: socket.socket, peer: PeerCredentials, stdin_fd: int, stdout_fd: int, first: bytes
    ) -> None:
        try:
            async with asyncio.timeout(RESUME_TIMEOUT):
                initialize, held = await _read_resume(conn, first, self._max_resume_bytes)
        except (TimeoutError, OSError, ValueError, asyncio.CancelledError) as exc:
            os.close(stdin_fd)
            os.close(stdout_fd)
            conn.close()  # the shim tries again
            if isinstance(exc, asyncio.CancelledError):
                raise
            _log.warning("refused a resume request", error=str(exc) or type(exc).__name__)
            return
        await self._attach(conn, peer, stdin_fd, stdout_fd, (initialize, held))

    async def _attach(
        self,
        conn: socket.socket,
        peer: PeerCredentials,
        stdin_fd: int,
        stdout_fd: int,
        resume: tuple[dict[str, Any] | None, bytes] | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        connection = self._make_connection(peer, conn)
        _enlarge_pipe(stdout_fd)
        stdin = os.fdopen(stdin_fd, "rb", buffering=0)
        stdout = os.fdopen(stdout_fd, "wb", buffering=0)
        try:
            output, _ = await loop.connect_write_pipe(lambda: _OutputSide(connection), stdout)
            connection.attach_output(output)
            if resume is not None:
                connection.resume(*resume)
            await loop.connect_read_pipe(lambda: connection, stdin)
        except (OSError, asyncio.CancelledError) as exc:
            # Cancelled: the daemon stops before the agent was served; without MCPX-END the shim tries again.
            connection.close(end=not isinstance(exc, asyncio.CancelledError))
            stdin.close()
            stdout.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
            _log.warning("could not attach the agent's pipes", error=str(exc))
            return
        # The shim's socket is now a lifeline: when it closes, the agent is gone.
        if connection.attached:  # (not already ended, by an agent that closed its input at once)
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


async def _read_resume(conn: socket.socket, first: bytes, limit: int) -> tuple[dict[str, Any] | None, bytes]:
    """The rest of `MCPX-RESUME 1 <session bytes> <held bytes>\\n<session JSON><held requests>`: the agent's
    initialize params (None if unusable: the session then resumes without them) and the held requests.

    Raises:
        ValueError: the request is malformed or larger than `limit`.
        OSError: the shim went away (EOF included).
    """
    loop = asyncio.get_running_loop()
    buffer = bytearray(first)
    while b"\n" not in buffer:
        if len(buffer) > _MAX_RESUME_HEADER:
            raise ValueError("resume header too long")
        await _receive(loop, conn, buffer, 256)
    header, _, rest = bytes(buffer).partition(b"\n")
    sizes = header[len(RESUME_HELLO) :].split(b" ")
    if len(sizes) != 2 or not all(size.isdigit() for size in sizes):
        raise ValueError("malformed resume header")
    session_size, held_size = int(sizes[0]), int(sizes[1])
    if session_size > MAX_SESSION_BYTES or held_size > limit:
        raise ValueError("resume request too large")
    buffer = bytearray(rest)
    while len(buffer) < session_size + held_size:
        await _receive(loop, conn, buffer, session_size + held_size - len(buffer))
    initialize: Any = None
    if session_size:
        with contextlib.suppress(McpxError):
            initialize = jsonrpc.loads(bytes(buffer[:session_size]))
    held = bytes(buffer[session_size : session_size + held_size])
    return (initialize if isinstance(initialize, dict) else None), held


async def _receive(loop: asyncio.AbstractEventLoop, conn: socket.socket, buffer: bytearray, most: int) -> None:
    chunk = await loop.sock_recv(conn, min(most, 1 << 16))
    if not chunk:
        raise ConnectionResetError("the shim closed the connection")
    buffer += chunk


def _received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % _FD_SIZE
            fds.extend(array.array("i", data[:usable]))
    for fd in fds:
        with contextlib.suppress(OSError):
            os.set_inheritable(fd, False)  # (already so with MSG_CMSG_CLOEXEC; not on macOS)
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
