"""Stdio (`command`) upstreams through the real mcpxd: a real SDK stdio server (tests/support/stdio_server.py) started
by the daemon, agents (the SDK client through the real shim) using it: tools, the minimal environment, stderr in
the log with secrets redacted, a crash and the restart, backoff for a server that keeps crashing, a server that
stops reading its stdin (tests/support/stdio_stops_reading.py) stopped and restarted, the stop at
shutdown and at a reload, and the rest of the surface (prompts, resources, elicitation, sampling, progress, log
messages, cancellation) over stdio."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from typing import Any

import mcp_types
import pytest
from mcp.client import Client, ClientRequestContext
from mcp.types import (
    CreateMessageRequestParams,
    CreateMessageResult,
    ElicitRequestParams,
    ElicitResult,
    TextContent,
)

from mcpx.upstream.stdio import INHERITED
from tests.support.agents import change_watcher, wait_for_tools
from tests.support.daemon import Sandbox, agent, mcpxctl, running_daemon
from tests.support.lifecycle import wait_for_exit
from tests.support.results import text_of
from tests.support.stdio import STOPS_READING, gone, stdio_toml

# A session that was up at least reconnect_max is replaced at once when its process dies: tests of the restart
# make that always true.
INSTANT_RESTART = "[daemon]\nreconnect_initial = 0.001\nreconnect_max = 0.001\n\n"
WAIT = 15.0


async def _pid(client: Client, upstream: str = "local") -> int:
    result = await client.call_tool(f"{upstream}__pid", {})
    assert not result.is_error, text_of(result)
    assert result.structured_content is not None
    pid = result.structured_content["result"]
    assert isinstance(pid, int)
    return pid


async def _status(sandbox: Sandbox) -> dict[str, dict[str, Any]]:
    code, out, _ = await mcpxctl(sandbox, "status", "--json")
    assert code == 0
    return {upstream["name"]: upstream for upstream in json.loads(out)["upstreams"]}


def _log_events(sandbox: Sandbox, event: str, upstream: str | None = None) -> list[dict[str, Any]]:
    """The daemon log's entries of one event (of one upstream)."""
    entries = map(json.loads, sandbox.log.read_text().splitlines())
    return [entry for entry in entries if entry.get("event") == event and upstream in (None, entry.get("upstream"))]


async def test_an_agent_uses_a_stdio_server_configured_the_claude_desktop_way(sandbox: Sandbox) -> None:
    secret = "stdio-secret-0123456789abcdef"
    sandbox.env["STDIO_CANARY_VALUE"] = secret
    sandbox.env["MCPX_UNNAMED_CANARY"] = "unnamed-canary-value-0987654321"
    sandbox.write_config(
        stdio_toml(
            "local",
            table="[mcpServers.local]",
            env={"STDIO_TEST_SECRET": "${STDIO_CANARY_VALUE}", "GREETING": "hello"},
        )
    )
    async with running_daemon(sandbox), agent(sandbox) as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
        assert {"local__echo", "local__env_names", "local__crash", "local__garbage"} <= names
        assert text_of(await client.call_tool("local__echo", {"text": "hi"})) == "local:hi"

        listed = await client.call_tool("local__env_names", {})
        assert listed.structured_content is not None
        env_names = set(listed.structured_content["result"])
        assert {"GREETING", "STDIO_TEST_SECRET", "PATH", "HOME"} <= env_names
        assert "MCPX_UNNAMED_CANARY" not in env_names
        assert "MCPX_CONFIG" not in env_names  # nothing of mcpxd's own environment but the inherited few
        configured = {"GREETING", "STDIO_TEST_SECRET"}
        assert {name for name in env_names - INHERITED - configured if not name.startswith("LC_")} == set()

        # A line that is not JSON-RPC on the server's stdout is skipped; the session goes on.
        assert text_of(await client.call_tool("local__garbage", {})) == "after garbage"
        assert text_of(await client.call_tool("local__echo", {"text": "still"})) == "local:still"
        # The agent never sees a secret the server echoes (it is registered, so results are scrubbed).
        echoed = text_of(await client.call_tool("local__env_value", {"variable": "STDIO_TEST_SECRET"}))
        assert secret not in echoed
    # The server's stderr reached the log (all of it: the stop waits for the pipe to close), the secret redacted.
    log = sandbox.log.read_text()
    assert secret not in log
    lines = [event["line"] for event in _log_events(sandbox, "stdio server stderr")]
    assert any(line.startswith("local started with secret <secret sha256:") for line in lines), lines


