"""The streamable-HTTP fast path (`HttpSession.start_request`): a call written at once on a pooled connection and
its JSON answer taken in the connection's callbacks, without a task; everything else handed to the general path,
which must then behave exactly as `request` does. A real SDK upstream where the answer is the point, and a scripted
keep-alive server where the fault is: a body that comes after its headers, a connection the server drops as the
call is sent, no answer at all, a caller that gives up, an HTTP error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from mcpx.auth.credentials import NoCredential
from mcpx.config.load import parse_config
from mcpx.config.model import UpstreamConfig
from mcpx.downstream.peercred import PeerCredentials
from mcpx.downstream.session import AgentSession
from mcpx.errors import UpstreamHTTPError, UpstreamInterrupted, UpstreamTimeout
from mcpx.router.router import Router
from mcpx.upstream.h1 import HttpClient
from mcpx.upstream.http import HttpSession
from tests.support.daemon import upstream_toml
from tests.support.inprocess import NoControl
from tests.support.scripted_http import LoopbackServer, read_request
from tests.support.upstream import Upstream, running

WAIT = 10.0


class Recorder:
    """The client side of the session under test: keeps the server's notifications; asks nothing."""

    agent: object = None

    def __init__(self) -> None:
        self.notified: list[dict[str, Any]] = []
        self.got_one = asyncio.Event()

    def notify(self, message: dict[str, Any]) -> None:
        self.notified.append(message)
        self.got_one.set()

    async def ask(self, method: str, params: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
        raise AssertionError(f"unexpected server request {method}")


@contextlib.asynccontextmanager
async def http_session(
    url: str, *, timeout: float = WAIT, client: Recorder | None = None
) -> AsyncIterator[HttpSession]:
    http = HttpClient(connect_timeout=5.0)
    config = UpstreamConfig(name="alpha", url=url, transport="streamable-http", timeout=timeout)
    session = HttpSession(config, http, NoCredential(), max_message_bytes=1 << 20, client=client or Recorder())
    try:
        await session.connect()
        yield session
    finally:
        await session.close()
        await http.close()


class Started:
    """A call started on the fast path, and what its `on_settled` was told."""

    def __init__(self, session: HttpSession, text: str, timeout: float) -> None:
        self.told: list[tuple[Any, BaseException | None]] = []
        self._ended = asyncio.Event()
        params = {"name": "echo", "arguments": {"text": text}}
        future = session.start_request("tools/call", params, timeout=timeout, on_settled=self._settled)
        assert future is not None, "the fast path did not take a call on an idle pooled connection"
        self.future = future

    def _settled(self, result: Any, error: BaseException | None) -> None:
        self.told.append((result, error))
        self._ended.set()

    async def outcome(self) -> Any:
        """The result it was told, or the error raised."""
        async with asyncio.timeout(WAIT):
            await self._ended.wait()
        assert len(self.told) == 1, self.told
        result, error = self.told[0]
        if error is not None:
            raise error
        return result


def started(session: HttpSession, text: str, *, timeout: float = WAIT) -> Started:
    return Started(session, text, timeout)


def not_started(session: HttpSession, text: str) -> bool:
    params = {"name": "echo", "arguments": {"text": text}}
    return session.start_request("tools/call", params, timeout=WAIT, on_settled=lambda result, error: None) is None


def text_of(result: Any) -> str:
    text = result["content"][0]["text"]
    assert isinstance(text, str)
    return text


@contextlib.contextmanager
def counting_tasks() -> Iterator[list[object]]:
    """The coroutines of every task mcpx creates meanwhile (the upstream, in this loop too, has its own)."""
    loop = asyncio.get_running_loop()
    made: list[object] = []

    def counting(
        loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any] | Generator[Any, None, Any], /
    ) -> asyncio.Future[Any]:
        code = getattr(coro, "cr_code", None)
        if code is not None and "/mcpx/" in code.co_filename:
            made.append(coro)
        return asyncio.Task(coro, loop=loop)

    loop.set_task_factory(counting)
    try:
        yield made
    finally:
        loop.set_task_factory(None)


