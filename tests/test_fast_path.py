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
from mcpx.errors import UpstreamHTTPError, UpstreamTimeout
from mcpx.router.router import Router
from mcpx.upstream.h1 import HttpClient
from mcpx.upstream.http import HttpSession
from tests.support.daemon import upstream_toml
from tests.support.upstream import Upstream, running

WAIT = 10.0


class Quiet:
    """The client side of the session under test (no server messages are expected here)."""

    agent: object = None

    def notify(self, message: dict[str, Any]) -> None:
        raise AssertionError(f"unexpected server message {message}")

    async def ask(self, method: str, params: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
        raise AssertionError(f"unexpected server request {method}")


@contextlib.asynccontextmanager
async def http_session(url: str, *, timeout: float = WAIT) -> AsyncIterator[HttpSession]:
    http = HttpClient(connect_timeout=5.0)
    config = UpstreamConfig(name="alpha", url=url, transport="streamable-http", timeout=timeout)
    session = HttpSession(config, http, NoCredential(), max_message_bytes=1 << 20, client=Quiet())
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


def json_answer(payload: dict[str, Any], *, extra: str = "") -> tuple[bytes, bytes]:
    body = json.dumps(payload).encode()
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode(), body


def echo_answer(message: dict[str, Any]) -> tuple[bytes, bytes]:
    text = f"scripted:{message['params']['arguments']['text']}"
    return json_answer({"jsonrpc": "2.0", "id": message["id"], "result": {"content": [{"type": "text", "text": text}]}})


class KeepAlive:
    """An MCP server over HTTP/1.1 keep-alive on 127.0.0.1, written by hand: it does the handshake itself, records
    every message POSTed to it, and lets the test answer `tools/call` (`on_call` returns False to drop the
    connection without a word)."""

    def __init__(self, on_call: CallHandler) -> None:
        self.on_call = on_call
        self.messages: list[dict[str, Any]] = []
        self.connections = 0
        self.refused_gets = 0
        self._changed = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/mcp"

    async def __aenter__(self) -> KeepAlive:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT), self._changed:
            await self._changed.wait_for(predicate)

    def methods(self) -> list[str]:
        return [str(message.get("method")) for message in self.messages]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            while await self._one(reader, writer):
                pass
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            pass  # the server is closing (a cancelled connection task would be logged as an error by asyncio)
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        request_line, *lines = head.split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
        if request_line.startswith("GET") or request_line.startswith("DELETE"):
            writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            async with self._changed:
                self.refused_gets += request_line.startswith("GET")
                self._changed.notify_all()
            return True
        message = json.loads(await reader.readexactly(int(headers["content-length"])))
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


async def test_a_pooled_connection_dropped_before_any_answer_is_sent_once_more() -> None:
    dropped: list[int] = []

    async def drop_the_first_real_call(message: dict[str, Any], writer: asyncio.StreamWriter) -> bool:
        if message["params"]["arguments"]["text"] == "again" and not dropped:
            dropped.append(message["id"])
            return False  # close without a byte: what a server timing out an idle connection does
        head, body = echo_answer(message)
        writer.write(head + body)
        return True

    async with KeepAlive(drop_the_first_real_call) as server, http_session(server.url) as session:
        await warm(server, session)
        connections = server.connections
        assert text_of(await started(session, "again").outcome()) == "scripted:again"
        calls = [m for m in server.messages if m.get("method") == "tools/call"]
        assert [m["id"] for m in calls[1:]] == [dropped[0], dropped[0]]  # the same request, sent twice
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


async def test_an_sse_answer_is_handed_to_the_general_path() -> None:
    async def stream_when_asked(message: dict[str, Any], writer: asyncio.StreamWriter) -> bool:
        head, body = echo_answer(message)
        if message["params"]["arguments"]["text"] == "stream":
            body = b"event: message\ndata: " + body + b"\n\n"
            head = f"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        writer.write(head + body)
        return True

    async with KeepAlive(stream_when_asked) as server, http_session(server.url) as session:
        await warm(server, session)
        assert text_of(await started(session, "stream").outcome()) == "scripted:stream"
        # The server answers in SSE now: calls take the general path until it answers in JSON again.
        assert not_started(session, "x")
        await warm(server, session)
        assert text_of(await started(session, "json again").outcome()) == "scripted:json again"


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


class NoControl:
    """The daemon's control operations, which these tests never reach."""

    def status(self) -> dict[str, Any]:
        raise AssertionError("not in this test")

    async def reload(self) -> dict[str, Any]:
        raise AssertionError("not in this test")

    async def logout(self, upstream: str) -> dict[str, Any]:
        raise AssertionError("not in this test")

    async def login(self, upstream: str, action: str, response: str | None, timeout: object = None) -> dict[str, Any]:
        raise AssertionError("not in this test")