@pytest.mark.parametrize("sharing", ["shared", "per-agent"])
async def test_a_crashed_stdio_server_is_restarted_and_the_next_call_works(sandbox: Sandbox, sharing: str) -> None:
    sandbox.write_config(INSTANT_RESTART + stdio_toml("local", sharing=sharing))
    changed, on_message = change_watcher()
    async with running_daemon(sandbox), agent(sandbox, message_handler=on_message) as client:
        await client.list_tools()
        first = await _pid(client)
        changed.clear()
        crashed = await client.call_tool("local__crash", {"status": 9})
        assert crashed.is_error
        assert "exited with status 9" in text_of(crashed)
        assert "local crashing with 9" in text_of(crashed)  # its last stderr line
        second = await _pid(client)
        assert second != first
        assert text_of(await client.call_tool("local__echo", {"text": "after"})) == "local:after"
        assert not changed.is_set()  # the restarted server has the same tools: agents are not told of a change
        assert gone(first)
    assert gone(second)


async def _until_retrying(client: Client) -> str:
    """The error of a call made once the supervisor has scheduled its next attempt (a call made before that fails
    at once too, without the delay); each call returns at once, and the loop is bounded."""
    async with asyncio.timeout(WAIT):
        while True:
            result = await client.call_tool("local__echo", {"text": "x"})
            assert result.is_error
            if "retrying in" in text_of(result):
                return text_of(result)


async def test_a_stdio_server_that_keeps_crashing_is_restarted_with_backoff(sandbox: Sandbox) -> None:
    sandbox.write_config(
        "[daemon]\nreconnect_initial = 2\nreconnect_max = 60\n\n" + stdio_toml("local", sharing="shared")
    )
    async with running_daemon(sandbox), agent(sandbox) as client:
        await _pid(client)
        assert (await client.call_tool("local__crash", {"status": 1})).is_error
        # It had not been up for reconnect_max: the restart waits out the backoff, and calls fail at once meanwhile.
        waiting = await _until_retrying(client)
        assert "exited with status 1" in waiting
        assert "retrying in 2 s" in waiting
        async with asyncio.timeout(WAIT):
            while (await _status(sandbox))["local"]["state"] != "ready":
                pass
        assert text_of(await client.call_tool("local__echo", {"text": "back"})) == "local:back"
        # Crashing again soon after: the delay has doubled.
        assert (await client.call_tool("local__crash", {"status": 1})).is_error
        assert "retrying in 4 s" in await _until_retrying(client)
    started = _log_events(sandbox, "stdio server started", "local")
    assert len(started) == 2  # no restart but the one after the backoff


@pytest.mark.parametrize("sharing", ["shared", "per-agent"])
async def test_a_stdio_server_that_stops_reading_its_stdin_is_stopped_and_restarted(
    sandbox: Sandbox, sharing: str
) -> None:
    sandbox.write_config(
        INSTANT_RESTART
        + "[[proxy.upstream]]\n"
        + 'name = "hangs"\n'
        + f"command = {json.dumps(sys.executable)}\nargs = {json.dumps([STOPS_READING])}\n"
        + f'timeout = 1\nsharing = "{sharing}"\n'
    )
    size = 1 << 20  # far more than the pipe holds
    async with running_daemon(sandbox), agent(sandbox) as client:
        first = int(text_of(await client.call_tool("hangs__pid", {})))
        assert text_of(await client.call_tool("hangs__freeze", {})) == "frozen"  # it reads nothing from now on
        stuck = await client.call_tool("hangs__echo", {"text": "x" * size})
        assert stuck.is_error
        # At its deadline (the request not read), or failed with the others when the child was found hung.
        assert text_of(stuck).startswith("upstream 'hangs': ")
        assert "stdin" in text_of(stuck)
        await wait_for_exit(first, WAIT)
        second = int(text_of(await client.call_tool("hangs__pid", {})))
        assert second != first
        assert text_of(await client.call_tool("hangs__echo", {"text": "x" * size})) == f"{size} from {second}"
    stalled = _log_events(sandbox, "stdio server stopped reading its stdin; stopping it")
    assert [(entry["level"], entry["upstream"], entry["pid"]) for entry in stalled] == [("warning", "hangs", first)]


async def test_shutdown_stops_stdio_servers_politely_or_by_sigkill(sandbox: Sandbox) -> None:
    sandbox.write_config(
        stdio_toml("polite", sharing="shared") + stdio_toml("stubborn", "--stubborn", sharing="shared")
    )
    async with running_daemon(sandbox) as daemon, agent(sandbox) as client:
        polite, stubborn = await _pid(client, "polite"), await _pid(client, "stubborn")
        daemon.signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT):
            assert daemon.process is not None
            assert await daemon.process.wait() == 0
    assert gone(polite)
    assert gone(stubborn)
    stopped = {event["upstream"]: event for event in _log_events(sandbox, "stdio server stopped")}
    assert (stopped["polite"]["by"], stopped["polite"]["status"]) == ("stdin closed", "exited with status 0")
    assert (stopped["stubborn"]["by"], stopped["stubborn"]["status"]) == ("SIGKILL", "was killed by SIGKILL")


