"""An agent on a raw socket to the daemon, for tests where bytes and ids matter."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from tests.support.daemon import Sandbox


class RawAgent:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send_line(self, line: bytes) -> None:
        self.writer.write(line + b"\n")
        await self.writer.drain()

    async def send(self, message: dict[str, Any]) -> None:
        await self.send_line(json.dumps(message).encode())

    async def receive(self) -> dict[str, Any]:
        async with asyncio.timeout(10):
            line = await self.reader.readline()
        assert line, "the daemon closed the connection"
        message = json.loads(line)
        assert isinstance(message, dict)
        return message

    async def next_response(self) -> dict[str, Any]:
        """The next message with an id (notifications, such as a list_changed at start-up, are skipped)."""
        while True:
            message = await self.receive()
            if "id" in message:
                return message

    async def request(self, request_id: int | str, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        await self.send(message)
        while True:
            reply = await self.receive()
            if reply.get("id") == request_id:
                return reply


@asynccontextmanager
async def raw_agent(sandbox: Sandbox) -> AsyncIterator[RawAgent]:
    reader, writer = await asyncio.open_unix_connection(str(sandbox.socket), limit=1 << 24)
    try:
        yield RawAgent(reader, writer)
    finally:
        writer.close()
        await writer.wait_closed()
