"""The `url` upstream transports: legacy HTTP+SSE (its endpoint event and the same-origin rule, losing the
stream), `transport = "auto"` falling back to it, the streamable-HTTP GET stream (server messages outside calls,
resumption with `Last-Event-ID`, `retry:`), and a POST stream resumed after the server closed it (SEP-1699).
First the sessions driven directly with a test client side, then an agent's view through mcpxd. Real SDK servers;
scripted raw HTTP where the fault is the point.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.streamable_http import GET_STREAM_KEY
from mcp_types import ListRootsRequest, ListRootsResult

from mcpx.auth.credentials import BearerFromFile, CredentialProvider, NoCredential
from mcpx.config.model import UpstreamConfig
from mcpx.errors import (
    CredentialRejected,
    UpstreamHTTPError,
    UpstreamInterrupted,
    UpstreamProtocolError,
    UpstreamUnavailable,
)
from mcpx.jsonrpc import Message
from mcpx.upstream import httpbase
from mcpx.upstream.auto import AutoSession
from mcpx.upstream.h1 import HttpClient
from mcpx.upstream.peer import HANDSHAKE_VERSIONS, UpstreamSession
from mcpx.upstream.transports import open_session
from tests.support.agents import change_watcher
from tests.support.daemon import FAST_RECONNECT, Sandbox, agent, mcpxctl, running_daemon, upstream_toml
from tests.support.results import text_of
from tests.support.scripted_http import LoopbackServer, RawRequest, ScriptedHttp, read_request
from tests.support.sse_upstream import (
    SSE_HEAD,
    LegacyUpstream,
    MemoryEventStore,
    serving,
)
from tests.support.upstream import TOOLS, TokenCheck, Upstream, running

WAIT = 10.0


class Recorder:
    """The client side of the session under test: records notifications; answers `roots/list`."""

    agent: object = None

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.asked: list[str] = []
        self._changed = asyncio.Event()

    def notify(self, message: Message) -> None:
        self.messages.append(message)
        self._changed.set()

    async def ask(self, method: str, params: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
        self.asked.append(method)
        if method == "roots/list":
            return {"result": {"roots": [{"uri": "file:///work", "name": "work"}]}}
        return {"error": {"code": -32601, "message": f"{method}: not in this test"}}

    def methods(self) -> list[str]:
        return [str(message.get("method")) for message in self.messages]

    async def wait_for(self, method: str, timeout: float = WAIT) -> Message:
        async with asyncio.timeout(timeout):
            while True:
                for message in self.messages:
                    if message.get("method") == method:
                        return message
                self._changed.clear()
                await self._changed.wait()


@contextlib.asynccontextmanager
async def session_for(
    url: str,
    transport: str,
    *,
    on_lost: Callable[[str], None] | None = None,
    connect_timeout: float = 5.0,
    credentials: CredentialProvider | None = None,
) -> AsyncIterator[tuple[UpstreamSession, Recorder]]:
    http = HttpClient(connect_timeout=connect_timeout)
    config = UpstreamConfig(name="alpha", url=url, transport=transport, timeout=WAIT)  # type: ignore[arg-type]
    client = Recorder()
    session = open_session(
        config,
        http=http,
        credentials=credentials or NoCredential(),
        max_message_bytes=1 << 20,
        client=client,
        on_lost=on_lost or (lambda _: None),
        connect_timeout=connect_timeout,
    )
    try:
        yield session, client
    finally:
        await session.close()
        await http.close()


async def call_text(session: UpstreamSession, tool: str, **arguments: Any) -> str:
    result = await session.request("tools/call", {"name": tool, "arguments": arguments}, timeout=WAIT)
    text = result["content"][0]["text"]
    assert isinstance(text, str)
    return text


# --- legacy HTTP+SSE -------------------------------------------------------------------------------------------------


async def test_legacy_sse_session_lists_and_calls_tools() -> None:
    async with serving(LegacyUpstream("legacy")) as server, session_for(server.url, "sse") as (session, _):
        await session.connect()
        assert session.protocol_version in HANDSHAKE_VERSIONS
        assert session.server_info["name"] == "legacy"
        listed = await session.request("tools/list", None, timeout=WAIT)
        assert {tool["name"] for tool in listed["tools"]} == set(TOOLS)
        assert await call_text(session, "echo", text="hi") == "legacy:hi"
        # One stream; every message POSTed to the endpoint the stream named (relative, resolved to this origin).
        assert [(r.method, r.path) for r in server.requests if r.path == "/sse"] == [("GET", "/sse")]
        assert server.requests[0].headers["accept"] == "text/event-stream"
        posts = server.seen("POST", "/messages/")
        assert len(posts) == 4  # initialize, initialized, tools/list, tools/call


async def test_auto_falls_back_to_legacy_sse_when_the_post_is_refused() -> None:
    async with serving(LegacyUpstream("legacy")) as server, session_for(server.url, "auto") as (session, _):
        await session.connect()
        assert isinstance(session, AutoSession)
        assert session.transport == "sse"
        # What the server saw: streamable HTTP's initialize POSTed to the URL (405), then the SSE stream opened.
        assert [(r.method, r.path) for r in server.requests[:2]] == [("POST", "/sse"), ("GET", "/sse")]
        assert await call_text(session, "add", a=2, b=3) == "5"
        assert session.capabilities.get("tools") is not None


async def test_auto_keeps_streamable_http_when_it_works() -> None:
    alpha = Upstream("alpha", json_response=True)
    async with running(alpha), session_for(alpha.url, "auto") as (session, _):
        await session.connect()
        assert isinstance(session, AutoSession)
        assert session.transport == "streamable-http"
        assert await call_text(session, "echo", text="x") == "alpha:x"
        assert alpha.requests[0].method == "POST"


async def test_auto_reports_both_transports_when_neither_works() -> None:
    async def not_found(request: RawRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async with ScriptedHttp(not_found) as server, session_for(f"{server.origin}/mcp", "auto") as (session, _):
        with pytest.raises(UpstreamUnavailable) as failed:
            await session.connect()
        assert "streamable HTTP: HTTP 404" in failed.value.reason
        assert "HTTP+SSE: HTTP 404" in failed.value.reason
        assert [r.method for r in server.requests] == ["POST", "GET"]


async def test_auto_does_not_take_a_stateless_era_refusal_for_a_legacy_server() -> None:
    # 2026-07-28 `basic/transports`: a 400 whose body is a modern JSON-RPC error (here UnsupportedProtocolVersion,
    # what a 2026-07-28-only server answers to `initialize`) means a modern server: no HTTP+SSE attempt.
    refusal = (
        b'{"jsonrpc":"2.0","id":1,"error":{"code":-32022,"message":"Unsupported protocol version",'
        b'"data":{"supported":["2026-07-28"],"requested":"2025-11-25"}}}'
    )

    async def modern_only(request: RawRequest, writer: asyncio.StreamWriter) -> None:
        head = f"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: {len(refusal)}\r\n\r\n"
        writer.write(head.encode() + refusal)
        await writer.drain()

    async with ScriptedHttp(modern_only) as server, session_for(f"{server.origin}/mcp", "auto") as (session, _):
        with pytest.raises(UpstreamHTTPError) as failed:
            await session.connect()
        assert failed.value.rpc_code == -32022
        assert "Unsupported protocol version" in failed.value.reason
        assert "2026-07-28" in failed.value.reason
        # `protocol = "auto"`: the handshake, then protocol 2026-07-28 (refused too here), never a GET.
        assert [r.method for r in server.requests] == ["POST", "POST"]


async def test_legacy_sse_renews_a_rejected_credential_once(tmp_path: Path) -> None:
    tokens = TokenCheck({"token-one-AAAA"})
    token_file = tmp_path / "legacy.token"
    token_file.write_text("token-one-AAAA\n")
    credentials = BearerFromFile("alpha", token_file)
    async with (
        serving(LegacyUpstream("legacy", tokens=tokens)) as server,
        session_for(server.url, "sse", credentials=credentials) as (session, _),
    ):
        await session.connect()
        assert await call_text(session, "echo", text="1") == "legacy:1"
        # Rotated in place with the same size and mtime: only the POST's 401 can make mcpx read the file again.
        stat = os.stat(token_file)
        tokens.valid = {"token-two-BBBB"}
        token_file.write_text("token-two-BBBB\n")
        os.utime(token_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert await call_text(session, "echo", text="2") == "legacy:2"
        assert tokens.seen[-2:] == ["token-one-AAAA", "token-two-BBBB"]
        assert server.seen("POST", "/messages/")[-1].headers["authorization"] == "Bearer token-two-BBBB"

        # A credential that stays wrong: the stream's GET is refused once more after the renewal, then reported.
        tokens.valid = set()
        with pytest.raises(CredentialRejected, match=str(token_file)):
            await session.connect()


@pytest.mark.parametrize(
    "endpoint",
    [
        "{other}/messages?session_id=1",  # another port
        "//127.0.0.1:{other_port}/messages",  # scheme-relative, another port
        "https://127.0.0.1:{port}/messages",  # same host and port, another scheme
    ],
)
async def test_an_endpoint_on_another_origin_is_refused(endpoint: str) -> None:
    async def nothing(request: RawRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 202 Accepted\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async with ScriptedHttp(nothing) as other:

        async def foreign_endpoint(request: RawRequest, writer: asyncio.StreamWriter) -> None:
            data = endpoint.format(other=other.origin, other_port=other.port, port=server.port)
            writer.write(SSE_HEAD + f"event: endpoint\ndata: {data}\n\n".encode())
            await writer.drain()
            await asyncio.Event().wait()  # the stream stays open until the client leaves

        async with ScriptedHttp(foreign_endpoint) as server, session_for(f"{server.origin}/sse", "sse") as (session, _):
            with pytest.raises(UpstreamProtocolError, match="another origin") as refused:
                await session.connect()
            assert "the scheme, host and port of the configured url" in refused.value.reason
            assert other.requests == []
            assert [r.method for r in server.requests] == ["GET"]


async def test_no_endpoint_event_within_the_connect_timeout() -> None:
    async def silent(request: RawRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD + b": just a comment\n\n")
        await writer.drain()
        await asyncio.Event().wait()

    async with (
        ScriptedHttp(silent) as server,
        session_for(f"{server.origin}/sse", "sse", connect_timeout=0.2) as (session, _),
    ):
        with pytest.raises(UpstreamUnavailable, match="no endpoint event"):
            await session.connect()


async def test_a_lost_legacy_stream_is_reported_and_a_reconnect_works() -> None:
    lost = asyncio.Event()
    reasons: list[str] = []

    def on_lost(reason: str) -> None:
        reasons.append(reason)
        lost.set()

    async with (
        serving(LegacyUpstream("legacy")) as server,
        session_for(server.url, "sse", on_lost=on_lost) as (session, _),
    ):
        await session.connect()
        assert await call_text(session, "echo", text="before") == "legacy:before"
        server.drop_streams()
        async with asyncio.timeout(WAIT):
            await lost.wait()
        assert reasons == ["the SSE stream ended"]
        with pytest.raises(UpstreamUnavailable):
            await call_text(session, "echo", text="while down")
        await session.connect()  # what the supervisor does on `on_lost`
        assert await call_text(session, "echo", text="after") == "legacy:after"
        assert len(server.seen("GET", "/sse")) == 2


class KeepAliveLegacy(LoopbackServer):
    """A legacy HTTP+SSE server written by hand: its stream (GET) carries the endpoint and every answer; POSTs are
    served on keep-alive connections, and the first tools/call for `drop` gets its connection closed without a
    byte (the server's idle timeout racing the request, or a server that died on it)."""

    def __init__(self, drop: str) -> None:
        super().__init__()
        self.drop = drop
        self.posted: list[dict[str, Any]] = []
        self._stream: asyncio.StreamWriter | None = None

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            request = await read_request(reader)
            if request.method == "GET":
                self._stream = writer
                writer.write(SSE_HEAD + b"event: endpoint\ndata: /messages\n\n")
                await asyncio.Event().wait()  # the stream stays open until the client leaves
            message = json.loads(request.body)
            self.posted.append(message)
            dropped = [m for m in self.posted if m.get("params", {}).get("arguments", {}).get("text") == self.drop]
            if dropped == [message]:
                return
            writer.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
            if "id" in message:
                if message["method"] == "initialize":
                    result: dict[str, Any] = {
                        "protocolVersion": "2025-11-25",
                        "capabilities": {"tools": {}},
                        "serverInfo": {"name": "legacy"},
                    }
                else:
                    text = f"legacy:{message['params']['arguments']['text']}"
                    result = {"content": [{"type": "text", "text": text}]}
                answer = json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result})
                assert self._stream is not None
                self._stream.write(f"event: message\ndata: {answer}\n\n".encode())


