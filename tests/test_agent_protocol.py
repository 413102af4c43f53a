"""The agent-facing JSON-RPC surface, driven over a raw socket where bytes and ids matter: bad input gets a clear
error, the session goes on."""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import os
import socket
import warnings
from pathlib import Path
from typing import Any

import pytest
from mcp.shared.exceptions import MCPError

from mcpx.config.load import parse_config
from mcpx.downstream.peercred import PeerCredentials
from mcpx.downstream.server import AgentConnection
from mcpx.downstream.session import AgentSession
from mcpx.router.router import Router
from tests.support.daemon import Sandbox, agent, mcpxctl, running_daemon, upstream_toml
from tests.support.inprocess import NoControl
from tests.support.raw import raw_agent
from tests.support.upstream import HangingTool, Upstream, running


async def test_malformed_and_oversized_messages_get_errors_and_the_session_goes_on(sandbox: Sandbox) -> None:
    sandbox.write_config("[daemon]\nmax_message_bytes = 4096\n")
    async with running_daemon(sandbox), raw_agent(sandbox) as peer:
        await peer.send_line(b"{not json")
        error = await peer.receive()
        assert error["id"] is None
        assert error["error"]["code"] == -32700

        await peer.send_line(b'{"jsonrpc": "2.0", "id": 1, "method": "ping"' + b" " * 10_000 + b"}")
        error = await peer.receive()
        assert error["id"] is None
        assert error["error"]["code"] == -32600
        assert "4096" in error["error"]["message"]

        await peer.send_line(b'[{"jsonrpc": "2.0", "id": 2, "method": "ping"}]')
        assert (await peer.receive())["error"]["code"] == -32600  # batches were removed in 2025-06-18

        # An invalid request whose id can be read is answered under it: its caller waits for that id.
        for line, request_id in [
            (b'{"jsonrpc": "1.0", "id": 3, "method": "ping"}', 3),
            (b'{"jsonrpc": "2.0", "id": 4, "method": "ping", "params": [1]}', 4),
            (b'{"id": "four", "method": "ping"}', "four"),
            (b'{"jsonrpc": "2.0", "id": 44, "method": 42}', 44),
            (b'{"jsonrpc": "2.0", "id": [4], "method": "ping"}', None),  # an id that is no id
        ]:
            await peer.send_line(line)
            error = await peer.receive()
            assert error["id"] == request_id and error["error"]["code"] == -32600, line

        await peer.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": [1]}})
        await peer.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": {"x": 1}}})
        assert (await peer.request(5, "ping")) == {"jsonrpc": "2.0", "id": 5, "result": {}}


async def test_handshake_versions_discover_fallback_and_unknown_methods(sandbox: Sandbox) -> None:
    sandbox.write_config("")
    async with running_daemon(sandbox), raw_agent(sandbox) as peer:
        # server/discover is 2026-07-28's: without that protocol's envelope it is invalid (test_modern_agents.py).
        discover = await peer.request(1, "server/discover", {})
        assert discover["error"]["code"] == -32602

        for version in ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"):
            reply = await peer.request(
                f"init-{version}", "initialize", {"protocolVersion": version, "capabilities": {}}
            )
            assert reply["result"]["protocolVersion"] == version
        reply = await peer.request("init-new", "initialize", {"protocolVersion": "2099-01-01", "capabilities": {}})
        assert reply["result"]["protocolVersion"] == "2025-11-25"
        assert reply["result"]["capabilities"] == {"tools": {"listChanged": True}}
        assert reply["result"]["serverInfo"]["name"] == "mcpx"
        await peer.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

        for method in ("sampling/createMessage", "no/such/method"):
            assert (await peer.request(method, method, {}))["error"]["code"] == -32601
        # No upstream offers prompts or resources: the lists are empty (and the capabilities are not announced).
        assert (await peer.request("p", "prompts/list", {}))["result"] == {"prompts": []}
        assert (await peer.request("r", "resources/list", {}))["result"] == {"resources": []}
        unknown = await peer.request("t", "tools/call", {"name": "nope__tool", "arguments": {}})
        assert unknown["error"]["code"] == -32602
        assert (await peer.request("l", "tools/list", {})) == {"jsonrpc": "2.0", "id": "l", "result": {"tools": []}}


