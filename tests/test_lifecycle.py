"""mcpxd under the service manager's signals, with agents connected through the real mcpx-shim.

A reload (SIGHUP) under load fails no call and truncates no result. A stop (SIGTERM) tells the agents, lets every
call in flight finish (or, past the bound, answers it with a JSON-RPC error), and the shim carries each agent's
session over to the next mcpxd, after a graceful stop or a crash, without a new handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
from collections.abc import Awaitable, Callable, Iterator

import mcp_types
import pytest
from mcp.client import Client
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError
from mcp.types import Implementation

import mcpx_shim
from tests.support.agents import change_watcher, wait_for_tools
from tests.support.daemon import Sandbox, agent, mcpxctl, running_daemon, upstream_toml
from tests.support.lifecycle import (
    WAIT,
    GatedTool,
    PipeAgent,
    SocketUnit,
    daemon_pid,
    daemon_status,
    offers_logging,
    shim_started_daemons,
    stopping_the_next_daemon,
)
from tests.support.notify import fake_service_managers
from tests.support.results import text_of
from tests.support.upstream import HangingTool, Upstream, running

AGENTS = 10
BIG = "x" * 200_000  # results larger than a pipe's buffer, so a truncated one cannot pass for whole


def _customized(*steps: Callable[[MCPServer], None]) -> Callable[[MCPServer], None]:
    def customize(server: MCPServer) -> None:
        for step in steps:
            step(server)

    return customize


def _stop_notice_sets(told: asyncio.Event) -> Callable[[mcp_types.LoggingMessageNotificationParams], Awaitable[None]]:
    async def on_log(params: mcp_types.LoggingMessageNotificationParams) -> None:
        if params.logger == "mcpx" and "mcpxd is stopping" in str(params.data):
            assert params.level == "warning"
            told.set()

    return on_log


async def _keep_calling(client: Client, tag: str, reloaded: asyncio.Event, enough: asyncio.Event) -> int:
    """Call `alpha__echo` with large, distinct texts until `enough` is set and two calls were made after `reloaded`;
    every result must come back whole. Returns the number of calls."""
    calls = after_reload = 0
    while not (enough.is_set() and after_reload >= 2):
        calls += 1
        counted = reloaded.is_set()
        text = f"{tag}-{calls}-{BIG}"
        result = await client.call_tool("alpha__echo", {"text": text})
        assert not result.is_error, text_of(result)[:200]
        assert text_of(result) == f"alpha:{text}", f"{tag}: result {calls} differs (length {len(text_of(result))})"
        after_reload += counted
    return calls


async def test_sighup_and_sigterm_while_ten_agents_make_calls(sandbox: Sandbox) -> None:
    """The issue's test: no failed call across a reload; at the stop every call in flight finishes, and the agents'
    sessions go on with the next mcpxd (started by their shims) without a new handshake."""
    across_reload = GatedTool("across_reload", expected=AGENTS)
    across_stop = GatedTool("across_stop", expected=AGENTS)
    alpha = Upstream(
        "alpha",
        json_response=False,
        customize=_customized(across_reload.customize, across_stop.customize, offers_logging),
    )
    beta = Upstream("beta", json_response=True)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    told = [asyncio.Event() for _ in range(AGENTS)]
    changed, on_message = change_watcher()
    async with (
        running(alpha, beta),
        stopping_the_next_daemon(sandbox),
        running_daemon(sandbox) as daemon,
        contextlib.AsyncExitStack() as agents,
    ):
        clients = [
            await agents.enter_async_context(
                agent(
                    sandbox,
                    client_info=Implementation(name=f"agent-{index}", version="1"),
                    logging_callback=_stop_notice_sets(told[index]),
                    message_handler=on_message if index == 0 else None,
                )
            )
            for index in range(AGENTS)
        ]
        await wait_for_tools(clients[0], changed, lambda names: "alpha__echo" in names)

        # SIGHUP: calls that span the reload, and a steady stream of large results around it.
        spanning = [
            asyncio.create_task(client.call_tool("alpha__across_reload", {"text": f"r{index}"}))
            for index, client in enumerate(clients)
        ]
        async with asyncio.timeout(WAIT):
            await across_reload.started.wait()
        reloaded, enough = asyncio.Event(), asyncio.Event()
        load = [
            asyncio.create_task(_keep_calling(client, f"agent-{index}", reloaded, enough))
            for index, client in enumerate(clients)
        ]
        sandbox.write_config(upstream_toml("alpha", alpha.url) + upstream_toml("beta", beta.url))
        daemon.signal(signal.SIGHUP)
        await wait_for_tools(clients[0], changed, lambda names: "beta__echo" in names)
        reloaded.set()
        across_reload.gate.set()
        async with asyncio.timeout(WAIT):
            results = await asyncio.gather(*spanning)
            assert [text_of(result) for result in results] == [f"gated:r{index}" for index in range(AGENTS)]
            enough.set()
            counts = await asyncio.gather(*load)  # any failed or truncated call has raised here
        assert all(count >= 2 for count in counts)
        assert text_of(await clients[5].call_tool("beta__echo", {"text": "new"})) == "beta:new"

        # SIGTERM while every agent has a call in flight.
        assert daemon.process is not None
        old_pid = daemon.process.pid
        in_flight = [
            asyncio.create_task(client.call_tool("alpha__across_stop", {"text": f"s{index}"}))
            for index, client in enumerate(clients)
        ]
        async with asyncio.timeout(WAIT):
            await across_stop.started.wait()
        daemon.signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT):
            for event in told:
                await event.wait()
        # Sent while mcpxd stops: answered by the next one.
        later = [
            asyncio.create_task(client.call_tool("alpha__echo", {"text": f"later{index}"}))
            for index, client in enumerate(clients)
        ]
        across_stop.gate.set()
        async with asyncio.timeout(WAIT):
            finished = await asyncio.gather(*in_flight)
            assert [text_of(result) for result in finished] == [f"gated:s{index}" for index in range(AGENTS)]
            assert await daemon.process.wait() == 0
            answered_later = await asyncio.gather(*later)
        assert [text_of(result) for result in answered_later] == [f"alpha:later{index}" for index in range(AGENTS)]

        # The same SDK sessions go on, served by a new mcpxd that knows them without a new handshake.
        for index, client in enumerate(clients):
            assert text_of(await client.call_tool("alpha__echo", {"text": f"again{index}"})) == f"alpha:again{index}"
        status = await daemon_status(sandbox)
        assert status["pid"] != old_pid
        assert status["agents"] == AGENTS
    audit = [json.loads(line) for line in (sandbox.state / "audit.jsonl").read_text().splitlines()]
    assert [entry for entry in audit if entry["outcome"] != "ok"] == []
    # Both daemons knew each agent by the name in its initialize (the second one from the shim).
    assert {entry["agent"] for entry in audit} == {f"agent-{index}" for index in range(AGENTS)}


async def test_a_call_in_flight_to_an_upstream_whose_settings_a_reload_changes_still_finishes(sandbox: Sandbox) -> None:
    gated = GatedTool("gated")
    alpha = Upstream("alpha", json_response=False, customize=gated.customize)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    async with running(alpha), running_daemon(sandbox) as daemon, agent(sandbox) as client:
        await client.list_tools()
        call = asyncio.create_task(client.call_tool("alpha__gated", {"text": "across"}))
        async with asyncio.timeout(WAIT):
            await gated.started.wait()
        alpha.initialize_received.clear()
        sandbox.write_config(upstream_toml("alpha", alpha.url, timeout=30))
        daemon.signal(signal.SIGHUP)
        async with asyncio.timeout(WAIT):
            await alpha.initialize_received.wait()  # the new session with the new settings
        gated.gate.set()
        async with asyncio.timeout(WAIT):
            result = await call
        assert not result.is_error, text_of(result)
        assert text_of(result) == "gated:across"


async def test_a_call_that_cannot_finish_within_the_stop_timeout_is_answered_with_an_error(sandbox: Sandbox) -> None:
    hanging = HangingTool("hanging")
    alpha = Upstream("alpha", json_response=True, customize=hanging.customize)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    async with (
        running(alpha),
        stopping_the_next_daemon(sandbox),
        running_daemon(sandbox, "--stop-timeout", "0.5") as daemon,
        agent(sandbox) as client,
    ):
        call = asyncio.create_task(client.call_tool("alpha__hanging", {}))
        async with asyncio.timeout(WAIT):
            await hanging.started.wait()
        daemon.signal(signal.SIGTERM)
        with pytest.raises(MCPError) as raised:
            async with asyncio.timeout(WAIT):
                await call
        assert raised.value.error.code == -32603
        assert "mcpx is stopping" in raised.value.error.message
        assert "0.5 s" in raised.value.error.message
        assert daemon.process is not None
        async with asyncio.timeout(WAIT):
            assert await daemon.process.wait() == 0
            await hanging.cancelled.wait()  # the upstream's tool was cancelled, not left running
        # The agent goes on with the next mcpxd.
        assert text_of(await client.call_tool("alpha__echo", {"text": "after"})) == "alpha:after"
    lines = (sandbox.state / "audit.jsonl").read_text().splitlines()
    assert [json.loads(line)["outcome"] for line in lines] == ["cancelled", "ok"]


async def test_stopping_keeps_reading_answers_holds_new_requests_and_the_next_daemon_runs_them(
    sandbox: Sandbox,
) -> None:
    """At the byte level: while its calls finish, the stopping daemon still reads the agent (a cancellation
    reaches it), keeps the requests that arrive for the next daemon, which resumes the session without a new
    handshake and tells the agent to list again."""
    cancelled = HangingTool("cancelled")
    gated = GatedTool("gated")
    alpha = Upstream("alpha", json_response=False, customize=_customized(cancelled.customize, gated.customize))
    sandbox.write_config(upstream_toml("alpha", alpha.url, timeout=300))
    async with (
        running(alpha),
        stopping_the_next_daemon(sandbox),
        running_daemon(sandbox) as daemon,
        PipeAgent.running(sandbox) as peer,
    ):
        client_info = {"name": "raw-agent", "version": "7"}
        init = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": client_info}
        await peer.send({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": init})
        assert (await peer.response(0))["result"]["protocolVersion"] == "2025-06-18"
        await peer.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        call = {"name": "alpha__cancelled", "arguments": {}}
        await peer.send({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": call})
        call = {"name": "alpha__gated", "arguments": {"text": "in flight"}}
        await peer.send({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": call})
        async with asyncio.timeout(WAIT):
            await cancelled.started.wait()
            await gated.started.wait()

        daemon.signal(signal.SIGTERM)
        await daemon.notified(b"STOPPING=1")
        # No logging capability offered: no log message. The request sent now waits for the next daemon; the
        # cancellation after it reaches this one (so it has read the request too).
        call = {"name": "alpha__echo", "arguments": {"text": "held"}}
        await peer.send({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": call})
        await peer.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}})
        async with asyncio.timeout(WAIT):
            await cancelled.cancelled.wait()
        assert daemon.process is not None
        assert daemon.process.returncode is None  # still stopping: request 2 is in flight
        gated.gate.set()
        assert (await peer.response(2))["result"]["content"][0]["text"] == "gated:in flight"
        async with asyncio.timeout(WAIT):
            assert await daemon.process.wait() == 0

        # The shim started the next mcpxd and handed the session over: request 3 is answered there.
        assert (await peer.response(3))["result"]["content"][0]["text"] == "alpha:held"
        await peer.send({"jsonrpc": "2.0", "id": 4, "method": "tools/list"})
        assert "alpha__echo" in {tool["name"] for tool in (await peer.response(4))["result"]["tools"]}
        status = await daemon_status(sandbox)
        assert status["agents"] == 1  # initialized, by the agent's own initialize repeated by the shim
        code, stderr = await peer.close()
    assert code == 0
    assert b"mcpxd went away: reconnecting this session" in stderr
    ids = [message.get("id") for message in peer.received if "method" not in message]
    assert ids == [0, 2, 3, 4]  # nothing for the cancelled request, nothing from the repeated initialize
    handed_over = next(index for index, message in enumerate(peer.received) if message.get("id") == 2)
    assert {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"} in peer.received[handed_over:]
    assert not any("method" in message and message["method"] == "notifications/message" for message in peer.received)
    audit = [json.loads(line) for line in (sandbox.state / "audit.jsonl").read_text().splitlines()]
    assert [(entry["tool"], entry["outcome"], entry["agent"]) for entry in audit] == [
        ("alpha__cancelled", "cancelled", "raw-agent"),
        ("alpha__gated", "ok", "raw-agent"),
        ("alpha__echo", "ok", "raw-agent"),  # run by the next daemon, which knows the agent's name
    ]


async def test_after_a_crash_the_shim_resumes_the_session_with_a_new_daemon(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=True)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    async with (
        running(alpha),
        stopping_the_next_daemon(sandbox),
        running_daemon(sandbox) as daemon,
        agent(sandbox, client_info=Implementation(name="survivor", version="1")) as client,
    ):
        assert text_of(await client.call_tool("alpha__echo", {"text": "before"})) == "alpha:before"
        daemon.signal(signal.SIGKILL)
        assert daemon.process is not None
        async with asyncio.timeout(WAIT):
            assert await daemon.process.wait() == -signal.SIGKILL
        assert text_of(await client.call_tool("alpha__echo", {"text": "after"})) == "alpha:after"
        status = await daemon_status(sandbox)
        assert status["pid"] != daemon.process.pid
        assert status["agents"] == 1
    agents = [json.loads(line)["agent"] for line in (sandbox.state / "audit.jsonl").read_text().splitlines()]
    assert agents == ["survivor", "survivor"]


async def test_a_relayed_session_ends_with_its_daemon_after_its_calls(sandbox: Sandbox) -> None:
    gated = GatedTool("gated")
    alpha = Upstream("alpha", json_response=True, customize=_customized(gated.customize, offers_logging))
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    sandbox.env["MCPX_SHIM_RELAY"] = "1"
    told = asyncio.Event()
    async with (
        running(alpha),
        running_daemon(sandbox) as daemon,
        agent(sandbox, logging_callback=_stop_notice_sets(told)) as client,
    ):
        await client.list_tools()  # the SDK checks results against the listed tools, listing first if it must
        call = asyncio.create_task(client.call_tool("alpha__gated", {"text": "relayed"}))
        async with asyncio.timeout(WAIT):
            await gated.started.wait()
        daemon.signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT):
            await told.wait()
        gated.gate.set()
        async with asyncio.timeout(WAIT):
            assert text_of(await call) == "gated:relayed"
            assert daemon.process is not None
            assert await daemon.process.wait() == 0
        with pytest.raises(MCPError):
            async with asyncio.timeout(WAIT):
                await client.call_tool("alpha__echo", {"text": "nobody"})
    assert await daemon_pid(sandbox) is None  # the relay shim started no daemon


async def test_an_agent_that_does_not_read_its_responses_cannot_hold_up_the_stop(sandbox: Sandbox) -> None:
    """Its session ends (MCPX-END: the shim exits rather than reconnecting) and the daemon exits 0 within its
    bounds."""
    calls = 40
    gated = GatedTool("gated", expected=calls)
    alpha = Upstream("alpha", json_response=True, customize=gated.customize)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    async with (
        running(alpha),
        running_daemon(sandbox) as daemon,
        PipeAgent.running(sandbox, limit=1 << 16) as peer,  # reads at most 128 KiB ahead
    ):
        init = {"protocolVersion": "2025-11-25", "capabilities": {}}
        await peer.send({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": init})
        await peer.response(0)
        for request_id in range(1, calls + 1):
            call = {"name": "alpha__gated", "arguments": {"text": f"{request_id}{BIG}"}}
            await peer.send({"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": call})
        async with asyncio.timeout(WAIT):
            await gated.started.wait()
        daemon.signal(signal.SIGTERM)
        gated.gate.set()  # 8 MB of results the agent does not read
        assert daemon.process is not None
        async with asyncio.timeout(WAIT):
            assert await daemon.process.wait() == 0
            assert await peer.process.wait() == 0  # MCPX-END: the shim exits instead of reconnecting
    assert await daemon_pid(sandbox) is None


async def test_a_service_restart_under_socket_activation_resumes_the_session_through_the_socket_queue(
    sandbox: Sandbox,
) -> None:
    """`systemctl --user restart mcpx`: the socket unit keeps listening, so the shim's reconnection waits in its
    queue (it starts no daemon of its own) and the next mcpxd takes the session over."""
    alpha = Upstream("alpha", json_response=True)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    unit = SocketUnit(sandbox)
    try:
        async with running(alpha):
            first = await unit.start_service()
            try:
                async with agent(sandbox, client_info=Implementation(name="steady", version="1")) as client:
                    assert text_of(await client.call_tool("alpha__echo", {"text": "one"})) == "alpha:one"
                    first.send_signal(signal.SIGTERM)
                    async with asyncio.timeout(WAIT):
                        assert await first.wait() == 0
                    assert sandbox.socket.is_socket()  # the socket unit's: the daemon leaves it alone
                    call = asyncio.create_task(client.call_tool("alpha__echo", {"text": "queued"}))
                    second = await unit.start_service()  # the service manager starts it again
                    try:
                        async with asyncio.timeout(WAIT):
                            assert text_of(await call) == "alpha:queued"
                        status = await daemon_status(sandbox)
                        assert (status["pid"], status["agents"]) == (second.pid, 1)
                        assert shim_started_daemons(sandbox) == []
                    finally:
                        second.send_signal(signal.SIGTERM)
                        async with asyncio.timeout(WAIT):
                            await second.wait()
            finally:
                if first.returncode is None:
                    first.kill()
                    await first.wait()
    finally:
        unit.close()
        sandbox.socket.unlink(missing_ok=True)
    agents = [json.loads(line)["agent"] for line in (sandbox.state / "audit.jsonl").read_text().splitlines()]
    assert agents == ["steady", "steady"]


async def test_install_starts_the_socket_unit_before_it_stops_a_daemon_a_shim_started(sandbox: Sandbox) -> None:
    """So that the stopped daemon's agents reconnect to the service's socket rather than start another daemon,
    which would hold the lock the service's mcpxd needs."""
    sandbox.env.update(fake_service_managers(sandbox.root, sandbox.env["PATH"]))
    sandbox.write_config("")
    async with running_daemon(sandbox) as daemon:
        code, out, err = await mcpxctl(sandbox, "install", "--manager", "systemd")
        assert code == 0, err
        assert daemon.process is not None
        assert out.index("running: systemctl --user start mcpx.socket") < out.index("stopping the mcpxd running")
        async with asyncio.timeout(WAIT):
            assert await daemon.process.wait() == 0
    recorded = (sandbox.root / "record").read_text().splitlines()
    assert recorded[-2:] == [
        "systemctl --user start mcpx.socket",
        "systemctl --user enable --now mcpx.socket mcpx.service",
    ]


