"""Hand-written HTTP/1.1 servers on 127.0.0.1, for tests where the fault is the point: a base that owns the listening
socket and one task per connection (`LoopbackServer`), the reading of one request (`read_request`), and a server
that answers each request on a connection of its own with a test's handler (`ScriptedHttp`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Self


@dataclass
class RawRequest:
    """One request a scripted server read: request line, lower-cased headers, body, when it arrived, and its bytes
    as they came (head and body)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    raw: bytes


# A handler answers one request by writing to the connection; returning closes it.
Handler = Callable[[RawRequest, asyncio.StreamWriter], Awaitable[None]]


class LoopbackServer:
    """A TCP server on 127.0.0.1 for hand-written HTTP: each connection is served by `_connection` in a task of
    its own, cancelled when the server closes; `wait_for` waits (bounded) for what the subclass records."""

    def __init__(self) -> None:
        self.connections = 0
        self._changed = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.port = 0

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(predicate)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            await self._connection(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            pass  # the server is closing (a cancelled connection task would be logged as an error by asyncio)
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


async def read_request(reader: asyncio.StreamReader) -> RawRequest:
    """One HTTP/1.1 request: its head, then a body of its `Content-Length`."""
    raw_head = await reader.readuntil(b"\r\n\r\n")
    request_line, *lines = raw_head.decode("latin-1").split("\r\n")
    method, path, _ = request_line.split(" ", 2)
    headers = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return RawRequest(method, path, headers, body, asyncio.get_running_loop().time(), raw_head + body)


class ScriptedHttp(LoopbackServer):
    """An HTTP/1.1 server on 127.0.0.1 whose every answer a test writes by hand (`handler`, one connection per
    request)."""

    def __init__(self, handler: Handler) -> None:
        super().__init__()
        self.handler = handler
        self.requests: list[RawRequest] = []

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_request(reader)
        async with self._changed:
            self.requests.append(request)
            self._changed.notify_all()
        await self.handler(request, writer)