async def test_a_legacy_tool_call_whose_pooled_connection_drops_before_any_answer_is_not_sent_again() -> None:
    async with (
        KeepAliveLegacy(drop="again") as server,
        session_for(f"{server.origin}/sse", "sse") as (session, _),
    ):
        await session.connect()
        assert await call_text(session, "echo", text="warm") == "legacy:warm"  # a POST connection is now pooled
        with pytest.raises(UpstreamInterrupted, match="may or may not have run"):
            await call_text(session, "echo", text="again")
        assert [m["params"]["arguments"]["text"] for m in server.posted if m.get("method") == "tools/call"] == [
            "warm",
            "again",
        ]
        assert await call_text(session, "echo", text="after") == "legacy:after"  # the session goes on


# --- the streamable-HTTP GET stream ----------------------------------------------------------------------------------


def announcing(server: MCPServer) -> None:
    """Tools whose messages the SDK sends on the standalone (GET) stream: nothing relates them to the call."""

    @server.tool()
    async def announce(ctx: Context) -> str:
        await ctx.session.send_tool_list_changed()
        return "announced"

    @server.tool()
    async def ask_roots(ctx: Context) -> str:
        # `list_roots()` itself warns that roots are deprecated (2026-07-28); handshake-era servers still ask.
        roots = await ctx.session.send_request(ListRootsRequest(), ListRootsResult)
        return ",".join(str(root.uri) for root in roots.roots)

    @server.tool()
    async def cut_get_stream(ctx: Context) -> str:
        await ctx.session.send_tool_list_changed()  # the last event the client sees before the cut
        await ctx.close_standalone_sse_stream()
        await ctx.session.send_prompt_list_changed()  # stored; only a resumed stream can deliver it
        return "cut"


