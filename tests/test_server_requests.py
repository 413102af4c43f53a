"""An upstream's own requests to the client (elicitation, sampling) during a call reach the agent that made the call,
its answer goes back to that upstream, and an agent that did not declare the capability makes the upstream get
the protocol's error. Real SDK upstream (SSE responses, where the requests ride the call's stream), real SDK
agents through the shim."""

from __future__ import annotations

import asyncio

from mcp.client import ClientRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.types import (
    CreateMessageRequestParams,
    CreateMessageResult,
    ElicitCompleteNotification,
    ElicitRequestParams,
    ElicitRequestURLParams,
    ElicitResult,
    ListRootsResult,
    NotificationParams,
    Root,
    TextContent,
)
from pydantic import FileUrl

from tests.support.agents import answering_as
from tests.support.daemon import Sandbox, agent, running_daemon, upstream_toml
from tests.support.results import text_of
from tests.support.servers import with_questions
from tests.support.upstream import Upstream, running


async def test_an_elicitation_during_a_call_is_answered_by_the_calling_agent_only(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=False, customize=with_questions)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    asked_ada: list[str] = []
    asked_bob: list[str] = []
    async with (
        running(alpha),
        running_daemon(sandbox),
        agent(sandbox, elicitation_callback=answering_as("ada", asked_ada)) as ada,
        agent(sandbox, elicitation_callback=answering_as("bob", asked_bob)) as bob,
    ):
        # Both at once on the one shared upstream session: each question reaches its own caller.
        results = await asyncio.gather(ada.call_tool("alpha__greet", {}), bob.call_tool("alpha__greet", {}))
        assert [text_of(result) for result in results] == ["hello ada", "hello bob"]
        assert asked_ada == asked_bob == ["Who are you?"]


async def test_a_sampling_request_is_answered_by_the_agent_and_refused_for_one_without_the_capability(
    sandbox: Sandbox,
) -> None:
    alpha = Upstream("alpha", json_response=False, customize=with_questions)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    sampled: list[CreateMessageRequestParams] = []

    async def on_sampling(context: ClientRequestContext, params: CreateMessageRequestParams) -> CreateMessageResult:
        sampled.append(params)
        (message,) = params.messages
        assert isinstance(message.content, TextContent)
        return CreateMessageResult(
            role="assistant", content=TextContent(type="text", text=message.content.text[:5]), model="tiny"
        )

    async with (
        running(alpha),
        running_daemon(sandbox),
        agent(sandbox, sampling_callback=on_sampling) as able,
        agent(sandbox) as unable,
    ):
        assert text_of(await able.call_tool("alpha__summarize", {"text": "a long story"})) == "summary: a lon"
        assert sampled[0].max_tokens == 20
        refused = text_of(await unable.call_tool("alpha__summarize", {"text": "x"}))
        assert refused.startswith("sampling refused: -32601"), refused
        assert "did not declare the sampling capability" in refused
        assert len(sampled) == 1


async def test_cancelling_a_call_withdraws_its_pending_elicitation_from_the_agent(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=False, customize=with_questions)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    asked = asyncio.Event()
    withdrawn = asyncio.Event()

    async def never_answer(context: ClientRequestContext, params: ElicitRequestParams) -> ElicitResult:
        asked.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            withdrawn.set()
            raise
        raise AssertionError("unreachable")

    async with running(alpha), running_daemon(sandbox), agent(sandbox, elicitation_callback=never_answer) as client:
        call = asyncio.ensure_future(client.call_tool("alpha__greet", {}))
        async with asyncio.timeout(10):
            await asked.wait()
        call.cancel()
        # The agent cancels its call; mcpx tells the upstream, whose tool ends and withdraws its question
        # (notifications/cancelled from the upstream), which mcpx passes on to the agent under the agent's id.
        async with asyncio.timeout(10):
            await withdrawn.wait()


def with_sign_in(server: MCPServer) -> None:
    @server.tool()
    async def connect(ctx: Context) -> str:
        """Send the user to a URL (URL-mode elicitation), then say it is done."""
        answer = await ctx.elicit_url("Sign in to continue", "https://auth.example.com/start", "sign-in-1")
        await ctx.request_context.session.send_elicit_complete("sign-in-1")  # outside the call: the GET stream
        return answer.action

    @server.tool()
    async def roots(ctx: Context) -> str:
        """The client's roots (asked outside the call, as the SDK does)."""
        listed = await ctx.request_context.session.list_roots()
        return " ".join(str(root.uri) for root in listed.roots)


async def test_url_elicitation_and_its_completion_reach_the_agent_that_was_asked(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=False, customize=with_sign_in)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    urls: list[str] = []
    completed = asyncio.Event()

    async def on_elicit(context: ClientRequestContext, params: ElicitRequestParams) -> ElicitResult:
        assert isinstance(params, ElicitRequestURLParams)
        urls.append(params.url)
        return ElicitResult(action="accept")

    async def on_message(message: object) -> None:
        if isinstance(message, ElicitCompleteNotification) and message.params.elicitation_id == "sign-in-1":
            completed.set()

    async with (
        running(alpha),
        running_daemon(sandbox),
        agent(sandbox, elicitation_callback=on_elicit, message_handler=on_message) as client,
    ):
        assert text_of(await client.call_tool("alpha__connect", {})) == "accept"
        assert urls == ["https://auth.example.com/start"]
        async with asyncio.timeout(10):
            await completed.wait()


async def test_roots_asked_outside_a_call_and_root_changes_reach_the_upstream(sandbox: Sandbox) -> None:
    changed = asyncio.Event()

    def customize(server: MCPServer) -> None:
        with_sign_in(server)

        async def on_roots_changed(ctx: object, params: object) -> None:
            changed.set()

        server._lowlevel_server.add_notification_handler(  # the SDK's MCPServer has no decorator for it
            "notifications/roots/list_changed", NotificationParams, on_roots_changed
        )

    alpha = Upstream("alpha", json_response=True, customize=customize)
    sandbox.write_config(upstream_toml("alpha", alpha.url))

    async def list_roots(context: ClientRequestContext) -> ListRootsResult:
        return ListRootsResult(roots=[Root(uri=FileUrl("file:///work/project"))])

    async with running(alpha), running_daemon(sandbox), agent(sandbox, list_roots_callback=list_roots) as client:
        # The upstream asks on its GET stream, related to no call: mcpx asks the agent that last called it.
        assert text_of(await client.call_tool("alpha__roots", {})) == "file:///work/project"
        await client.send_roots_list_changed()
        async with asyncio.timeout(10):
            await changed.wait()
