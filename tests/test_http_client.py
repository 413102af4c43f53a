"""The upstream HTTP/1.1 client (`mcpx.upstream.h1`) against scripted raw servers on loopback.

Well-behaved exchanges are covered end to end by every other test (SDK servers under uvicorn); here are the
edges a real server rarely shows on demand: keep-alive reuse, streaming, bodies ended by EOF, connections
closed at bad moments, garbage, oversized heads and bodies, header injection.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from mcpx.upstream.h1 import (
    KEEPALIVE_IDLE,
    KEEPALIVE_INTERVAL,
    KEEPALIVE_PROBES,
    BodyTooLarge,
    ClosedBeforeAnswer,
    ConnectError,
    ConnectionClosed,
    Deadline,
    HttpClient,
    HttpClientError,
    InvalidResponse,
    Target,
    _Connection,
    encode_request,
)
from tests.support.scripted_http import LoopbackServer, read_request

# How a scripted server serves each connection: the server (to read requests), then the connection's streams.
Serve = Callable[["ScriptedServer", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class ScriptedServer(LoopbackServer):
    """Keep-alive: `serve` answers every request of a connection as the test scripts it."""

    def __init__(self, serve: Serve) -> None:
        super().__init__()
        self.serve = serve
        self.requests: list[bytes] = []

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        request = await read_request(reader)
        self.requests.append(request.raw)
        return request.body

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.serve(self, reader, writer)


@asynccontextmanager
async def scripted(serve: Serve) -> AsyncIterator[tuple[ScriptedServer, Target]]:
    async with ScriptedServer(serve) as server:
        yield server, Target.parse(f"{server.origin}/mcp?x=1")


def ok(body: bytes, extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode()
        + body
    )


@pytest.fixture
async def client() -> AsyncIterator[HttpClient]:
    http = HttpClient(connect_timeout=5)
    yield http
    await http.close()


async def test_keep_alive_connection_is_reused(client: HttpClient) -> None:
    async def serve(server: ScriptedServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            body = await server.read_request(reader)
            writer.write(ok(b"echo:" + body))

    async with scripted(serve) as (server, target):
        for index in range(3):
            response = await client.request("POST", target, {"Content-Type": "application/json"}, b"%d" % index)
            assert response.status == 200
            assert response.headers["content-type"] == "application/json"
            assert await response.read(1024) == b"echo:%d" % index
            response.release()
    assert server.connections == 1
    assert server.requests[0].startswith(b"POST /mcp?x=1 HTTP/1.1\r\nHost: 127.0.0.1:")


async def test_connections_probe_a_silent_server_with_tcp_keepalive(client: HttpClient) -> None:
    # A server that vanishes without closing (a laptop that slept, a NAT that forgot the connection) would leave a
    # quiet response, such as the GET stream, waiting forever; the kernel's probes end it instead.
    async def serve(server: ScriptedServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(ok(b"{}"))
        await reader.read()

    async with scripted(serve) as (_, target):
        response = await client.request("POST", target, {"Content-Type": "application/json"}, b"{}")
        transport = response._connection._transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == KEEPALIVE_INTERVAL
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == KEEPALIVE_PROBES
        if sys.platform == "darwin":
            idle = socket.TCP_KEEPALIVE  # (macOS's name for it)
        else:
            idle = socket.TCP_KEEPIDLE
        assert sock.getsockopt(socket.IPPROTO_TCP, idle) == KEEPALIVE_IDLE
        response.release()


async def test_chunked_body_arrives_as_it_is_sent(client: HttpClient) -> None:
    second_may_go = asyncio.Event()

    async def serve(server: ScriptedServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"6\r\nfirst\n\r\n")
        await second_may_go.wait()
        writer.write(b"7\r\nsecond\n\r\n0\r\n\r\n")

    async with scripted(serve) as (_, target):
        response = await client.request("POST", target, {}, b"{}")
        assert response.content_type == "text/event-stream"
        chunks = response.chunks()
        assert await anext(chunks) == b"first\n"
        second_may_go.set()
        assert await anext(chunks) == b"second\n"
        with pytest.raises(StopAsyncIteration):
            await anext(chunks)
        assert response.at_eof
        response.release()


async def test_body_delimited_by_end_of_connection(client: HttpClient) -> None:
    async def serve(server: ScriptedServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{"a":')
        await writer.drain()
        writer.write(b"1}")

    async with scripted(serve) as (_, target):
        response = await client.request("POST", target, {}, b"{}")
        assert await response.read(1024) == b'{"a":1}'
        response.release()


async def test_pooled_connection_closed_by_the_server_is_replaced(client: HttpClient) -> None:
    async def serve(server: ScriptedServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(ok(b"one"))
        await writer.drain()
        # Then close the idle keep-alive connection, as servers do after their idle timeout.

    async with scripted(serve) as (server, target):
        first = await client.request("POST", target, {}, b"{}")
        assert await first.read(100) == b"one"
        first.release()
        # Whether or not the close has been seen when the next request goes out, it must succeed.
        second = await client.request("POST", target, {}, b"{}")
        assert await second.read(100) == b"one"
        second.release()
    assert server.connections == 2
    assert len(server.requests) == 2


async def test_a_request_that_must_not_be_repeated_is_not_sent_again_when_a_pooled_connection_drops(
    client: HttpClient,
) -> None:
    async def serve(server: ScriptedServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(ok(b"one"))
        await server.read_request(reader)  # then close without a byte: the server may or may not have acted on it

    async with scripted(serve) as (server, target):
        first = await client.request("POST", target, {}, b"{}")
        assert await first.read(100) == b"one"
        first.release()
        with pytest.raises(ClosedBeforeAnswer):
            await client.request("POST", target, {}, b"{}", replayable=False)
    assert len(server.requests) == 2  # not a third: it was not sent again
    assert server.connections == 1


async def test_connections_are_reused_only_well_within_the_idle_timeout_the_server_showed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    client = HttpClient(connect_timeout=5, clock=lambda: now[0])
    lost = asyncio.Event()
    connection_lost = _Connection.connection_lost

    def lose_and_tell(connection: _Connection, exc: Exception | None) -> None:
        connection_lost(connection, exc)
        lost.set()

    monkeypatch.setattr(_Connection, "connection_lost", lose_and_tell)
    close_the_first = asyncio.Event()

    async def serve(server: ScriptedServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first_connection = server.connections == 1
        while True:
            await server.read_request(reader)
            writer.write(ok(b"ok"))
            if first_connection:
                await close_the_first.wait()  # a server closing a connection idle for its timeout
                return

    async def call() -> None:
        response = await client.request("POST", target, {}, b"{}")
        assert await response.read(100) == b"ok"
        response.release()

    try:
        async with scripted(serve) as (server, target):
            await call()
            now[0] += 10.0
            close_the_first.set()
            async with asyncio.timeout(10):
                await lost.wait()  # the server closed it after 10 s idle: reuse only within 7.5 s
            await call()
            assert server.connections == 2
            now[0] += 7.0
            await call()
            assert server.connections == 2  # reused
            now[0] += 8.0
            await call()
            assert server.connections == 3  # not reused: the server would be about to close it
    finally:
        await client.close()


async def test_connection_lost_mid_body_is_an_error(client: HttpClient) -> None:
    async def serve(server: ScriptedServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")

    async with scripted(serve) as (_, target):
        response = await client.request("POST", target, {}, b"{}")
        with pytest.raises(ConnectionClosed):
            await response.read(1000)
        response.release()


async def test_connection_lost_before_any_answer_is_not_resent(client: HttpClient) -> None:
    async def serve(server: ScriptedServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)  # read it, then hang up without answering

    async with scripted(serve) as (server, target):
        with pytest.raises(ConnectionClosed):
            await client.request("POST", target, {}, b"{}")
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "answer",
    [
        b"this is not http\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n",
    ],
    ids=["garbage", "oversized-head", "bad-length"],
)
async def test_invalid_responses_are_refused(client: HttpClient, answer: bytes) -> None:
    async def serve(server: ScriptedServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(answer)
        await reader.read()

    async with scripted(serve) as (_, target):
        with pytest.raises(InvalidResponse):
            await client.request("POST", target, {}, b"{}")


async def test_a_header_line_that_never_ends_is_refused_at_the_limit(client: HttpClient) -> None:
    # The parser keeps an unfinished header line whole (copying it at every read): the client counts the head's
    # bytes itself and refuses it past the limit, long before the server stops sending.
    sent = 0

    async def serve(server: ScriptedServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        for _ in range(1024):  # up to 64 MiB, in 64 KiB pieces: stopped by the client's close long before
            writer.write(b"a" * 65536)
            await writer.drain()
            sent += 65536

    async with scripted(serve) as (_, target):
        with pytest.raises(InvalidResponse, match="headers larger than"):
            await client.request("POST", target, {}, b"{}")
    assert sent < 1024 * 65536  # (what the sockets held when the client closed, not all of it)


async def test_body_limits(client: HttpClient) -> None:
    async def serve(server: ScriptedServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.read_request(reader)
            body = b"x" * 5000
            if len(server.requests) == 1:
                writer.write(ok(body))
            else:  # no declared length: the limit must hold while streaming
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1388\r\n" + body + b"\r\n0\r\n\r\n")

    async with scripted(serve) as (_, target):
        for _ in range(2):
            response = await client.request("POST", target, {}, b"{}")
            with pytest.raises(BodyTooLarge):
                await response.read(4096)
            response.release()


async def test_an_abandoned_response_closes_its_connection(client: HttpClient) -> None:
    async def serve(server: ScriptedServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await reader.read()  # never ends the body

    async with scripted(serve) as (server, target):
        for _ in range(2):
            response = await client.request("POST", target, {}, b"{}")
            assert await anext(response.chunks()) == b"first"
            response.release()
    assert server.connections == 2


@pytest.mark.plain_python_only
async def test_large_body_is_delivered_whole_through_flow_control(
    client: HttpClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = bytes(range(256)) * (12 * 4096)  # 12 MiB: well past the high-water mark
    paused = asyncio.Event()
    pause_reading = _Connection.pause_reading

    def pause_and_tell(connection: _Connection) -> None:
        pause_reading(connection)
        paused.set()

    monkeypatch.setattr(_Connection, "pause_reading", pause_and_tell)

    async def serve(server: ScriptedServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(ok(body))
        await writer.drain()
        await reader.read()

    async with scripted(serve) as (_, target):
        response = await client.request("POST", target, {}, b"{}")
        chunks = response.chunks()
        first = await anext(chunks)
        # The network runs ahead of a reader that reads nothing more: reading pauses. Then the rest is read.
        async with asyncio.timeout(10):
            await paused.wait()
            rest = b"".join([chunk async for chunk in chunks])
        assert first + rest == body
        response.release()


async def test_unreachable_server_is_a_connect_error(client: HttpClient) -> None:
    async with scripted(lambda server, reader, writer: asyncio.sleep(0)) as (_, target):
        pass  # the listener is closed again: nothing listens on the port now
    with pytest.raises(ConnectError):
        await client.request("POST", target, {}, b"{}")


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nb", "a\0b"])
def test_header_injection_is_refused(value: str) -> None:
    target = Target.parse("https://example.test/mcp")
    with pytest.raises(HttpClientError, match="'Authorization' header") as caught:
        encode_request("POST", target, {"Authorization": value}, b"{}")
    assert value not in str(caught.value)


def test_targets() -> None:
    assert Target.parse("https://example.test/mcp").host_header == "example.test"
    assert Target.parse("https://example.test/mcp").port == 443
    assert Target.parse("http://[::1]:8080").host_header == "[::1]:8080"
    assert Target.parse("http://[::1]:8080").path == "/"
    with pytest.raises(ValueError, match="not an http"):
        Target.parse("ftp://example.test/")


def test_a_header_beyond_latin_1_is_a_client_error_not_a_crash() -> None:
    target = Target.parse("https://example.test/mcp")
    with pytest.raises(HttpClientError, match="beyond latin-1"):
        encode_request("POST", target, {"X-Team": "équipe ✓"}, b"{}")


async def test_a_large_declared_body_is_read_straight_into_one_buffer(client: HttpClient) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB, sent in pieces
    sent_first = asyncio.Event()

    async def serve(server: ScriptedServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        message = ok(body)
        writer.write(message[:1000])
        await writer.drain()
        sent_first.set()
        for start in range(1000, len(message), 100_000):
            writer.write(message[start : start + 100_000])
            await writer.drain()  # in pieces, each handed to the socket before the next
        while True:  # the connection stays usable
            request = await server.read_request(reader)
            writer.write(ok(b"again:" + request))

    async with scripted(serve) as (server, target):
        response = await client.request("POST", target, {}, b"{}")
        await sent_first.wait()
        received = await response.read(len(body))
        assert type(received) is bytearray
        assert received == body
        response.release()
        second = await client.request("POST", target, {}, b"2")
        assert await second.read(100) == b"again:2"
        second.release()
    assert server.connections == 1


async def test_a_large_declared_body_past_the_limit_is_refused_before_it_arrives(client: HttpClient) -> None:
    async def serve(server: ScriptedServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\nxx")
        await reader.read()

    async with scripted(serve) as (_, target):
        response = await client.request("POST", target, {}, b"{}")
        with pytest.raises(BodyTooLarge):
            await response.read(1_000_000)
        response.release()


async def test_a_large_declared_body_cut_short_is_an_error(client: HttpClient) -> None:
    async def serve(server: ScriptedServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n" + b"x" * 1000)

    async with scripted(serve) as (_, target):
        response = await client.request("POST", target, {}, b"{}")
        with pytest.raises(ConnectionClosed):
            await response.read(1_000_000)
        response.release()


@pytest.mark.plain_python_only
async def test_a_response_released_before_its_end_returns_its_connection_at_the_end(
    client: HttpClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    end_may_go = asyncio.Event()
    returned = asyncio.Event()
    checkin = client._checkin

    def checkin_and_tell(connection: _Connection) -> None:
        checkin(connection)
        returned.set()

    monkeypatch.setattr(client, "_checkin", checkin_and_tell)

    async def serve(server: ScriptedServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nfirst\n\r\n")
        await end_may_go.wait()
        writer.write(b"5\r\nmore\n\r\n0\r\n\r\n")
        while True:
            request = await server.read_request(reader)
            writer.write(ok(b"next:" + request))

    async with scripted(serve) as (server, target):
        response = await client.request("POST", target, {}, b"{}")
        assert await anext(response.chunks()) == b"first\n"
        response.release_at_end(5.0)
        end_may_go.set()
        async with asyncio.timeout(5):
            await returned.wait()
        second = await client.request("POST", target, {}, b"2")
        assert await second.read(100) == b"next:2"
        second.release()
    assert server.connections == 1


@pytest.mark.plain_python_only
async def test_a_response_released_before_an_end_that_never_comes_closes_its_connection(
    client: HttpClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = asyncio.Event()
    close = _Connection.close

    def close_and_tell(connection: _Connection) -> None:
        close(connection)
        closed.set()

    monkeypatch.setattr(_Connection, "close", close_and_tell)

    async def serve(server: ScriptedServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nfirst\n\r\n")
        await reader.read()  # never ends the body

    async with scripted(serve) as (_, target):
        response = await client.request("POST", target, {}, b"{}")
        assert await anext(response.chunks()) == b"first\n"
        response.release_at_end(0.05)
        assert not closed.is_set()
        async with asyncio.timeout(5):
            await closed.wait()
        assert response._connection.closed
    assert not client._idle.get(target.origin)


async def test_request_heads_are_reused_per_set_of_headers_and_a_changed_header_is_sent(client: HttpClient) -> None:
    async def serve(server: ScriptedServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            body = await server.read_request(reader)
            writer.write(ok(body))

    async with scripted(serve) as (server, target):
        for token in ("one", "one", "two", "one"):
            response = await client.request("POST", target, {"Authorization": f"Bearer {token}"}, b"{}")
            await response.read(100)
            response.release()
        with pytest.raises(HttpClientError, match="line break"):
            await client.request("POST", target, {"Authorization": "a\r\nX-Injected: 1"}, b"{}")
    sent = [next(line for line in head.split(b"\r\n") if line.startswith(b"Authorization")) for head in server.requests]
    assert sent == [b"Authorization: Bearer one", b"Authorization: Bearer one", b"Authorization: Bearer two",
                    b"Authorization: Bearer one"]  # fmt: skip
    assert all(request.endswith(b"Content-Length: 2\r\n\r\n{}") for request in server.requests)


async def test_headers_after_an_interim_response_and_repeated_headers(client: HttpClient) -> None:
    async def serve(server: ScriptedServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nContent-Type: text/html\r\nLink: </a>\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 Fine\r\nContent-Type: Application/JSON; charset=utf-8\r\nX-Twice: a\r\nContent-Length: 2\r\n"
            b"x-twice: b\r\n\r\n{}"
        )
        await reader.read()

    async with scripted(serve) as (_, target):
        response = await client.request("POST", target, {}, b"{}")
        assert (response.status, response.reason) == (200, "Fine")
        assert response.content_type == "application/json"
        assert response.content_length == 2
        assert response.headers == {
            "content-type": "Application/JSON; charset=utf-8",
            "x-twice": "a, b",
            "content-length": "2",
        }
        assert await response.read(10) == b"{}"
        response.release()


async def test_a_repeated_content_type_is_read_joined(client: HttpClient) -> None:
    async def serve(server: ScriptedServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Type: a/b\r\nContent-Length: 0\r\n\r\n"
        )
        await reader.read()

    async with scripted(serve) as (_, target):
        response = await client.request("POST", target, {}, b"{}")
        assert response.content_type == "text/event-stream, a/b"
        response.release()


# --- Deadline: asyncio.timeout's rules, cheaper ----------------------------------------------------------------


async def test_a_deadline_that_passes_ends_the_block_with_timeout_error() -> None:
    task = asyncio.current_task()
    assert task is not None
    with pytest.raises(TimeoutError), Deadline(0.01) as deadline:
        await asyncio.sleep(5)
    assert deadline.expired
    assert task.cancelling() == 0
    await asyncio.sleep(0)  # no cancellation left pending on the task


async def test_a_block_that_ends_in_time_is_not_cancelled_later() -> None:
    with Deadline(0.02) as deadline:
        await asyncio.sleep(0)
    await asyncio.sleep(0.05)
    assert not deadline.expired


async def test_another_cancellation_passes_through_a_deadline() -> None:
    entered = asyncio.Event()

    async def guarded() -> None:
        with Deadline(5):
            entered.set()
            await asyncio.sleep(5)

    task = asyncio.create_task(guarded())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("inner_expires", [True, False], ids=["inner-expires", "outer-expires"])
async def test_deadlines_nest_with_asyncio_timeouts(inner_expires: bool) -> None:
    inner, outer = (0.01, 5.0) if inner_expires else (5.0, 0.01)
    reached_after_inner = False
    with pytest.raises(TimeoutError) as caught, Deadline(outer):
        try:
            async with asyncio.timeout(inner):
                await asyncio.sleep(5)
        except TimeoutError:
            reached_after_inner = True
            raise
    assert reached_after_inner is inner_expires
    assert caught.value is not None
