"""A small HTTP/1.1 client for the upstream hot path: `asyncio.Protocol` plus the llhttp parser (httptools).

Why not aiohttp's client here: its per-request machinery (tracing hooks, cookie jar, timer contexts, stream
readers) cost about 250 µs per call on the project's 2-core machines, more than everything else mcpx does for
a call. This client does only what mcpx needs of an upstream: keep-alive connections pooled per origin,
request bodies sent whole, response bodies delivered as they arrive (SSE streams), every buffer bounded, no
redirects, no cookies, no compression (mcpx never sends `Accept-Encoding`). aiohttp stays for the rest (OAuth).

Deadlines are the caller's (`Deadline`, or `asyncio.timeout`, around `request` and the body reads), except
connecting, which has its own. A response that is abandoned before its end closes its connection; a complete one
returns it to the pool; one whose end is still to come can be left to finish on its own (`release_at_end`,
bounded). Every connection has TCP keepalive on: a long quiet response (the GET stream, a slow call) whose
server vanished without closing (a laptop that slept, a NAT that forgot the connection) ends in about a minute
instead of never.

A reused connection that closes before any byte of answer (the server's idle timeout racing the request) gets the
request sent once more on a new connection only when the caller says it may be carried out twice; and each
origin's connections are reused only well within the idle time after which that server was seen to close one.

Per request, the work is kept small: the request head is encoded once per distinct set of headers and reused,
a body already complete when it is read is handed over without waiting, and a large body with a declared length
is written straight into one buffer of that size as it arrives (no queue of chunks to join, no wake-up per chunk).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, cast
from urllib.parse import urlsplit

import httptools

from mcpx import memory
from mcpx.busypoll import BusyPoll

MAX_HEADER_BYTES: Final = 64 * 1024
# Bodies declared at least this long are read straight into a buffer of their size.
_DIRECT_BODY: Final = 64 * 1024
# Encoded request heads kept for reuse (an upstream's headers change only with its session or credential).
_CACHED_HEADS: Final = 64
# Body bytes buffered before the socket stops being read (the reader is slower than the network).
_HIGH_WATER: Final = 1024 * 1024
_LOW_WATER: Final = 256 * 1024
# A server that closed one of our idle connections after this long or more is taken to time idle connections out
# then: its connections are reused only while idle for less than _REUSE_MARGIN of that (shorter gaps are restarts
# and the like, not an idle timeout).
_MIN_LEARNED_IDLE: Final = 1.0
_REUSE_MARGIN: Final = 0.75
# TCP keepalive: the first probe after this many seconds of silence, then one every interval; after this many
# unanswered probes the connection is dead (about a minute in all).
KEEPALIVE_IDLE: Final = 30
KEEPALIVE_INTERVAL: Final = 10
KEEPALIVE_PROBES: Final = 3


def _keep_alive(sock: socket.socket) -> None:
    """TCP keepalive on `sock`, with the probe timing above where the platform lets it be set (Linux
    `TCP_KEEPIDLE`, macOS `TCP_KEEPALIVE`; both `TCP_KEEPINTVL` and `TCP_KEEPCNT`)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError:
        return
    for name, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
        ("TCP_KEEPALIVE", KEEPALIVE_IDLE),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
        ("TCP_KEEPCNT", KEEPALIVE_PROBES),
    ):
        option = getattr(socket, name, None)
        if option is not None:
            with contextlib.suppress(OSError):  # (the system's default timing for that one)
                sock.setsockopt(socket.IPPROTO_TCP, option, value)


class HttpClientError(Exception):
    """A transport-level failure; the message never contains header values."""


class ConnectError(HttpClientError):
    """The TCP (or TLS) connection could not be opened."""


class ConnectionClosed(HttpClientError):
    """The server closed the connection before the response was complete."""


class ClosedBeforeAnswer(ConnectionClosed):
    """A reused connection closed before any byte of answer to a request that must not be sent twice (RFC 9110
    §9.2.2): the server may have closed it for idleness as the request went out, or taken the request and died.
    Whether it was carried out is unknown, so it was not sent again."""