# --- a real SDK upstream ---------------------------------------------------------------------------------------------


async def test_a_json_answer_is_taken_without_a_task() -> None:
    alpha = Upstream("alpha", json_response=True)
    async with running(alpha), http_session(alpha.url) as session:
        assert text_of(await session.request("tools/call", {"name": "echo", "arguments": {"text": "0"}}, timeout=WAIT))
        with counting_tasks() as made:
            result = await started(session, "fast").outcome()
        assert text_of(result) == "alpha:fast"
        assert made == []  # not one task of mcpx for the call


async def test_no_idle_connection_means_no_fast_path() -> None:
    alpha = Upstream("alpha", json_response=True)
    async with running(alpha), http_session(alpha.url) as session:
        first = started(session, "one")
        # The only pooled connection carries `first`: a second call cannot start at once and says so.
        assert not_started(session, "two")
        assert text_of(await first.outcome()) == "alpha:one"


async def test_a_server_answering_in_sse_is_not_tried_on_the_fast_path() -> None:
    alpha = Upstream("alpha", json_response=False)
    async with running(alpha), http_session(alpha.url) as session:
        assert text_of(await session.request("tools/call", {"name": "echo", "arguments": {"text": "a"}}, timeout=WAIT))
        assert not_started(session, "b")


# --- a scripted keep-alive server ------------------------------------------------------------------------------------

CallHandler = Callable[[dict[str, Any], asyncio.StreamWriter], Awaitable[bool]]
ResumeHandler = Callable[[str, asyncio.StreamWriter], None]


def json_answer(payload: dict[str, Any], *, extra: str = "") -> tuple[bytes, bytes]:
    body = json.dumps(payload).encode()
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode(), body


def echo_answer(message: dict[str, Any]) -> tuple[bytes, bytes]:
    text = f"scripted:{message['params']['arguments']['text']}"
    return json_answer({"jsonrpc": "2.0", "id": message["id"], "result": {"content": [{"type": "text", "text": text}]}})


class KeepAlive(LoopbackServer):
    """An MCP server over HTTP/1.1 keep-alive on 127.0.0.1, written by hand: it does the handshake itself, records
    every message POSTed to it, and lets the test answer `tools/call` (`on_call` returns False to drop the
    connection without a word)."""

    def __init__(self, on_call: CallHandler, on_resume: ResumeHandler | None = None) -> None:
        super().__init__()
        self.on_call = on_call
        self.on_resume = on_resume  # a GET with Last-Event-ID
        self.messages: list[dict[str, Any]] = []
        self.refused_gets = 0

    @property
    def url(self) -> str:
        return f"{self.origin}/mcp"

    def methods(self) -> list[str]:
        return [str(message.get("method")) for message in self.messages]

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await self._one(reader, writer):
            pass

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        request = await read_request(reader)
        headers = request.headers
        if request.method == "GET" and "last-event-id" in headers and self.on_resume is not None:
            self.on_resume(headers["last-event-id"], writer)
            return True
        if request.method in ("GET", "DELETE"):
            writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            async with self._changed:
                self.refused_gets += request.method == "GET"
                self._changed.notify_all()
            return True
        message = json.loads(request.body)
        async with self._changed:
            self.messages.append(message)
            self._changed.notify_all()
        if message.get("method") == "initialize":
            result = {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}}, "serverInfo": {"name": "s"}}
            head_bytes, body = json_answer({"jsonrpc": "2.0", "id": message["id"], "result": result})
            writer.write(head_bytes.replace(b"\r\n\r\n", b"\r\nMcp-Session-Id: s-1\r\n\r\n") + body)
            return True
        if "id" not in message:
            writer.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
            return True
        return await self.on_call(message, writer)