async def get_stream_ready(session: UpstreamSession, client: Recorder) -> None:
    """Wait (bounded) until the server sends on the GET stream: the stream opens in the background after
    initialize, and the SDK drops standalone messages while no GET stream is open, so ask again until one
    arrives."""
    async with asyncio.timeout(WAIT):
        while "notifications/tools/list_changed" not in client.methods():
            await call_text(session, "announce")
            with contextlib.suppress(TimeoutError):
                await client.wait_for("notifications/tools/list_changed", timeout=0.5)


@pytest.mark.parametrize("json_response", [True, False])
async def test_the_get_stream_carries_server_messages_outside_calls(json_response: bool) -> None:
    alpha = Upstream("alpha", json_response=json_response, customize=announcing)
    async with running(alpha), session_for(alpha.url, "streamable-http") as (session, client):
        await session.connect()
        await get_stream_ready(session, client)
        gets = [r for r in alpha.requests if r.method == "GET"]
        assert gets[0].headers["accept"] == "text/event-stream"
        assert gets[0].headers["mcp-session-id"]
        assert gets[0].headers["mcp-protocol-version"] == session.protocol_version
        # A server request on the GET stream goes to the session's client side; the answer is POSTed back.
        assert await call_text(session, "ask_roots") == "file:///work"
        assert client.asked == ["roots/list"]


