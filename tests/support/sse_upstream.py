"""Upstreams for the transport tests: a real legacy HTTP+SSE server (the `mcp` SDK's `SseServerTransport`, through
`MCPServer.sse_app`) under uvicorn on 127.0.0.1, an in-memory SSE event store for the SDK's resumable streamable
HTTP server, and a scripted raw-HTTP server for faults the SDK never makes (a foreign `endpoint`, `retry:`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from mcp.server.mcpserver import MCPServer
from mcp.server.streamable_http import EventCallback, EventMessage, EventStore
from mcp_types import JSONRPCMessage
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tests.support.upstream import Served, TokenCheck, build_server


@dataclass(frozen=True)
class SeenHttp:
    """One HTTP request as a test server received it."""

    method: str
    path: str
    headers: dict[str, str]


class LegacyUpstream(Served):
    """An MCP server speaking the legacy HTTP+SSE transport: GET `/sse` (the stream), POST `/messages/`; with
    `tokens`, both require one of its bearer tokens (HTTP 401 otherwise)."""

    def __init__(
        self,
        name: str,
        *,
        tokens: TokenCheck | None = None,
        customize: Callable[[MCPServer], None] | None = None,
    ) -> None:
        self.name = name
        self.tokens = tokens
        self.customize = customize
        super().__init__()
        self.url = f"http://127.0.0.1:{self.port}/sse"
        self.requests: list[SeenHttp] = []
        self._changed = asyncio.Condition()
        self._drops: set[asyncio.Event] = set()

    def app(self) -> ASGIApp:
        server = build_server(self.name, self.tokens, self.port)
        if self.customize is not None:
            self.customize(server)
        inner = server.sse_app(sse_path="/sse", message_path="/messages/")

        async def recorded(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await inner(scope, receive, send)
                return
            headers = {key.decode().lower(): value.decode() for key, value in scope["headers"]}
            async with self._changed:
                self.requests.append(SeenHttp(scope["method"], scope["path"], headers))
                self._changed.notify_all()
            if scope["method"] == "GET" and scope["path"] == "/sse":
                await self._droppable(inner, scope, receive, send)
            else:
                await inner(scope, receive, send)

        return recorded

    async def _droppable(self, inner: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one SSE stream that `drop_streams` can end: the SDK is told the client went away (so the session
        is gone on the server) and the body ends cleanly, as when a server restarts its stream handler."""
        dropped = asyncio.Event()
        self._drops.add(dropped)
        ended = False

        async def receiving() -> Message:
            received = asyncio.ensure_future(receive())
            drop = asyncio.ensure_future(dropped.wait())
            try:
                await asyncio.wait({received, drop}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                drop.cancel()
            if received.done():
                return received.result()
            received.cancel()
            return {"type": "http.disconnect"}

        async def tracking(message: Message) -> None:
            nonlocal ended
            if ended or dropped.is_set():
                return  # after a drop the SDK's handler still answers the "disconnected" request: not sent
            ended = message["type"] == "http.response.body" and not message.get("more_body", False)
            await send(message)

        try:
            await inner(scope, receiving, tracking)
        finally:
            self._drops.discard(dropped)
        if dropped.is_set() and not ended:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    def drop_streams(self) -> None:
        """End every open SSE stream (and its session)."""
        for dropped in self._drops:
            dropped.set()

    def seen(self, method: str, path: str) -> list[SeenHttp]:
        return [r for r in self.requests if r.method == method and r.path == path]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait (bounded) until `predicate` holds over the recorded requests."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(predicate)


@contextlib.asynccontextmanager
async def serving(upstream: LegacyUpstream) -> AsyncIterator[LegacyUpstream]:
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.stop()


class MemoryEventStore(EventStore):
    """Every SSE event the SDK server sends, kept so that a stream resumed with `Last-Event-ID` is replayed."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, JSONRPCMessage | None]] = []

    async def store_event(self, stream_id: str, message: JSONRPCMessage | None) -> str:
        event_id = f"{stream_id}:{len(self.events) + 1}"
        self.events.append((event_id, stream_id, message))
        return event_id

    async def replay_events_after(self, last_event_id: str, send_callback: EventCallback) -> str | None:
        ids = [event_id for event_id, _, _ in self.events]
        if last_event_id not in ids:
            return None
        position = ids.index(last_event_id)
        stream_id = self.events[position][1]
        for event_id, stream, message in self.events[position + 1 :]:
            if stream == stream_id and message is not None:
                await send_callback(EventMessage(message, event_id))
        return stream_id


SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n"