@pytest.fixture(autouse=True)
def _no_daemon_survives(sandbox: Sandbox) -> Iterator[None]:
    yield
    # A daemon that a shim started and the test did not stop would outlive the sandbox.
    assert not sandbox.socket.exists(), "an mcpxd still serves the sandbox socket"


def test_the_shim_reads_the_daemons_lifeline_lines_however_they_are_split() -> None:
    """MCPX-SESSION (latest wins), an MCPX-HELD block split anywhere (even inside its header), MCPX-END."""
    held = b'{"jsonrpc":"2.0","id":7,"method":"ping"}\n{"jsonrpc":"2.0","id":8,"method":"tools/list"}\n'
    stream = (
        b'MCPX-SESSION {"clientInfo":{"name":"a"}}\n'
        + b'MCPX-SESSION {"clientInfo":{"name":"b"}}\n'
        + b"MCPX-HELD %d\n" % len(held)
        + held
    )
    for end in (b"MCPX-END\n", b""):
        for cut in range(1, len(stream)):
            daemon, shim = socket.socketpair()
            with daemon, shim:
                daemon.sendall(stream[:cut])
                daemon.sendall(stream[cut:] + end)
                daemon.shutdown(socket.SHUT_WR)
                ended, session, got = mcpx_shim._watch(shim, b"")
            assert (ended, session, got) == (bool(end), b'{"clientInfo":{"name":"b"}}', held), cut
    # An MCPX-HELD block the daemon did not finish sending is dropped; the session is kept.
    daemon, shim = socket.socketpair()
    with daemon, shim:
        daemon.sendall(b'MCPX-SESSION {"x":1}\nMCPX-HELD 100\n' + held)
        daemon.shutdown(socket.SHUT_WR)
        assert mcpx_shim._watch(shim, b"old") == (False, b'{"x":1}', b"")