async def test_a_closed_get_stream_is_resumed_with_last_event_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpbase, "STREAM_RETRY_INITIAL", 0.01)
    store = MemoryEventStore()
    alpha = Upstream(
        "alpha", json_response=False, customize=announcing, app_options={"event_store": store, "retry_interval": 10}
    )
    async with running(alpha), session_for(alpha.url, "streamable-http") as (session, client):
        await session.connect()
        await get_stream_ready(session, client)
        assert await call_text(session, "cut_get_stream") == "cut"
        await client.wait_for("notifications/prompts/list_changed")
        gets = [r for r in alpha.requests if r.method == "GET"]
        resumed = gets[-1].headers["last-event-id"]
        # The last event the first GET stream delivered: the list_changed sent just before the cut.
        delivered = [event_id for event_id, stream, message in store.events if stream == GET_STREAM_KEY and message]
        assert resumed in delivered
        assert "last-event-id" not in gets[0].headers


async def test_an_idle_session_the_server_forgot_is_renewed_by_its_get_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpbase, "STREAM_RETRY_INITIAL", 0.01)
    alpha = Upstream("alpha", json_response=True, customize=announcing)
    async with running(alpha), session_for(alpha.url, "streamable-http") as (session, client):
        await session.connect()
        await get_stream_ready(session, client)
        await alpha.restart()  # every session forgotten; the GET stream ends
        # No call is made: the GET stream's reopening gets 404, a ping confirms, the session is initialized again.
        async with asyncio.timeout(WAIT):
            await alpha.initialize_received.wait()
        client.messages.clear()
        await get_stream_ready(session, client)  # and its new GET stream works
        sessions = [r.headers.get("mcp-session-id") for r in alpha.requests if r.method == "GET"]
        assert len(set(sessions)) >= 2