async def test_agent_request_ids_are_kept_whatever_their_type(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=False)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    async with running(alpha), running_daemon(sandbox), raw_agent(sandbox) as peer:
        await peer.request(0, "initialize", {"protocolVersion": "2025-11-25", "capabilities": {}})
        ids: list[int | str] = [1, "1", "a-string-id", 2**53, -7]
        for request_id in ids:
            await peer.send(
                {
                    "jsonrpc": "2.0",
                    "id": request_id,
                    "method": "tools/call",
                    "params": {"name": "alpha__echo", "arguments": {"text": repr(request_id)}},
                }
            )
        replies: dict[str, dict[str, Any]] = {}
        while len(replies) < len(ids):
            reply = await peer.receive()
            if "id" in reply:
                replies[json.dumps(reply["id"])] = reply
        for request_id in ids:
            reply = replies[json.dumps(request_id)]
            assert reply["result"]["content"][0]["text"] == f"alpha:{request_id!r}"


async def test_tools_without_namespace_and_a_withheld_collision(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=True)
    beta = Upstream("beta", json_response=True)
    sandbox.write_config(
        upstream_toml("alpha", alpha.url, namespace=False, include_tools=["echo", "add"])
        + upstream_toml("beta", beta.url, namespace=False, include_tools=["echo", "get_issue"])
    )
    async with running(alpha, beta), running_daemon(sandbox), agent(sandbox) as client:
        tools = (await client.list_tools()).tools
        assert sorted(tool.name for tool in tools) == ["add", "get_issue"]
        with pytest.raises(MCPError) as raised:
            await client.call_tool("echo", {"text": "x"})
        assert raised.value.error.code == -32602
        added = await client.call_tool("add", {"a": 1, "b": 2})
        assert added.structured_content == {"result": 3}
        _, out, _ = await mcpxctl(sandbox, "status", "--json")
        upstreams = {u["name"]: u for u in json.loads(out)["upstreams"]}
        assert upstreams["alpha"]["withheld_tools"] == ["echo"]
        assert upstreams["beta"]["withheld_tools"] == ["echo"]
        _, out, _ = await mcpxctl(sandbox, "status")
        assert "withheld (name collision): echo" in out
    assert "tool name collision" in sandbox.log.read_text()


