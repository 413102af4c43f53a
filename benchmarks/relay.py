"""A null relay for `make bench`: copies bytes between each client connection and the upstream, nothing else.

It measures what one extra process hop costs on the machine (two more wake-ups per call), the part of a proxy's
added latency that no proxy design running in its own process can remove.

Usage: relay.py --fd N --upstream HOST:PORT (N is a listening socket inherited from the benchmark).
"""

from __future__ import annotations

import argparse
import asyncio
import socket

import uvloop


class _Half(asyncio.Protocol):
    """One side of a relayed connection: what it receives is written to the other side."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: _Half | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.write(data)
        else:
            self.early.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.close()


async def serve(listening: socket.socket, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    async def connect(client: _Half) -> None:
        upstream = _Half()
        upstream.other, client.other = client, upstream
        await loop.create_connection(lambda: upstream, host, port)
        assert upstream.transport is not None
        for data in client.early:
            upstream.transport.write(data)
        client.early.clear()

    def accepted() -> _Half:
        client = _Half()
        task = loop.create_task(connect(client))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return client

    server = await loop.create_server(accepted, sock=listening)
    await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    host, _, port = args.upstream.rpartition(":")
    uvloop.run(serve(socket.socket(fileno=args.fd), host, int(port)))


if __name__ == "__main__":
    main()