async def test_the_get_stream_honours_retry_and_sends_last_event_id(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without the server's `retry:` the reopen would wait two minutes, far beyond the test's bounded waits.
    monkeypatch.setattr(httpbase, "STREAM_RETRY_INITIAL", 120.0)
    server = FakeStreamableServer(
        [
            b'retry: 20\nid: ev-7\ndata: {"jsonrpc":"2.0","method":"notifications/tools/list_changed"}\n\n',
            b'data: {"jsonrpc":"2.0","method":"notifications/prompts/list_changed"}\n\n',
        ]
    )
    async with ScriptedHttp(server.handle) as http, session_for(f"{http.origin}/mcp", "streamable-http") as (s, c):
        await s.connect()
        await c.wait_for("notifications/prompts/list_changed")
        gets = [r for r in http.requests if r.method == "GET"]
        assert len(gets) == 2
        assert "last-event-id" not in gets[0].headers
        assert gets[1].headers["last-event-id"] == "ev-7"
        assert gets[1].headers["mcp-session-id"] == "fake-session"
        assert c.methods() == ["notifications/tools/list_changed", "notifications/prompts/list_changed"]


async def test_a_server_without_a_get_stream_is_not_asked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpbase, "STREAM_RETRY_INITIAL", 0.0)  # a retry would come at once
    server = FakeStreamableServer([], get_status=405)
    async with ScriptedHttp(server.handle) as http, session_for(f"{http.origin}/mcp", "streamable-http") as (s, _):
        await s.connect()
        await http.wait_for(lambda: any(r.method == "GET" for r in http.requests))
        for _ in range(5):
            assert await s.request("ping", None, timeout=WAIT) == {}
        assert [r.method for r in http.requests].count("GET") == 1


def test_reconnect_delays() -> None:
    delay, initial, cap = httpbase.reconnect_delay, httpbase.STREAM_RETRY_INITIAL, httpbase.STREAM_RETRY_MAX
    assert delay(None, 0) == initial  # a stream that brought something, no `retry:`
    assert delay(250, 0) == 0.25  # the server's `retry:` honoured
    assert delay(0, 0) == 0.0
    assert [delay(None, n) for n in (1, 2, 3)] == [initial, 2 * initial, 4 * initial]
    assert delay(0, 1) == initial  # `retry: 0` and nothing coming through: no loop
    assert delay(5000, 2) == 10.0  # never sooner than `retry:`
    assert delay(None, 50) == cap
    assert delay(60_000, 9) == 60.0  # the cap is never below the server's `retry:`