async def test_cancelled_call_gets_no_response_and_the_session_goes_on(sandbox: Sandbox) -> None:
    slow = HangingTool("slow")
    alpha = Upstream("alpha", json_response=False, customize=slow.customize)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    async with running(alpha), running_daemon(sandbox), raw_agent(sandbox) as peer:
        await peer.request(0, "initialize", {"protocolVersion": "2025-11-25", "capabilities": {}})
        await peer.send({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "alpha__slow"}})
        async with asyncio.timeout(10):
            await slow.started.wait()
        await peer.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}})
        async with asyncio.timeout(10):
            await slow.cancelled.wait()  # mcpx passed the cancellation on: the upstream's tool was cancelled
        # The next response on the wire is for request 3, not a late one for the cancelled request 1.
        echo = {"name": "alpha__echo", "arguments": {"text": "after"}}
        await peer.send({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": echo})
        reply = await peer.next_response()
        assert reply["id"] == 3
        assert reply["result"]["content"][0]["text"] == "alpha:after"


async def test_a_request_cancelled_in_the_same_write_leaves_no_work_unawaited(tmp_path: Path) -> None:
    # An agent that sends a request and its cancellation in one write: the request's task is cancelled in the
    # same turn of the loop that made it. Were it cancelled before its first step, the work handed to it would
    # never be awaited, and Python would warn of it in the daemon's log.
    alpha = Upstream("alpha", json_response=True)
    async with running(alpha):
        router = Router(parse_config(upstream_toml("alpha", alpha.url), tmp_path / "config.toml"), tmp_path)
        await router.start()
        sent: list[bytes] = []
        session = AgentSession(router, NoControl(), sent.append, PeerCredentials(uid=os.getuid(), pid=None))
        try:
            await router.wait_settled(10)
            session.on_line(b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25"}}')
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                # A request the session runs as its own task, and a tool call the router runs as one (a name its
                # catalog does not know is looked up in a task), each cancelled in the write that made it.
                session.on_line(b'{"jsonrpc":"2.0","id":7,"method":"prompts/get","params":{"name":"alpha__none"}}')
                session.on_line(b'{"jsonrpc":"2.0","id":8,"method":"tools/call","params":{"name":"alpha__none"}}')
                tasks = [session._in_flight[7], session._in_flight[8]]
                for request_id in (7, 8):
                    cancel = {
                        "jsonrpc": "2.0",
                        "method": "notifications/cancelled",
                        "params": {"requestId": request_id},
                    }
                    session.on_line(json.dumps(cancel).encode())
                await asyncio.wait(tasks, timeout=10)
                assert all(task.cancelled() for task in tasks)
                del tasks
                gc.collect()
            assert [str(warning.message) for warning in caught] == []
            assert [json.loads(message)["id"] for message in sent] == [1]  # no answer to a cancelled request
        finally:
            session.close()
            await router.stop()


async def test_a_tool_result_reaches_the_agent_byte_for_byte_with_fields_no_sdk_model_knows(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=True)
    alpha.extra_result_fields = {
        "xVendor": {"deep": [1, 2.5, None, "\u00e9\u2028"], "order": {"z": 1, "a": 2}},
        "_meta": {"vendor.example/trace": "t-1"},
        "structuredContent": {"b": 1, "a": [{}]},
    }
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    async with running(alpha), running_daemon(sandbox), raw_agent(sandbox) as peer:
        await peer.send(
            {
                "jsonrpc": "2.0",
                "id": "call-1",
                "method": "tools/call",
                "params": {"name": "alpha__echo", "arguments": {"text": "x"}},
            }
        )
        async with asyncio.timeout(10):
            line = await peer.reader.readline()
    (sent,) = alpha.tool_call_bodies
    # Only the id differs: everything after it is the upstream's own bytes.
    assert line.startswith(b'{"jsonrpc":"2.0","id":"call-1","result":')
    assert line.rstrip(b"\n").partition(b',"result":')[2] == sent.partition(b',"result":')[2]
    assert json.loads(line)["result"]["xVendor"]["order"] == {"z": 1, "a": 2}


INITIALIZE = b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25"}}'


async def test_an_agent_that_does_not_read_is_closed_without_breaking_a_broadcast(tmp_path: Path) -> None:
    # An upstream's log message outside any call goes to every agent. One that never reads overflows its output
    # and is closed; the others get every message, and the broadcast goes on (it once died mid-loop, and with it
    # the upstream's GET stream).
    text = "[daemon]\nmax_message_bytes = 4096\n" + upstream_toml("alpha", "http://127.0.0.1:9/mcp")
    router = Router(parse_config(text, tmp_path / "config.toml"), tmp_path)
    await router.start()
    loop = asyncio.get_running_loop()
    connections: set[AgentConnection] = set()
    ends = [socket.socketpair() for _ in range(2)]
    try:
        await router.wait_settled(10)
        agents = []
        ends[0][0].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # (a few messages fill the stalled one)
        for ours, _ in ends:
            connection = AgentConnection(
                router, NoControl(), connections, 4096, peer=PeerCredentials(uid=os.getuid(), pid=None)
            )
            await loop.connect_accepted_socket(functools.partial(_same, connection), sock=ours)
            connection.session.on_line(INITIALIZE)
            agents.append(connection)
        stalled, reading = agents
        reader, writer = await asyncio.open_unix_connection(sock=ends[1][1])
        assert b'"id":1' in await reader.readline()
        message = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "x" * 1000}}
        for _ in range(100):
            router.server_notification("alpha", message)
        async with asyncio.timeout(10):
            for _ in range(100):
                assert b"notifications/message" in await reader.readline()
        assert stalled not in connections and reading in connections
        assert list(router._agents) == [reading.session]
        writer.close()
        await writer.wait_closed()
    finally:
        for connection in list(connections):
            connection.close()
        for ours, theirs in ends:
            ours.close()
            theirs.close()
        await router.stop()


async def test_an_agent_that_never_initialized_leaves_nothing_behind(tmp_path: Path) -> None:
    # Calls are served before the handshake; an agent that leaves without one must not leave its own upstream
    # session (a child process, for a stdio server) or other state behind.
    alpha = Upstream("alpha", json_response=True)
    async with running(alpha):
        router = Router(
            parse_config(upstream_toml("alpha", alpha.url, sharing="per-agent"), tmp_path / "c.toml"), tmp_path
        )
        await router.start()
        sent: list[bytes] = []
        session = AgentSession(router, NoControl(), sent.append, PeerCredentials(uid=os.getuid(), pid=None))
        try:
            await router.wait_settled(10)
            call = {"name": "alpha__echo", "arguments": {"text": "x"}}
            session.on_line(json.dumps({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": call}).encode())
            await asyncio.wait([session._in_flight[2]], timeout=10)
            assert b"alpha:x" in sent[-1]
            assert router._private
            session.close()
            assert not router._private
        finally:
            session.close()
            await router.stop()


def _same(connection: AgentConnection) -> AgentConnection:
    return connection
