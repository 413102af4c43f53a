"""Real MCP upstream servers for tests: the `mcp` SDK's MCPServer over streamable HTTP, served by uvicorn on
127.0.0.1, optionally requiring a bearer token through the SDK's own token verification (HTTP 401 otherwise),
optionally speaking protocol 2026-07-28 only (`modern_only`: the SDK's app serves both eras; a thin ASGI layer
refuses the handshake era as a modern-only server does).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import uvicorn
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from pydantic import AnyHttpUrl
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MODERN_VERSION: Final = "2026-07-28"


@dataclass(frozen=True)
class SeenPost:
    """One POST as a modern-only upstream received it: lower-cased headers and the parsed body."""

    headers: dict[str, str]
    body: dict[str, Any]


@dataclass(frozen=True)
class SeenRequest:
    """One HTTP request as the upstream received it (method and lower-cased headers)."""

    method: str
    headers: dict[str, str]


@dataclass
class TokenCheck:
    """The tokens an upstream accepts right now (tests rotate them)."""

    valid: set[str] = field(default_factory=set)
    seen: list[str] = field(default_factory=list)

    async def verify_token(self, token: str) -> AccessToken | None:
        self.seen.append(token)
        if token not in self.valid:
            return None
        # One principal whatever the token, so a rotated token keeps using the same upstream session.
        return AccessToken(token=token, client_id="mcpx-tests", scopes=[], subject="tester")


# The tools every `build_server` server offers (tests compare listings with these names).
TOOLS = ("add", "delete_issue", "echo", "get_issue", "search_issues")


def build_server(name: str, tokens: TokenCheck | None, port: int) -> MCPServer:
    """An MCP server whose tools (`TOOLS`) say which server ran them, so misrouting is visible in every result."""
    auth = None
    if tokens is not None:
        auth = AuthSettings(
            issuer_url=AnyHttpUrl(f"http://127.0.0.1:{port}"),
            resource_server_url=AnyHttpUrl(f"http://127.0.0.1:{port}/mcp"),
            validate_token_resource=False,
        )
    server: MCPServer = MCPServer(name, auth=auth, token_verifier=tokens, log_level="WARNING")

    @server.tool()
    def echo(text: str) -> str:
        """Echo the text back, prefixed with the server's name."""
        return f"{name}:{text}"

    @server.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @server.tool()
    def get_issue(key: str) -> str:
        """Fetch one issue."""
        return f"{name}:issue {key}"

    @server.tool()
    def search_issues(query: str) -> str:
        """Search issues."""
        return f"{name}:results for {query}"

    @server.tool()
    def delete_issue(key: str) -> str:
        """Delete an issue."""
        return f"{name}:deleted {key}"

    return server


