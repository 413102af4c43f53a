"""mcpx.memory: freed memory is kept while large messages flow and given back after the last one."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest

from mcpx import memory
from mcpx.upstream import h1


class FakeLibc:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def mallopt(self, parameter: int, value: int) -> int:
        self.calls.append(("mallopt", parameter, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


@pytest.fixture
def libc(monkeypatch: pytest.MonkeyPatch) -> FakeLibc:
    fake = FakeLibc()
    policy = memory._Policy()
    monkeypatch.setattr(memory, "_glibc", lambda: fake)
    monkeypatch.setattr(memory, "large_message", policy.large_message)
    monkeypatch.setattr(memory, "KEEP_FOR", 0.05)
    return fake


async def test_memory_is_kept_while_large_messages_flow_and_given_back_after_the_last(libc: FakeLibc) -> None:
    loop = asyncio.get_running_loop()
    memory.large_message(loop)
    memory.large_message(loop)  # the thresholds are set once; the trim moves to after this one
    assert libc.calls == [("mallopt", -3, 32 << 20), ("mallopt", -1, 64 << 20)]
    await asyncio.sleep(0.2)
    assert libc.calls[2:] == [("mallopt", -3, 128 << 10), ("mallopt", -1, 128 << 10), ("malloc_trim", 0)]
    memory.large_message(loop)  # a later one keeps memory again
    assert libc.calls[5:] == [("mallopt", -3, 32 << 20), ("mallopt", -1, 64 << 20)]


def test_the_allocator_is_found_on_linux_only() -> None:
    libc = memory._glibc()
    assert (libc is not None) == sys.platform.startswith("linux")


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_a_large_body_tells_the_policy(libc: FakeLibc, declared: bool) -> None:
    body = b"x" * memory.LARGE

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n{}")
        if declared:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        else:
            chunk = b"%x\r\n%b\r\n" % (len(body), body)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%b0\r\n\r\n" % chunk)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    client = h1.HttpClient(connect_timeout=5)
    try:
        target = h1.Target.parse(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/")
        response = await client.request("POST", target, {}, b"{}")
        assert await response.read(len(body)) == body
        response.release()
    finally:
        await client.close()
        server.close()
    assert libc.calls[:1] == [("mallopt", -3, 32 << 20)]