class InvalidResponse(HttpClientError):
    """The server sent something that is not HTTP/1.1, or headers beyond the size limit."""


class BodyTooLarge(HttpClientError):
    """The response body exceeds the caller's limit."""


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed URL: where to connect and what to put on the request line."""

    scheme: str
    host: str
    port: int
    path: str  # path and query, as sent on the request line
    host_header: str
    origin: tuple[str, str, int] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "origin", (self.scheme, self.host, self.port))

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        default_port = 443 if parts.scheme == "https" else 80
        port = parts.port or default_port
        host = parts.hostname
        shown_host = f"[{host}]" if ":" in host else host
        host_header = shown_host if port == default_port else f"{shown_host}:{port}"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(parts.scheme, host, port, path, host_header)


def encode_request(method: str, target: Target, headers: Mapping[str, str], body: bytes | None) -> bytes:
    """The request head and body as bytes. Refuses line breaks in headers (header injection)."""
    return _with_body(encode_head(method, target, headers), method, body)


def encode_head(method: str, target: Target, headers: Mapping[str, str]) -> bytes:
    """The request line and headers, each line ending in CRLF, without `Content-Length` and the blank line."""
    lines = [f"{method} {target.path} HTTP/1.1", f"Host: {target.host_header}"]
    for name, value in headers.items():
        if _has_control(name) or _has_control(value):
            raise HttpClientError(f"the {name!r} header contains a line break or control character")
        lines.append(f"{name}: {value}")
    lines.append("")
    try:
        return "\r\n".join(lines).encode("latin-1")
    except UnicodeEncodeError:
        raise HttpClientError("a header name or value has characters HTTP/1.1 cannot carry (beyond latin-1)") from None


def _with_body(head: bytes, method: str, body: bytes | None) -> bytes:
    if body:
        return b"%bContent-Length: %d\r\n\r\n%b" % (head, len(body), body)
    if body is not None or method in ("POST", "PUT", "PATCH"):
        return head + b"Content-Length: 0\r\n\r\n"
    return head + b"\r\n"


def _ends_at_eof(headers: Mapping[str, str]) -> bool:
    return "content-length" not in headers and "chunked" not in headers.get("transfer-encoding", "").lower()


def _has_control(text: str) -> bool:
    return "\r" in text or "\n" in text or "\0" in text


class Deadline:
    """`asyncio.timeout(delay)` for the hot path, as a plain `with` block around the awaits it bounds.

    The same rules: when `delay` seconds have passed the task is cancelled, and that cancellation leaves the block
    as `TimeoutError`; any other cancellation passes through as it is. Only cheaper: no coroutines to enter and
    leave the block and no state machine, about a third of `asyncio.timeout`'s interpreter work per use.
    """

    __slots__ = ("_cancelling", "_delay", "_expired", "_handle", "_task")

    def __init__(self, delay: float) -> None:
        self._delay = delay
        self._expired = False

    def __enter__(self) -> Deadline:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a Deadline is for use inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._handle = task.get_loop().call_later(self._delay, self._expire)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._handle.cancel()
        # As asyncio.timeout: the cancellation is this deadline's when no one else asked for one meanwhile.
        if self._expired and self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc

    @property
    def expired(self) -> bool:
        return self._expired

    def _expire(self) -> None:
        self._expired = True
        self._task.cancel()


class Response:
    """One response: status and headers at once, the body as it arrives."""

    __slots__ = (
        "_body",
        "_buffered",
        "_chunks",
        "_complete",
        "_connection",
        "_content_length",
        "_content_type",
        "_drain_timer",
        "_error",
        "_filled",
        "_headers",
        "_raw_content_type",
        "_raw_headers",
        "_raw_reason",
        "_received",
        "_released",
        "_waiter",
        "status",
    )

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        self.status = 0
        self._raw_reason = b""
        # The header lines as received; the dict of them is made only when asked for (most responses are read
        # by their status, content type and length alone, which are picked out as they arrive).
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._headers: dict[str, str] | None = None
        self._content_type: str | None = None
        self._raw_content_type: bytes | None = None
        self._content_length: bytes | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._body: bytearray | None = None  # the body's buffer while `read` fills it directly
        self._filled = 0
        self._received = 0  # body bytes queued in all
        self._complete = False
        self._error: HttpClientError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._released = False
        self._drain_timer: asyncio.TimerHandle | None = None

    @property
    def reason(self) -> str:
        return self._raw_reason.decode("latin-1")

    @property
    def headers(self) -> dict[str, str]:
        """The headers, by lower-case name (repeated ones joined with ", ")."""
        if self._headers is None:
            headers: dict[str, str] = {}
            for raw_name, raw_value in self._raw_headers:
                name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
            self._headers = headers
        return self._headers

    @property
    def content_type(self) -> str:
        if self._content_type is None:
            raw = self._raw_content_type
            value = self.headers.get("content-type", "") if raw is None or b"," in raw else raw.decode("latin-1")
            self._content_type = value.split(";", 1)[0].strip().lower()
        return self._content_type

    @property
    def content_length(self) -> int | None:
        value = self._content_length
        if value is None:
            return None
        if b"," in value:  # repeated: as the joined header says
            joined = self.headers.get("content-length", "")
            return int(joined) if joined.isdigit() else None
        return int(value) if value.isdigit() else None

    @property
    def at_eof(self) -> bool:
        return self._complete and not self._chunks

    @property
    def ended(self) -> bool:
        """All of the body has arrived, or the error that ended it (`read_now` then returns or raises at once)."""
        return self._complete or self._error is not None

    def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (chunked transfer-coding already removed)."""
        return _Chunks(self)

    def _take_chunk(self) -> bytes:
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._buffered <= _LOW_WATER:
            self._connection.resume_reading()
        return chunk

    async def _wait(self) -> None:
        self._waiter = self._connection.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def read(self, limit: int) -> bytes | bytearray:
        """The whole body; `BodyTooLarge` beyond `limit` bytes. A large body with a declared length comes as the
        bytearray it was received into (no one else holds it)."""
        declared = self.content_length
        if declared is not None and declared > limit:
            raise BodyTooLarge(f"response larger than the {limit}-byte limit")
        if self._complete or self._error is not None:
            return self.read_now(limit)  # all there already (the common case for small bodies): no waiting
        if declared is not None and declared >= _DIRECT_BODY:
            if declared >= memory.LARGE:
                memory.large_message(self._connection.loop)
            return await self._read_into(bytearray(declared))
        parts: list[bytes] = []
        size = 0
        async for chunk in self.chunks():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"response larger than the {limit}-byte limit")
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def peek(self, limit: int) -> bytes:
        """The whole body once it has `ended`, left in place (a later `read_now`, or a reader, gets it again);
        `BodyTooLarge` beyond `limit` bytes, or the error that ended it."""
        if self._error is not None:
            raise self._error
        if self._buffered > limit:
            raise BodyTooLarge(f"response larger than the {limit}-byte limit")
        chunks = self._chunks
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def read_now(self, limit: int) -> bytes:
        """The whole body once it has `ended`; `BodyTooLarge` beyond `limit` bytes, or the error that ended it."""
        chunks = self._chunks
        if self._error is not None:
            raise self._error
        size = self._buffered
        if size > limit:
            raise BodyTooLarge(f"response larger than the {limit}-byte limit")
        body = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        return body

    async def _read_into(self, body: bytearray) -> bytearray:
        filled = 0
        for chunk in self._chunks:
            body[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
        self._chunks.clear()
        self._buffered = 0
        self._body, self._filled = body, filled
        self._connection.resume_reading()  # the buffer is allocated: nothing more to hold back
        try:
            while not self._complete:
                if self._error is not None:
                    raise self._error
                await self._wait()
        finally:
            self._body = None
        if self._filled != len(body):  # (the parser enforces the declared length; this is a second guard)
            raise InvalidResponse("the body does not have its declared length")
        return body

    async def read_prefix(self, limit: int) -> bytes:
        """At most `limit` bytes from the start of the body (for error details)."""
        parts: list[bytes] = []
        size = 0
        async for chunk in self.chunks():
            parts.append(chunk)
            size += len(chunk)
            if size >= limit:
                break
        return b"".join(parts)[:limit]

    def release(self) -> None:
        """Done with this response: a complete one gives its connection back to the pool, else it is closed."""
        if self._released:
            return
        self._released = True
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        self._connection.finish(reusable=self._complete)

    def release_at_end(self, timeout: float) -> None:
        """Done with this response, whose end has not come yet (an SSE stream that goes on after the answer):
        its remaining bytes are dropped as they arrive and its connection goes back to the pool at the end, or is
        closed if the end has not come within `timeout` seconds. No task: the connection's callbacks do it."""
        if self._released:
            return
        if self._complete or self._error is not None:
            self.release()
            return
        self._chunks.clear()
        self._buffered = 0
        self._drain_timer = self._connection.loop.call_later(timeout, self.release)
        self._connection.resume_reading()

    # --- fed by the connection -----------------------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        body = self._body
        if body is not None:
            end = self._filled + len(data)
            if end > len(body):
                raise InvalidResponse("the body is longer than declared")
            body[self._filled : end] = data
            self._filled = end
            return  # the reader waits for the end only
        if self._drain_timer is not None:
            return  # released at its end: the rest is not wanted
        self._chunks.append(data)
        self._buffered += len(data)
        received = self._received = self._received + len(data)
        if received >= memory.LARGE > received - len(data):  # (for the allocator: see mcpx.memory)
            memory.large_message(self._connection.loop)
        if self._buffered > _HIGH_WATER:
            self._connection.pause_reading()
        self._wake()

    def _end(self, error: HttpClientError | None) -> None:
        if error is None:
            self._complete = True
        elif not self._complete:
            self._error = error
        if self._drain_timer is not None:
            self.release()
            return
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _Chunks:
    """`Response.chunks()`: an iterator object, not an async generator (the event loop tracks every async generator
    in a weak set, an entry added and dropped in Python each time)."""

    __slots__ = ("_response",)

    def __init__(self, response: Response) -> None:
        self._response = response

    def __aiter__(self) -> _Chunks:
        return self

    def __anext__(self) -> Awaitable[bytes]:
        return self._next()

    async def _next(self) -> bytes:
        response = self._response
        while True:
            if response._chunks:
                return response._take_chunk()
            if response._error is not None:
                raise response._error
            if response._complete:
                raise StopAsyncIteration
            await response._wait()


class _Connection(asyncio.Protocol):
    """One keep-alive connection; carries one request at a time."""

    def __init__(self, pool: HttpClient, origin: tuple[str, str, int]) -> None:
        self._pool = pool
        self._busy_poll = pool.busy_poll
        self.origin = origin
        self.loop = asyncio.get_running_loop()
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._response: Response | None = None
        self._headers_ready: asyncio.Future[Response] | None = None
        # Told of each step of the response in flight, synchronously, once the bytes that came are parsed.
        self.watcher: Callable[[], None] | None = None
        self._header_bytes = 0
        # Bytes received while the response's head is still open: a header line that never ends is refused here,
        # since the parser keeps (and copies) an unfinished line whole.
        self._head_bytes = 0
        self._head_open = False
        self._keep_alive = True
        self._reading_paused = False
        self.closed = False
        self.received_any = False
        self.idle_since = 0.0

    # --- used by the client ---

    def send(self, data: bytes) -> asyncio.Future[Response]:
        assert self._transport is not None and self._response is None
        self._response = Response(self)
        self._headers_ready = self.loop.create_future()
        self._header_bytes = 0
        self._head_bytes = 0
        self._head_open = True
        self.received_any = False
        self._transport.write(data)
        if self._busy_poll is not None:
            self._busy_poll.sent()
        return self._headers_ready

    def finish(self, *, reusable: bool) -> None:
        self._response = None
        self._headers_ready = None
        self.watcher = None
        if reusable and self._keep_alive and not self.closed:
            self.resume_reading()
            self._pool._checkin(self)
        else:
            self.close()

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    def pause_reading(self) -> None:
        if not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self._transport is not None and not self.closed:
            self._reading_paused = False
            self._transport.resume_reading()

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            _keep_alive(sock)

    def data_received(self, data: bytes) -> None:
        if self._response is None:
            # Bytes while idle: the server broke the protocol; this connection cannot be trusted again.
            self.close()
            return
        self.received_any = True
        if self._busy_poll is not None:
            self._busy_poll.received()
        if self._head_open and self._head_bytes > MAX_HEADER_BYTES:  # (at most one read past the limit is parsed)
            self._fail(InvalidResponse(f"response headers larger than {MAX_HEADER_BYTES} bytes"))
        else:
            if self._head_open:
                self._head_bytes += len(data)
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                self._fail(InvalidResponse("the server switched protocols"))
            except httptools.HttpParserError as exc:
                cause = exc.__context__ if isinstance(exc.__context__, HttpClientError) else None
                self._fail(cause or InvalidResponse(f"malformed HTTP response: {exc}"))
        if self.watcher is not None:
            self.watcher()

    def eof_received(self) -> bool | None:
        return False  # close the transport; connection_lost reports it

    def connection_lost(self, exc: Exception | None) -> None:
        closed_by_us = self.closed
        self.closed = True
        self._pool._forget(self)
        response = self._response
        if response is None:
            if not closed_by_us and self.idle_since:
                self._pool._closed_while_idle(self)
            return
        if response.status >= 200 and _ends_at_eof(response.headers):
            response._end(None)  # a body delimited by the end of the connection (RFC 9112 §6.3)
        else:
            self._fail(ConnectionClosed("the server closed the connection"))
        if self.watcher is not None:
            self.watcher()

    # --- httptools callbacks ---

    def on_status(self, status: bytes) -> None:
        assert self._response is not None
        self._response._raw_reason = status

    def on_header(self, name: bytes, value: bytes) -> None:
        response = self._response
        assert response is not None
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > MAX_HEADER_BYTES:
            raise InvalidResponse(f"response headers larger than {MAX_HEADER_BYTES} bytes")
        response._raw_headers.append((name, value))
        # The two headers every response is read by, kept as they come (a repeated one: from the joined headers).
        if len(name) == 14 and name.lower() == b"content-length":
            response._content_length = value if response._content_length is None else b","
        elif len(name) == 12 and name.lower() == b"content-type":
            response._raw_content_type = value if response._raw_content_type is None else b","

    def on_headers_complete(self) -> None:
        response = self._response
        assert response is not None
        response.status = self._parser.get_status_code()
        self._keep_alive = self._parser.should_keep_alive()
        if response.status >= 200:
            self._head_open = False
        else:
            # An interim (1xx) response: its headers do not belong to the final one.
            response._raw_headers, response._headers = [], None
            response._content_length = response._raw_content_type = None
            return
        if self._headers_ready is not None and not self._headers_ready.done():
            self._headers_ready.set_result(response)

    def on_body(self, body: bytes) -> None:
        if self._response is not None:
            self._response._feed(body)

    def on_message_complete(self) -> None:
        response = self._response
        if response is not None and response.status >= 200:
            response._end(None)

    def _fail(self, error: HttpClientError) -> None:
        if self._headers_ready is not None and not self._headers_ready.done():
            self._headers_ready.set_exception(error)
        if self._response is not None:
            self._response._end(error)
        self._keep_alive = False
        self.close()


class Sent:
    """A request written on a pooled connection (`HttpClient.send_now`), its response still to come."""

    __slots__ = ("_client", "_connection", "_data", "_replayable", "_target", "headers", "headers_ready")

    def __init__(
        self,
        client: HttpClient,
        connection: _Connection,
        headers_ready: asyncio.Future[Response],
        *,
        target: Target,
        data: bytes,
        headers: Mapping[str, str],
        replayable: bool,
    ) -> None:
        self._client = client
        self._connection = connection
        self._target = target
        self._data = data
        self._replayable = replayable
        self.headers = headers  # as sent (which credential, which session)
        self.headers_ready = headers_ready  # done once the response's headers are in, or failed

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._connection.loop

    async def response(self) -> Response:
        """The response, as `HttpClient.request` gives it (a replayable request is sent once more on a fresh
        connection when the pooled one was closed before a byte of answer came)."""
        return await self._client._answer(
            self._connection, self.headers_ready, self._target, self._data, replayable=self._replayable
        )

    def watch(self, watcher: Callable[[], None] | None) -> None:
        """Have `watcher` called at each step of the response (headers in, body bytes, its end, a failure of the
        connection), synchronously, once the bytes that came are parsed: a caller can take a small response without
        a task or a future's turn of the loop. None stops it; releasing the response does too."""
        headers_ready = self.headers_ready
        answered = headers_ready.done() and not headers_ready.cancelled() and headers_ready.exception() is None
        if answered and headers_ready.result()._released:
            return  # the connection may be serving another request already
        self._connection.watcher = watcher

    def abort(self) -> None:
        """Nobody will read the response: its connection is closed, unless the response was already released
        (the connection may then be serving another request)."""
        self.watch(None)
        headers_ready = self.headers_ready
        if not headers_ready.done():
            headers_ready.cancel()  # so that the closing does not leave an exception nobody retrieves
            self._connection.close()
        elif not headers_ready.cancelled() and headers_ready.exception() is None:
            headers_ready.result().release()


class HttpClient:
    """Keep-alive connections, pooled per origin, shared by every upstream session."""

    def __init__(
        self,
        *,
        connect_timeout: float,
        idle_timeout: float = 30.0,
        busy_poll: BusyPoll | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._connect_timeout = connect_timeout
        self.busy_poll = busy_poll
        self._idle_timeout = idle_timeout
        self._clock = clock
        # Per origin, how long a connection may have been idle and still be reused, learned from the server's own
        # idle timeout (see `_closed_while_idle`); `idle_timeout` where nothing was learned.
        self._reuse_limit: dict[tuple[str, str, int], float] = {}
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._all: set[_Connection] = set()
        self._ssl: ssl.SSLContext | None = None
        self._closed = False
        # Encoded request heads by method, host, path and headers (values included: a credential that changes
        # gives a new entry; the whole cache is dropped when full, so old ones do not stay long).
        self._heads: dict[tuple[object, ...], bytes] = {}

    async def request(
        self,
        method: str,
        target: Target,
        headers: Mapping[str, str],
        body: bytes | None = None,
        *,
        replayable: bool = True,
    ) -> Response:
        """Send one request and return once the response's headers are in; call `release()` on it when done.

        `replayable`: the request may be carried out twice without harm, so when a reused connection closes before
        any answer (a server's idle timeout racing the request) it is sent once more on a fresh connection, as
        browsers do. Otherwise that raises `ClosedBeforeAnswer`."""
        data = self._encode(method, target, headers, body)
        sent = self._send_pooled(data, target, headers, replayable)
        if sent is not None:
            return await sent.response()
        return await self._send_on_new_connection(target, data)

    def send_now(
        self,
        method: str,
        target: Target,
        headers: Mapping[str, str],
        body: bytes | None = None,
        *,
        replayable: bool = True,
    ) -> Sent | None:
        """Write one request on an idle pooled connection without awaiting anything; None when there is none
        (the caller then uses `request`, which connects). `replayable` as for `request`."""
        return self._send_pooled(self._encode(method, target, headers, body), target, headers, replayable)

    def _send_pooled(self, data: bytes, target: Target, headers: Mapping[str, str], replayable: bool) -> Sent | None:
        connection = self._checkout(target.origin)
        if connection is None:
            return None
        sent = connection.send(data)
        return Sent(self, connection, sent, target=target, data=data, headers=headers, replayable=replayable)

    def _encode(self, method: str, target: Target, headers: Mapping[str, str], body: bytes | None) -> bytes:
        key = (method, target.host_header, target.path, *headers.items())
        head = self._heads.get(key)
        if head is None:
            head = encode_head(method, target, headers)
            if len(self._heads) >= _CACHED_HEADS:
                self._heads.clear()
            self._heads[key] = head
        return _with_body(head, method, body)

    async def _answer(
        self,
        connection: _Connection,
        headers_ready: asyncio.Future[Response],
        target: Target,
        data: bytes,
        *,
        replayable: bool,
    ) -> Response:
        """The response to `data`, written on the pooled `connection`."""
        try:
            return await headers_ready
        except ConnectionClosed:
            connection.close()
            if connection.received_any:
                raise
            # Not a byte of answer on a reused connection: almost always the server closing it for idleness as
            # we sent. Like browsers and Go's client, send once more on a fresh connection, but only a request
            # that may be carried out twice: the server may also have taken it and died.
            if not replayable:
                raise ClosedBeforeAnswer(
                    "the server closed the connection after the request was sent and before any answer"
                ) from None
        except BaseException:
            connection.close()
            raise
        return await self._send_on_new_connection(target, data)

    async def _send_on_new_connection(self, target: Target, data: bytes) -> Response:
        connection = await self._connect(target)
        try:
            return await connection.send(data)
        except BaseException:
            connection.close()
            raise

    async def close(self) -> None:
        self._closed = True
        for connection in list(self._all):
            connection.close()
        self._all.clear()
        self._idle.clear()
        self._heads.clear()

    async def _connect(self, target: Target) -> _Connection:
        if self._closed:
            raise ConnectError("the client is closed")
        loop = asyncio.get_running_loop()
        ssl_context = self._ssl_context() if target.scheme == "https" else None
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self, target.origin),
                    target.host,
                    target.port,
                    ssl=ssl_context,
                    server_hostname=target.host if ssl_context is not None else None,
                )
        except TimeoutError:
            raise ConnectError(f"no connection within {self._connect_timeout:g} s") from None
        except ssl.SSLError as tls_error:
            raise ConnectError(f"TLS failed: {tls_error.reason or tls_error}") from None
        except OSError as exc:
            raise ConnectError(exc.strerror or str(exc)) from None
        self._all.add(connection)
        return connection

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def _checkout(self, origin: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        # Most recently used first. Connections idle too long are closed here rather than by a timer per
        # request: servers drop idle keep-alive connections on their own, and a timer costs on every call.
        stale_before = self._clock() - self._reuse_limit.get(origin, self._idle_timeout)
        while idle:
            connection = idle.pop()
            if connection.closed:
                continue
            if connection.idle_since < stale_before:
                connection.close()
                continue
            return connection
        return None

    def _checkin(self, connection: _Connection) -> None:
        if self._closed:
            connection.close()
            return
        connection.idle_since = self._clock()
        self._idle.setdefault(connection.origin, []).append(connection)

    def _closed_while_idle(self, connection: _Connection) -> None:
        """The server closed `connection` while it sat in the pool: most likely its idle timeout. Reusing a
        connection close to that age races the server's close, and a request that must not be sent twice then
        fails (`ClosedBeforeAnswer`); so connections are reused only well within it."""
        idle_for = self._clock() - connection.idle_since
        if idle_for >= _MIN_LEARNED_IDLE:
            self._reuse_limit[connection.origin] = min(self._idle_timeout, idle_for * _REUSE_MARGIN)

    def _forget(self, connection: _Connection) -> None:
        self._all.discard(connection)
        idle = self._idle.get(connection.origin)
        if idle and connection in idle:
            idle.remove(connection)