class FakeStreamableServer:
    """A scripted streamable-HTTP server: JSON answers to POSTs, and one scripted SSE body per GET (closed after
    it, except the last, which stays open); `get_status` other than 200 refuses every GET."""

    def __init__(self, get_bodies: list[bytes], *, get_status: int = 200) -> None:
        self.get_bodies = get_bodies
        self.get_status = get_status
        self.gets = 0

    async def handle(self, request: RawRequest, writer: asyncio.StreamWriter) -> None:
        if request.method == "GET":
            await self._get(writer)
            return
        if request.method == "DELETE":
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
            return
        message = json.loads(request.body)
        if "id" not in message:
            writer.write(b"HTTP/1.1 202 Accepted\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
            return
        result: dict[str, Any] = {}
        if message["method"] == "initialize":
            result = {
                "protocolVersion": "2025-11-25",
                "capabilities": {"tools": {"listChanged": True}},
                "serverInfo": {"name": "fake", "version": "1"},
            }
        body = json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}).encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: application/json\r\n"
            + b"Mcp-Session-Id: fake-session\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )

    async def _get(self, writer: asyncio.StreamWriter) -> None:
        if self.get_status != 200:
            writer.write(
                f"HTTP/1.1 {self.get_status} Refused\r\nConnection: close\r\nContent-Length: 0\r\n\r\n".encode()
            )
            return
        index, self.gets = self.gets, self.gets + 1
        writer.write(SSE_HEAD + (self.get_bodies[index] if index < len(self.get_bodies) else b""))
        await writer.drain()
        if index >= len(self.get_bodies) - 1:
            await asyncio.Event().wait()  # the last stream stays open


# --- a POST stream closed before its response (SEP-1699) -------------------------------------------------------------


def polling(server: MCPServer) -> None:
    @server.tool()
    async def long_job(ctx: Context) -> str:
        await ctx.report_progress(1, 2)
        await ctx.close_sse_stream()  # the client must come back with GET + Last-Event-ID
        await ctx.report_progress(2, 2)
        return "job done"


async def test_a_post_stream_closed_before_the_response_is_resumed() -> None:
    store = MemoryEventStore()
    alpha = Upstream(
        "alpha", json_response=False, customize=polling, app_options={"event_store": store, "retry_interval": 20}
    )
    related = Recorder()
    async with running(alpha), session_for(alpha.url, "streamable-http") as (session, client):
        await session.connect()
        result = await session.request(
            "tools/call",
            {"name": "long_job", "arguments": {}, "_meta": {"progressToken": "p1"}},
            timeout=WAIT,
            on_related=related,
        )
        assert result["content"][0]["text"] == "job done"
        resumes = [r for r in alpha.requests if r.method == "GET" and "last-event-id" in r.headers]
        assert len(resumes) == 1
        # Resumed from the call stream's priming event (an id and no data), the last event before the cut.
        primed = {event_id for event_id, _, message in store.events if message is None}
        assert resumes[0].headers["last-event-id"] in primed
        # Progress from before and after the cut reached the caller, not the session's default client side.
        progress = [m["params"]["progress"] for m in related.messages if m["method"] == "notifications/progress"]
        assert progress == [1, 2]
        assert "notifications/progress" not in client.methods()


class CutMidEvent(FakeStreamableServer):
    """A call's SSE stream cut in the middle of the answer's event (after its `id:` line): a GET with
    `Last-Event-ID` gets every event after that id again, as a server with an event store sends them."""

    EVENTS: ClassVar = [
        (b"e1", b"retry: 20\nid: e1\ndata:\n\n"),  # a priming event
        (b"e2", b'id: e2\nevent: message\ndata: {"jsonrpc":"2.0","id":2,"result":{"content":[],"isError":false}}\n\n'),
    ]

    def __init__(self) -> None:
        super().__init__([], get_status=405)
        self.resumed_after: list[str] = []

    async def handle(self, request: RawRequest, writer: asyncio.StreamWriter) -> None:
        if request.method == "GET" and "last-event-id" in request.headers:
            last = request.headers["last-event-id"].encode()
            self.resumed_after.append(last.decode())
            ids = [event_id for event_id, _ in self.EVENTS]
            after = ids.index(last) + 1 if last in ids else 0
            writer.write(SSE_HEAD + b"".join(event for _, event in self.EVENTS[after:]))
            return
        if request.method == "POST" and json.loads(request.body).get("method") == "tools/call":
            whole = b"".join(event for _, event in self.EVENTS)
            writer.write(SSE_HEAD + whole[: whole.index(b'"id":2,') + 10])  # then the connection ends
            return
        await super().handle(request, writer)


async def test_a_stream_cut_mid_event_is_resumed_from_the_last_whole_event() -> None:
    # The id of an event that never ended is not the last event id: resuming after it would skip the answer. And
    # the half line the cut left is not glued onto the event the server sends again.
    server = CutMidEvent()
    async with ScriptedHttp(server.handle) as http, session_for(f"{http.origin}/mcp", "streamable-http") as (s, _):
        await s.connect()
        result = await s.request("tools/call", {"name": "x", "arguments": {}}, timeout=WAIT)
        assert result == {"content": [], "isError": False}
        assert server.resumed_after == ["e1"]


