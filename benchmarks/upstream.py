"""A deliberately fast MCP upstream for the benchmark: streamable HTTP (JSON or SSE responses) on 127.0.0.1.

Raw aiohttp + orjson on uvloop, so that the upstream is never the bottleneck of what is measured. It speaks
just enough of the handshake era: initialize (with a session id), notifications, tools/list (20 tools),
tools/call (`echo` returns about 1 KB; `blob` returns a text block of the requested size), DELETE.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import socket

import orjson
import uvloop
from aiohttp import web

TOOLS = [
    {
        "name": "echo" if index == 0 else ("blob" if index == 1 else f"tool_{index:02d}"),
        "description": f"Benchmark tool number {index}.",
        "inputSchema": {
            "type": "object",
            "properties": {"text": {"type": "string"}, "size": {"type": "integer"}},
        },
    }
    for index in range(20)
]
PADDING = "x" * 900


def result_for(message: dict[str, object]) -> object:
    method = message.get("method")
    params = message.get("params") or {}
    assert isinstance(params, dict)
    if method == "initialize":
        return {
            "protocolVersion": "2025-11-25",
            "capabilities": {"tools": {"listChanged": False}},
            "serverInfo": {"name": "bench-upstream", "version": "1"},
        }
    if method == "tools/list":
        return {"tools": TOOLS}
    if method == "tools/call":
        arguments = params.get("arguments") or {}
        assert isinstance(arguments, dict)
        if params.get("name") == "blob":
            return {"content": [{"type": "text", "text": "b" * int(arguments.get("size", 0))}], "isError": False}
        return {
            "content": [{"type": "text", "text": f"{arguments.get('text', '')}"}],
            "structuredContent": {"echo": arguments.get("text", ""), "padding": PADDING},
            "isError": False,
        }
    if method == "ping":
        return {}
    return None


def make_app(sse: bool) -> web.Application:
    async def post(request: web.Request) -> web.StreamResponse:
        message = orjson.loads(await request.read())
        if "id" not in message or "method" not in message:
            return web.Response(status=202)
        result = result_for(message)
        if result is None:
            reply = {"jsonrpc": "2.0", "id": message["id"], "error": {"code": -32601, "message": "not found"}}
        else:
            reply = {"jsonrpc": "2.0", "id": message["id"], "result": result}
        headers = {}
        if message["method"] == "initialize":
            headers["Mcp-Session-Id"] = secrets.token_hex(16)
        body = orjson.dumps(reply)
        if not sse:
            return web.Response(body=body, content_type="application/json", headers=headers)
        response = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"event: message\ndata: " + body + b"\n\n")
        await response.write_eof()
        return response

    async def delete(_: web.Request) -> web.Response:
        return web.Response(status=200)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/mcp", post)
    app.router.add_delete("/mcp", delete)
    return app


async def serve(sock: socket.socket, sse: bool) -> None:
    runner = web.AppRunner(make_app(sse), access_log=None)
    await runner.setup()
    site = web.SockSite(runner, sock)
    await site.start()
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fd", type=int, required=True, help="an already bound and listening socket")
    parser.add_argument("--sse", action="store_true")
    args = parser.parse_args()
    sock = socket.socket(fileno=args.fd)
    uvloop.run(serve(sock, args.sse))


if __name__ == "__main__":
    main()
