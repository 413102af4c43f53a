"""The asyncio layer of the agent socket: one `asyncio.Protocol` per connection around a framer and a session.

The peer's uid is checked in `connection_made`, before a single byte is read: a connection from another user
is closed at once. Writes that the agent does not read pause reading from it (backpressure), and a session
whose unread output passes a hard bound is dropped rather than letting memory grow without limit.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, cast

from mcpx.downstream.peercred import PeerCredentials, peer_credentials
from mcpx.downstream.session import AgentSession, Control
from mcpx.framing.ndjson import LineFramer, Oversized
from mcpx.log import get_logger
from mcpx.router.router import Router

if TYPE_CHECKING:
    import socket

_log = get_logger("mcpx.agent")


class AgentConnection(asyncio.Protocol):
    def __init__(self, router: Router, control: Control, sessions: set[AgentSession], max_message_bytes: int) -> None:
        self._router = router
        self._control = control
        self._sessions = sessions
        self._framer = LineFramer(max_message_bytes)
        self._max_buffered = 4 * max_message_bytes
        self._transport: asyncio.Transport | None = None
        self._session: AgentSession | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        sock = cast("socket.socket | None", transport.get_extra_info("socket"))
        try:
            peer = peer_credentials(sock) if sock is not None else None
        except OSError:
            peer = None
        if peer is None or peer.uid != os.geteuid():
            _log.warning("refused a connection from another user", uid=peer.uid if peer else None)
            transport.abort()
            return
        self._transport = transport
        self._session = AgentSession(self._router, self._control, self._write, PeerCredentials(peer.uid, peer.pid))
        self._sessions.add(self._session)

    def data_received(self, data: bytes) -> None:
        session = self._session
        if session is None:
            return
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
        if self._session is not None:
            self._session.close()
            self._sessions.discard(self._session)
            self._session = None
        self._transport = None

    def pause_writing(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.writelines((data, b"\n"))
        if transport.get_write_buffer_size() > self._max_buffered:
            _log.warning("agent does not read its responses: closing the connection")
            transport.abort()