async def test_a_reload_that_removes_a_stdio_upstream_stops_its_processes(sandbox: Sandbox) -> None:
    sandbox.write_config(stdio_toml("local") + stdio_toml("other", sharing="shared"))
    changed, on_message = change_watcher()
    async with running_daemon(sandbox), agent(sandbox, message_handler=on_message) as client:
        private = await _pid(client)  # this agent's own process (per-agent is the default for command upstreams)
        other = await _pid(client, "other")
        sandbox.write_config(stdio_toml("other", sharing="shared"))
        code, _, err = await mcpxctl(sandbox, "reload")
        assert code == 0, err
        assert gone(private)
        started = {event["pid"] for event in _log_events(sandbox, "stdio server started", "local")}
        stopped = {event["pid"] for event in _log_events(sandbox, "stdio server stopped", "local")}
        assert private in started
        assert started == stopped  # the catalog's process and the agent's own
        assert all(gone(pid) for pid in started)
        await wait_for_tools(client, changed, lambda names: not any(name.startswith("local__") for name in names))
        assert await _pid(client, "other") == other  # the other upstream kept its process


async def test_prompts_resources_questions_progress_and_cancellation_over_stdio(sandbox: Sandbox) -> None:
    sandbox.write_config(stdio_toml("local", timeout=2))
    asked: list[str] = []
    seen_progress: list[tuple[float, float | None, str | None]] = []
    logs: list[object] = []

    async def on_elicit(context: ClientRequestContext, params: ElicitRequestParams) -> ElicitResult:
        asked.append(params.message)
        return ElicitResult(action="accept", content={"name": "ada"})

    async def on_sampling(context: ClientRequestContext, params: CreateMessageRequestParams) -> CreateMessageResult:
        (message,) = params.messages
        assert isinstance(message.content, TextContent)
        return CreateMessageResult(
            role="assistant", content=TextContent(type="text", text=message.content.text[:5]), model="tiny"
        )

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen_progress.append((progress, total, message))

    async def on_log(params: mcp_types.LoggingMessageNotificationParams) -> None:
        logs.append(params.data)

    async with (
        running_daemon(sandbox),
        agent(
            sandbox, elicitation_callback=on_elicit, sampling_callback=on_sampling, logging_callback=on_log
        ) as client,
    ):
        prompts = {prompt.name for prompt in (await client.list_prompts()).prompts}
        assert "local__review" in prompts
        got = await client.get_prompt("local__review", {"topic": "stdio"})
        content = got.messages[0].content
        assert isinstance(content, TextContent) and content.text == "local reviews stdio"

        uris = {str(resource.uri) for resource in (await client.list_resources()).resources}
        assert "mcpx://local/note://readme" in uris
        read = await client.read_resource("mcpx://local/note://readme")
        assert [getattr(item, "text", None) for item in read.contents] == ["local readme"]

        assert text_of(await client.call_tool("local__ask_name", {})) == "hello ada"
        assert asked == ["Who are you?"]
        assert text_of(await client.call_tool("local__summarize", {"text": "a long story"})) == "summary: a lon"

        result = await client.call_tool("local__work", {"steps": 3}, progress_callback=on_progress)
        assert text_of(result) == "worked"
        assert seen_progress == [(1, 3, "step 1"), (2, 3, "step 2"), (3, 3, "step 3")]
        assert logs == ["local did 3 steps"]

        # A call past the upstream's timeout ends with a tool error and the server is told to cancel it.
        timed_out = await client.call_tool("local__hang", {})
        assert timed_out.is_error and "2 s" in text_of(timed_out)
        async with asyncio.timeout(WAIT):
            while True:  # each round is one call: the server handles the cancellation as it gets to it
                told = await client.call_tool("local__cancelled", {})
                assert told.structured_content is not None
                if told.structured_content["result"] is True:
                    break


async def test_doctor_says_how_to_fix_a_stdio_server_that_does_not_run(sandbox: Sandbox) -> None:
    sandbox.write_config(
        stdio_toml("local", sharing="shared")
        + '[[proxy.upstream]]\nname = "broken"\ncommand = "mcpx-test-no-such-server"\n'
    )
    async with running_daemon(sandbox), agent(sandbox) as client:
        assert "local__echo" in {tool.name for tool in (await client.list_tools()).tools}
        code, out, _ = await mcpxctl(sandbox, "doctor")
    assert code == 1
    assert "FAIL  upstream broken: not running: cannot start 'mcpx-test-no-such-server': not found on PATH" in out
    assert "fix: check that `mcpx-test-no-such-server` runs (its stderr is in `mcpxctl logs`" in out
    assert "ok    upstream local: ready" in out
