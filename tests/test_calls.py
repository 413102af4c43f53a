"""What happens to one call on its way through mcpx: deadlines, progress, log messages, upstream errors."""

from __future__ import annotations

import asyncio

import mcp_types
from mcp.server.mcpserver import Context, MCPServer
from mcp.shared.exceptions import MCPError

from tests.support.daemon import Sandbox, agent, running_daemon, upstream_toml
from tests.support.results import text_of
from tests.support.upstream import HangingTool, Upstream, running


async def test_a_call_past_the_upstream_timeout_ends_with_a_tool_error_and_upstream_is_told(sandbox: Sandbox) -> None:
    sleepy = HangingTool("sleepy")
    alpha = Upstream("alpha", json_response=False, customize=sleepy.customize)
    sandbox.write_config(upstream_toml("alpha", alpha.url, timeout=0.5))
    async with running(alpha), running_daemon(sandbox), agent(sandbox) as client:
        result = await client.call_tool("alpha__sleepy", {})
        assert result.is_error
        assert "alpha" in text_of(result)
        assert "0.5 s" in text_of(result)
        async with asyncio.timeout(10):
            await sleepy.cancelled.wait()  # mcpx sent notifications/cancelled upstream
        assert text_of(await client.call_tool("alpha__echo", {"text": "next"})) == "alpha:next"


async def test_progress_and_log_messages_of_a_call_reach_the_calling_agent(sandbox: Sandbox) -> None:
    def chatty(server: MCPServer) -> None:
        @server.tool()
        async def work(steps: int, ctx: Context) -> str:
            for step in range(1, steps + 1):
                await ctx.report_progress(step, steps, f"step {step}")
            await ctx.info("all steps done")
            return "worked"

    alpha = Upstream("alpha", json_response=False, customize=chatty)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    seen_progress: list[tuple[float, float | None, str | None]] = []
    logs: list[object] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen_progress.append((progress, total, message))

    async def on_log(params: mcp_types.LoggingMessageNotificationParams) -> None:
        logs.append(params.data)

    async with running(alpha), running_daemon(sandbox), agent(sandbox, logging_callback=on_log) as client:
        result = await client.call_tool("alpha__work", {"steps": 3}, progress_callback=on_progress)
        assert text_of(result) == "worked"
    assert seen_progress == [(1, 3, "step 1"), (2, 3, "step 2"), (3, 3, "step 3")]
    assert logs == ["all steps done"]


async def test_a_json_rpc_error_from_the_upstream_reaches_the_agent_unchanged(sandbox: Sandbox) -> None:
    def strict(server: MCPServer) -> None:
        @server.tool()
        def refuse() -> str:
            raise MCPError(code=-32042, message="needs something", data={"hint": "kept as is"})

    alpha = Upstream("alpha", json_response=True, customize=strict)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    async with running(alpha), running_daemon(sandbox), agent(sandbox) as client:
        try:
            await client.call_tool("alpha__refuse", {})
        except MCPError as exc:
            assert exc.error.code == -32042
            assert exc.error.message == "needs something"
            assert exc.error.data == {"hint": "kept as is"}
        else:
            raise AssertionError("expected the upstream's JSON-RPC error")
