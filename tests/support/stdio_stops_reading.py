"""The fault of a stdio MCP server that stops reading its stdin (hung, deadlocked, busy without a reader thread),
run as `python stdio_stops_reading.py [--slow]`. Not a real peer (the SDK's server always reads): it speaks just
enough JSON-RPC by hand.

Tools: `echo(text)` answers `<length of text> from <pid>`; `pid` answers the process id; `freeze` answers, then
the process never reads its stdin again (it waits forever; SIGTERM ends it). `--slow` is a server that keeps
reading, only slowly: its stdin is read `CHUNK` bytes at a time with a `PAUSE` after each read.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

CHUNK = 16 * 1024
PAUSE = 0.02

TOOLS = [
    {"name": "echo", "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}}},
    {"name": "pid", "inputSchema": {"type": "object"}},
    {"name": "freeze", "inputSchema": {"type": "object"}},
]


def lines(slow: bool) -> Iterator[bytes]:
    pending = bytearray()
    while chunk := os.read(0, CHUNK if slow else 1 << 20):
        if slow:
            time.sleep(PAUSE)
        pending += chunk
        while (end := pending.find(b"\n")) >= 0:
            yield bytes(pending[:end])
            del pending[: end + 1]


def send(message: dict[str, Any]) -> None:
    sys.stdout.buffer.write(json.dumps(message).encode() + b"\n")
    sys.stdout.buffer.flush()


def text(value: str) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": value}]}


def main() -> None:
    slow = "--slow" in sys.argv[1:]
    for line in lines(slow):
        message = json.loads(line)
        method, params, request_id = message.get("method"), message.get("params") or {}, message.get("id")
        if request_id is None:
            continue  # a notification
        result: dict[str, Any] = {}
        if method == "initialize":
            result = {
                "protocolVersion": params["protocolVersion"],
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "stops-reading", "version": "1"},
            }
        elif method == "tools/list":
            result = {"tools": TOOLS}
        elif method == "tools/call" and params.get("name") == "echo":
            result = text(f"{len(params['arguments']['text'])} from {os.getpid()}")
        elif method == "tools/call" and params.get("name") == "pid":
            result = text(str(os.getpid()))
        elif method == "tools/call" and params.get("name") == "freeze":
            send({"jsonrpc": "2.0", "id": request_id, "result": text("frozen")})
            threading.Event().wait(600)  # (bounded: a child mcpx failed to stop does not outlive the test run)
            return
        elif method != "ping":
            send({"jsonrpc": "2.0", "id": request_id, "error": {"code": -32601, "message": f"no {method}"}})
            continue
        send({"jsonrpc": "2.0", "id": request_id, "result": result})


if __name__ == "__main__":
    main()
