"""Agents (the SDK client over stdio through the real mcpx-shim) use real SDK upstreams through the real mcpxd."""

from __future__ import annotations

import asyncio

from tests.support.agents import change_watcher, wait_for_tools
from tests.support.daemon import FAST_RECONNECT, Sandbox, agent, running_daemon, upstream_toml
from tests.support.results import text_of
from tests.support.upstream import TOOLS, TokenCheck, Upstream, running


async def test_agent_sees_and_calls_tools_of_every_upstream(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=True, tokens=TokenCheck({"alpha-token-1234"}))
    beta = Upstream("beta", json_response=False, tokens=TokenCheck({"beta-token-5678"}))
    token_file = sandbox.root / "beta.token"
    token_file.write_text("\n  beta-token-5678\n")
    sandbox.env["ALPHA_TOKEN"] = "alpha-token-1234"
    sandbox.write_config(
        upstream_toml("alpha", alpha.url, auth={"type": "bearer_env", "env": "ALPHA_TOKEN"})
        + upstream_toml(
            "beta",
            beta.url,
            auth={"type": "bearer_file", "path": str(token_file)},
            include_tools=["ECHO", "get*", "search*", "*issue*"],
            exclude_tools=["*delete*"],
        )
    )
    async with running(alpha, beta), running_daemon(sandbox), agent(sandbox) as client:
        tools = await client.list_tools()
        names = sorted(tool.name for tool in tools.tools)
        assert names == sorted(
            [f"alpha__{tool}" for tool in TOOLS] + ["beta__echo", "beta__get_issue", "beta__search_issues"]
        )
        by_name = {tool.name: tool for tool in tools.tools}
        assert by_name["beta__echo"].description == "Echo the text back, prefixed with the server's name."
        assert by_name["alpha__add"].input_schema["properties"].keys() == {"a", "b"}

        assert text_of(await client.call_tool("alpha__echo", {"text": "hi"})) == "alpha:hi"
        assert text_of(await client.call_tool("beta__echo", {"text": "hi"})) == "beta:hi"
        added = await client.call_tool("alpha__add", {"a": 2, "b": 3})
        assert added.structured_content == {"result": 5}
        assert text_of(await client.call_tool("beta__get_issue", {"key": "X-1"})) == "beta:issue X-1"


async def test_ten_agents_hundred_interleaved_calls_each_get_only_their_own_results(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=True)
    beta = Upstream("beta", json_response=False)
    sandbox.write_config(upstream_toml("alpha", alpha.url) + upstream_toml("beta", beta.url))
    async with running(alpha, beta), running_daemon(sandbox):

        async def one_agent(index: int) -> list[tuple[str, str]]:
            async with agent(sandbox) as client:
                await client.list_tools()
                semaphore = asyncio.Semaphore(10)

                async def call(n: int) -> tuple[str, str]:
                    upstream = "alpha" if n % 2 else "beta"
                    text = f"agent{index}-call{n}"
                    async with semaphore:
                        result = await client.call_tool(f"{upstream}__echo", {"text": text})
                    return f"{upstream}:{text}", text_of(result)

                return await asyncio.gather(*(call(n) for n in range(100)))

        results = await asyncio.gather(*(one_agent(index) for index in range(10)))
    pairs = [pair for agent_results in results for pair in agent_results]
    assert len(pairs) == 1000
    misrouted = [(expected, got) for expected, got in pairs if expected != got]
    assert misrouted == []


async def test_upstream_down_at_start_comes_up_and_agents_are_told(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=True)
    late = Upstream("late", json_response=False)
    sandbox.write_config(FAST_RECONNECT + upstream_toml("alpha", alpha.url) + upstream_toml("late", late.url))
    changed, on_message = change_watcher()
    async with running(alpha), running_daemon(sandbox), agent(sandbox, message_handler=on_message) as client:
        # late was never up: only alpha's tools are listed, and a call to late fails at once, naming it.
        names = {tool.name for tool in (await client.list_tools()).tools}
        assert names == {f"alpha__{tool}" for tool in TOOLS}
        failed = await client.call_tool("late__echo", {"text": "x"})
        assert failed.is_error
        assert "late" in text_of(failed)
        assert text_of(await client.call_tool("alpha__echo", {"text": "up"})) == "alpha:up"
        await late.start()
        try:
            await wait_for_tools(client, changed, lambda names: "late__echo" in names)
            assert text_of(await client.call_tool("late__echo", {"text": "back"})) == "late:back"
        finally:
            await late.stop()