async def warm(server: KeepAlive, session: HttpSession) -> None:
    """Once the session's GET stream was refused, one call through the general path, so that a keep-alive
    connection waits in the pool."""
    await server.wait_for(lambda: server.refused_gets == 1)
    assert text_of(await session.request("tools/call", {"name": "echo", "arguments": {"text": "w"}}, timeout=WAIT))


async def test_a_body_that_comes_after_its_headers_is_waited_for_in_callbacks() -> None:
    release_body = asyncio.Event()

    async def headers_first(message: dict[str, Any], writer: asyncio.StreamWriter) -> bool:
        head, body = echo_answer(message)
        if message["params"]["arguments"]["text"] == "w":
            writer.write(head + body)
            return True
        writer.write(head)
        await writer.drain()
        await release_body.wait()
        writer.write(body)
        return True

    async with KeepAlive(headers_first) as server, http_session(server.url) as session:
        await warm(server, session)
        connections = server.connections
        call = started(session, "late body")
        await server.wait_for(lambda: len(server.methods()) >= 4)  # initialize, initialized, warm-up, this call
        assert not call.told
        release_body.set()
        assert text_of(await call.outcome()) == "scripted:late body"
        assert server.connections == connections  # a pooled connection carried it


def drop_the_first(text: str, dropped: list[dict[str, Any]]) -> CallHandler:
    """A handler that closes the connection without a byte (what a server timing out an idle connection does, or
    one that died on the request) the first time it gets `text`, and echoes everything else."""

    async def handle(message: dict[str, Any], writer: asyncio.StreamWriter) -> bool:
        if message["params"]["arguments"]["text"] == text and not dropped:
            dropped.append(message)
            return False
        head, body = echo_answer(message)
        writer.write(head + body)
        return True

    return handle


async def test_a_tool_call_whose_pooled_connection_drops_before_any_answer_is_not_sent_again() -> None:
    # RFC 9110 §9.2.2: the server may have run it before dying; a second copy could create or send twice.
    dropped: list[dict[str, Any]] = []
    async with KeepAlive(drop_the_first("again", dropped)) as server, http_session(server.url) as session:
        await warm(server, session)
        with pytest.raises(UpstreamInterrupted, match="may or may not have run"):
            await started(session, "again").outcome()
        calls = [m for m in server.messages if m.get("method") == "tools/call"]
        assert [m["id"] for m in calls[1:]] == [dropped[0]["id"]]  # sent once
        # The upstream is not taken for broken: the next call goes through.
        params = {"name": "echo", "arguments": {"text": "b"}}
        assert text_of(await session.request("tools/call", params, timeout=WAIT)) == "scripted:b"


async def test_a_request_that_may_be_repeated_is_sent_once_more_when_its_pooled_connection_drops() -> None:
    dropped: list[dict[str, Any]] = []
    async with KeepAlive(drop_the_first("again", dropped)) as server, http_session(server.url) as session:
        await warm(server, session)
        connections = server.connections
        params = {"name": "echo", "arguments": {"text": "again"}}
        assert text_of(await session.request("prompts/get", params, timeout=WAIT)) == "scripted:again"
        gets = [m for m in server.messages if m.get("method") == "prompts/get"]
        assert [m["id"] for m in gets] == [dropped[0]["id"], dropped[0]["id"]]  # the same request, sent twice
        assert server.connections == connections + 1


async def test_no_answer_times_out_and_the_upstream_is_told() -> None:
    async def never(message: dict[str, Any], writer: asyncio.StreamWriter) -> bool:
        if message["params"]["arguments"]["text"] == "w":
            head, body = echo_answer(message)
            writer.write(head + body)
            return True
        await asyncio.Event().wait()  # until the test ends
        return False

    async with KeepAlive(never) as server, http_session(server.url, timeout=0.3) as session:
        await warm(server, session)
        call = started(session, "hang", timeout=0.3)
        with pytest.raises(UpstreamTimeout, match=r"no answer to tools/call within 0\.3 s"):
            await call.outcome()
        call_id = server.messages[-1]["id"]
        await server.wait_for(lambda: "notifications/cancelled" in server.methods())
        cancelled = next(m for m in server.messages if m.get("method") == "notifications/cancelled")
        assert cancelled["params"] == {"requestId": call_id, "reason": "timed out"}