class Served:
    """An ASGI app served by uvicorn on a loopback port of its own that survives stop and start."""

    def __init__(self) -> None:
        self._sock = reserve_port()
        self.port: int = self._sock.getsockname()[1]
        self._uvicorn: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    def app(self) -> ASGIApp:
        raise NotImplementedError

    async def start(self) -> None:
        if self._sock.fileno() < 0:
            self._sock = reserve_port_at(self.port)
        self._sock.listen(128)
        config = uvicorn.Config(self.app(), log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
        self._uvicorn = uvicorn.Server(config)
        self._task = asyncio.get_running_loop().create_task(self._uvicorn.serve(sockets=[self._sock]))

    async def stop(self) -> None:
        if self._uvicorn is not None and self._task is not None:
            self._uvicorn.should_exit = True
            await asyncio.wait_for(self._task, 10)
        self._uvicorn = None
        self._task = None
        self._sock.close()


def reserve_port_at(port: int) -> socket.socket:
    """The loopback port `port` bound again (after a stop), not yet listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


def reserve_port() -> socket.socket:
    """A bound (not yet listening) loopback socket: connections to it are refused until `listen()`."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@dataclass
class HangingTool:
    """A tool `name` that never answers: `started` is set when a call begins, `cancelled` when the server cancels
    it (the client went away, or was told to stop). Pass `customize` to `Upstream`."""

    name: str
    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    def customize(self, server: MCPServer) -> None:
        async def hang() -> str:
            self.started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            return "never"

        server.tool(name=self.name)(hang)


class Upstream(Served):
    """One upstream MCP server that tests can start, stop and restart on a fixed port."""

    def __init__(
        self,
        name: str,
        *,
        json_response: bool,
        tokens: TokenCheck | None = None,
        customize: Callable[[MCPServer], None] | None = None,
        app_options: dict[str, Any] | None = None,
        modern_only: bool = False,
    ) -> None:
        self.name = name
        # Speak protocol 2026-07-28 only: refuse `initialize` (HTTP 400, UnsupportedProtocolVersion naming the
        # supported versions) and answer GET and DELETE with 405 (2026-07-28 `basic/transports`).
        self.modern_only = modern_only
        # (modern_only) Every POST as received; and a hook that may answer one in place of the server: given the
        # parsed body, the raw bytes of a 200 `application/json` answer, or None to let the server answer.
        self.posts: list[SeenPost] = []
        self.posted = asyncio.Event()
        self.answer_instead: Callable[[dict[str, Any]], bytes | None] | None = None
        self.json_response = json_response
        self.tokens = tokens
        self.customize = customize
        # More keyword arguments of the SDK's `streamable_http_app` (e.g. `event_store`, `retry_interval`).
        self.app_options = app_options or {}
        super().__init__()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.server: MCPServer | None = None
        self.requests: list[SeenRequest] = []
        # Set when an MCP session starts (a POST without `mcp-session-id`: an initialize) after the last start().
        self.initialize_received = asyncio.Event()
        # Set when a DELETE (the end of an MCP session) arrives.
        self.delete_received = asyncio.Event()
        # Fields no SDK model knows, added to every tools/call result (JSON responses only), and the bodies sent.
        self.extra_result_fields: dict[str, object] = {}
        self.tool_call_bodies: list[bytes] = []

    def app(self) -> ASGIApp:
        self.server = build_server(self.name, self.tokens, self.port)
        if self.customize is not None:
            self.customize(self.server)
        inner = self.server.streamable_http_app(json_response=self.json_response, **self.app_options)

        async def recorded(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                headers = {key.decode().lower(): value.decode() for key, value in scope["headers"]}
                self.requests.append(SeenRequest(scope["method"], headers))
                if scope["method"] == "POST" and "mcp-session-id" not in headers:
                    self.initialize_received.set()
                if scope["method"] == "DELETE":
                    self.delete_received.set()
            if scope["type"] == "http" and self.modern_only:
                await self._modern_only(inner, scope, receive, send)
            elif scope["type"] == "http" and self.json_response and scope["method"] == "POST":
                await inner(scope, receive, self._rewriting(send))
            else:
                await inner(scope, receive, send)

        return recorded

    async def _modern_only(self, inner: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve as a server of protocol 2026-07-28 only, recording each POST (body read here, replayed)."""
        if scope["method"] != "POST":
            await respond(send, 405, b"", {"Allow": "POST"})
            return
        read = await read_ahead(receive)
        if read is None:
            return
        raw, replay = read
        headers = {key.decode().lower(): value.decode() for key, value in scope["headers"]}
        body = json.loads(raw) if raw.startswith(b"{") else {}
        self.posts.append(SeenPost(headers, body))
        self.posted.set()
        if headers.get("mcp-protocol-version") != MODERN_VERSION:
            error = {
                "code": -32022,
                "message": "Unsupported protocol version",
                "data": {"supported": [MODERN_VERSION], "requested": headers.get("mcp-protocol-version")},
            }
            reply = {"jsonrpc": "2.0", "id": body.get("id"), "error": error}
            await respond(send, 400, json.dumps(reply).encode(), {"Content-Type": "application/json"})
            return
        instead = self.answer_instead(body) if self.answer_instead is not None else None
        if instead is not None:
            await respond(send, 200, instead, {"Content-Type": "application/json"})
            return
        await inner(scope, replay, send)

    def _rewriting(self, send: Send) -> Send:
        """Add `extra_result_fields` to tools/call results and record those bodies as sent."""
        start: dict[str, Any] = {}

        async def rewrite(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            body = message.get("body", b"")
            reply = json.loads(body) if body.startswith(b"{") else {}
            if isinstance(reply.get("result"), dict) and "content" in reply["result"]:
                reply["result"].update(self.extra_result_fields)
                # Escaped slashes, as PHP writes them: valid JSON whose bytes differ from its text.
                body = json.dumps(reply, separators=(",", ":")).replace("/", "\\/").encode()
                self.tool_call_bodies.append(body)
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({**message, "body": body})

        return rewrite  # type: ignore[return-value]

    async def start(self) -> None:
        self.initialize_received.clear()
        await super().start()

    async def restart(self) -> None:
        """Stop and start again on the same port: every MCP session the server held is forgotten."""
        await self.stop()
        await self.start()


async def respond(send: Send, status: int, body: bytes, headers: dict[str, str]) -> None:
    """A whole ASGI response: `headers` (names lower-cased) and its Content-Length."""
    raw = [(key.lower().encode(), value.encode()) for key, value in headers.items()]
    raw.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def read_ahead(receive: Receive) -> tuple[bytes, Receive] | None:
    """A request's whole body, read before the app sees it, and the `receive` that hands the app that body and
    then what follows; None when the client went away first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


@contextlib.asynccontextmanager
async def running(*upstreams: Upstream) -> AsyncIterator[None]:
    try:
        for upstream in upstreams:
            await upstream.start()
        yield
    finally:
        for upstream in upstreams:
            await upstream.stop()