# --- through mcpxd: an agent's view ---------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["sse", "auto"])
async def test_an_agent_lists_and_calls_a_legacy_sse_upstreams_tools(sandbox: Sandbox, transport: str) -> None:
    legacy = LegacyUpstream("legacy")
    sandbox.write_config(upstream_toml("legacy", legacy.url, transport=transport))
    async with serving(legacy), running_daemon(sandbox), agent(sandbox) as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
        assert names == {f"legacy__{name}" for name in TOOLS}
        assert text_of(await client.call_tool("legacy__echo", {"text": "hello"})) == "legacy:hello"
        first = [(r.method, r.path) for r in legacy.requests[:2]]
        if transport == "auto":
            # The fallback really happened: initialize POSTed to the URL was refused (405), then the stream opened.
            assert first == [("POST", "/sse"), ("GET", "/sse")]
            assert legacy.requests[0].headers["content-type"] == "application/json"
        else:
            assert first[0] == ("GET", "/sse")
            assert not legacy.seen("POST", "/sse")


async def test_a_dropped_legacy_stream_is_reconnected_and_the_next_call_works(sandbox: Sandbox) -> None:
    legacy = LegacyUpstream("legacy")
    sandbox.write_config(FAST_RECONNECT + upstream_toml("legacy", legacy.url, transport="sse"))
    async with serving(legacy), running_daemon(sandbox), agent(sandbox) as client:
        assert text_of(await client.call_tool("legacy__echo", {"text": "1"})) == "legacy:1"
        legacy.drop_streams()
        await legacy.wait_for(lambda: len(legacy.seen("GET", "/sse")) == 2)  # the supervisor reconnected
        async with asyncio.timeout(WAIT):
            # The handshake and the lists that follow end with the state set: each round is one status call.
            while (await upstream_status(sandbox))["legacy"]["state"] != "ready":
                pass
        assert text_of(await client.call_tool("legacy__echo", {"text": "2"})) == "legacy:2"


def growing(server: MCPServer) -> None:
    """A tool `grow` that adds the tool `grown` and tells the client, on no request's stream (the SDK sends
    `tools/list_changed` on the standalone stream: the GET stream, or the one stream of HTTP+SSE)."""

    @server.tool()
    async def grow(ctx: Context) -> str:
        if "grown" not in {tool.name for tool in await server.list_tools()}:
            server.tool(name="grown")(lambda: "grown")
        await ctx.session.send_tool_list_changed()
        return "grew"


@pytest.mark.parametrize("transport", ["streamable-http", "sse"])
async def test_a_list_change_outside_any_call_reaches_the_agent(sandbox: Sandbox, transport: str) -> None:
    server: Upstream | LegacyUpstream
    if transport == "sse":
        server = LegacyUpstream("alpha", customize=growing)
        serve: contextlib.AbstractAsyncContextManager[Any] = serving(server)
    else:
        server = Upstream("alpha", json_response=True, customize=growing)
        serve = running(server)
    sandbox.write_config(upstream_toml("alpha", server.url, transport=transport))
    changed, on_message = change_watcher()
    async with serve, running_daemon(sandbox), agent(sandbox, message_handler=on_message) as client:
        assert "alpha__grown" not in {tool.name for tool in (await client.list_tools()).tools}
        async with asyncio.timeout(WAIT):
            while True:
                # Asked again until heard: the SDK drops standalone messages until its GET stream is registered.
                assert text_of(await client.call_tool("alpha__grow", {})) == "grew"
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await changed.wait()
                changed.clear()
                if "alpha__grown" in {tool.name for tool in (await client.list_tools()).tools}:
                    break
        assert text_of(await client.call_tool("alpha__grown", {})) == "grown"
        if isinstance(server, Upstream):
            assert any(r.method == "GET" for r in server.requests)


async def upstream_status(sandbox: Sandbox) -> dict[str, dict[str, Any]]:
    code, out, _ = await mcpxctl(sandbox, "status", "--json")
    assert code == 0
    return {upstream["name"]: upstream for upstream in json.loads(out)["upstreams"]}