async def test_a_caller_that_gives_up_cancels_upstream_and_the_connection_is_not_reused() -> None:
    async def hold_then_answer(message: dict[str, Any], writer: asyncio.StreamWriter) -> bool:
        if message["params"]["arguments"]["text"] != "held":
            head, body = echo_answer(message)
            writer.write(head + body)
            return True
        await asyncio.Event().wait()
        return False

    async with KeepAlive(hold_then_answer) as server, http_session(server.url) as session:
        await warm(server, session)
        await session.request("tools/call", {"name": "echo", "arguments": {"text": "w"}}, timeout=WAIT)
        connections = server.connections
        call = started(session, "held")
        await server.wait_for(lambda: server.messages[-1].get("params", {}).get("arguments", {}).get("text") == "held")
        call_id = server.messages[-1]["id"]
        call.future.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call.outcome()
        await server.wait_for(lambda: "notifications/cancelled" in server.methods())
        cancelled = next(m for m in server.messages if m.get("method") == "notifications/cancelled")
        assert cancelled["params"] == {"requestId": call_id, "reason": "cancelled by the client"}
        # The abandoned connection is closed, not pooled: the next call has a connection of its own.
        assert text_of(
            await session.request("tools/call", {"name": "echo", "arguments": {"text": "next"}}, timeout=WAIT)
        )
        assert server.connections == connections + 1


async def test_an_http_error_is_reported_as_the_general_path_reports_it() -> None:
    async def fail(message: dict[str, Any], writer: asyncio.StreamWriter) -> bool:
        if message["params"]["arguments"]["text"] == "w":
            head, body = echo_answer(message)
            writer.write(head + body)
            return True
        error = json.dumps({"jsonrpc": "2.0", "id": message["id"], "error": {"code": -32000, "message": "on fire"}})
        writer.write(
            f"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(error)}\r\n\r\n{error}".encode()
        )
        return True

    async with KeepAlive(fail) as server, http_session(server.url) as session:
        await warm(server, session)
        with pytest.raises(UpstreamHTTPError) as raised:
            await started(session, "boom").outcome()
        assert "500" in str(raised.value) and "on fire" in str(raised.value)


def sse_answer(*events: bytes) -> bytes:
    """A whole SSE response (with its length: it is in once its headers are)."""
    body = b"".join(events)
    head = f"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def event(message: dict[str, Any], event_id: str | None = None) -> bytes:
    return (f"id: {event_id}\n" if event_id else "").encode() + b"data: " + json.dumps(message).encode() + b"\n\n"


def log_message(text: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": text}}


async def test_a_whole_sse_answer_is_taken_on_the_fast_path_with_the_messages_before_it() -> None:
    async def stream(message: dict[str, Any], writer: asyncio.StreamWriter) -> bool:
        head, body = echo_answer(message)
        if message["params"]["arguments"]["text"] == "w":
            writer.write(head + body)
        else:
            writer.write(sse_answer(event(log_message("working")), event(json.loads(body))))
        return True

    client = Recorder()
    async with KeepAlive(stream) as server, http_session(server.url, client=client) as session:
        await warm(server, session)
        with counting_tasks() as made:
            assert text_of(await started(session, "stream").outcome()) == "scripted:stream"
        assert made == []
        assert [m["params"]["data"] for m in client.notified] == ["working"]
        assert text_of(await started(session, "again").outcome()) == "scripted:again"  # still tried first


async def test_an_sse_stream_that_goes_on_is_read_by_the_general_path() -> None:
    go_on = asyncio.Event()

    async def slow_stream(message: dict[str, Any], writer: asyncio.StreamWriter) -> bool:
        head, body = echo_answer(message)
        if message["params"]["arguments"]["text"] in ("w", "json again"):
            writer.write(head + body)
            return True
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
        writer.write(event(log_message("working")))
        await writer.drain()
        await go_on.wait()
        writer.write(event(json.loads(body)))
        return False  # the stream ends with the connection

    client = Recorder()
    async with KeepAlive(slow_stream) as server, http_session(server.url, client=client) as session:
        await warm(server, session)
        call = started(session, "slow")
        async with asyncio.timeout(WAIT):
            await client.got_one.wait()  # the message came as it was sent, before the answer
        assert not call.told
        go_on.set()
        assert text_of(await call.outcome()) == "scripted:slow"
        assert [m["params"]["data"] for m in client.notified] == ["working"]  # routed once
        # This server answers in streams that go on: calls take the general path until it answers at once again.
        assert not_started(session, "x")
        await warm(server, session)
        assert text_of(await started(session, "json again").outcome()) == "scripted:json again"


async def test_a_whole_stream_without_the_answer_is_resumed_by_the_general_path() -> None:
    """SEP-1699: the server ends the POST's stream after a priming event; the answer comes on the resumed stream."""
    answers: dict[str, bytes] = {}

    async def prime_only(message: dict[str, Any], writer: asyncio.StreamWriter) -> bool:
        head, body = echo_answer(message)
        if message["params"]["arguments"]["text"] == "w":
            writer.write(head + body)
            return True
        answers["p-1"] = body
        writer.write(sse_answer(b"id: p-1\nretry: 1\ndata:\n\n"))
        return True

    def resume(last_event_id: str, writer: asyncio.StreamWriter) -> None:
        writer.write(sse_answer(event(json.loads(answers[last_event_id]), "p-2")))

    async with KeepAlive(prime_only, resume) as server, http_session(server.url) as session:
        await warm(server, session)
        assert text_of(await started(session, "polled").outcome()) == "scripted:polled"


# --- the whole path in the daemon ------------------------------------------------------------------------------------


async def test_an_agents_tool_call_to_a_json_upstream_runs_without_a_task_in_the_daemon(tmp_path: Path) -> None:
    """The guard for the daemon's hot path: the agent session, the router and the supervisor start a `tools/call`
    on the fast path (no task of mcpx's), and the answer reaches the agent under its own id."""
    alpha = Upstream("alpha", json_response=True)
    async with running(alpha):
        config = parse_config(upstream_toml("alpha", alpha.url), tmp_path / "config.toml")
        router = Router(config, tmp_path)
        await router.start()
        sent: list[bytes] = []
        answered = asyncio.Event()

        def send(data: bytes) -> None:
            sent.append(data)
            answered.set()

        session = AgentSession(router, NoControl(), send, PeerCredentials(uid=os.getuid(), pid=None))
        try:
            await router.wait_settled(WAIT)
            session.on_line(b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25"}}')
            call = b'{"jsonrpc":"2.0","id":"c-%d","method":"tools/call",'
            call += b'"params":{"name":"alpha__echo","arguments":{"text":"%d"}}}'
            session.on_line(call % (0, 0))  # warm-up: a keep-alive connection is pooled after it
            async with asyncio.timeout(WAIT):
                while b'"c-0"' not in sent[-1]:
                    answered.clear()
                    await answered.wait()
            with counting_tasks() as made:
                answered.clear()
                session.on_line(call % (1, 1))
                async with asyncio.timeout(WAIT):
                    await answered.wait()
            response = json.loads(sent[-1])
            assert response["id"] == "c-1" and response["result"]["content"][0]["text"] == "alpha:1"
            assert made == []
        finally:
            session.close()
            await router.stop()
