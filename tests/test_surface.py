"""The rest of the handshake-era surface through mcpx, with real SDK upstreams and SDK agents through the shim:
resource subscriptions per agent, per-agent upstream sessions, paginated lists (mcpx's own pages and an
upstream's), resource links in tool results, completions of template arguments, combined instructions."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from mcp.server.mcpserver import Context, MCPServer
from mcp.shared.exceptions import MCPError
from mcp.types import (
    Completion,
    ListToolsResult,
    PaginatedRequestParams,
    ResourceLink,
    ResourceTemplateReference,
    ResourceUpdatedNotification,
    TextResourceContents,
    Tool,
)

from tests.support.daemon import FAST_RECONNECT, Sandbox, agent, running_daemon, upstream_toml
from tests.support.raw import raw_agent
from tests.support.results import text_of
from tests.support.servers import NOTES, Subscriptions
from tests.support.upstream import Upstream, running


def updates_of(received: list[str]):  # type: ignore[no-untyped-def]
    async def on_message(message: object) -> None:
        if isinstance(message, ResourceUpdatedNotification):
            received.append(str(message.params.uri))

    return on_message


async def test_resource_updates_reach_only_the_subscribed_agents(sandbox: Sandbox) -> None:
    subscriptions = Subscriptions()
    alpha = Upstream("alpha", json_response=False, customize=subscriptions.customize)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    exposed = f"mcpx://alpha/{NOTES}"
    seen_ada: list[str] = []
    seen_bob: list[str] = []
    seen_cy: list[str] = []
    async with (
        running(alpha),
        running_daemon(sandbox),
        agent(sandbox, message_handler=updates_of(seen_ada)) as ada,
        agent(sandbox, message_handler=updates_of(seen_bob)) as bob,
        agent(sandbox, message_handler=updates_of(seen_cy)) as cy,
    ):
        resources = ada.server_capabilities.resources
        assert resources is not None and resources.subscribe is True
        await ada.subscribe_resource(exposed)
        await cy.subscribe_resource(exposed)
        assert subscriptions.subscribed == [NOTES]  # one upstream subscription for both agents

        assert text_of(await bob.call_tool("alpha__touch", {"uri": NOTES})) == "touched"
        await ada.list_tools()  # a round trip: what mcpx sent before its answer has arrived
        await bob.list_tools()
        await cy.list_tools()
        assert seen_ada == seen_cy == [exposed]
        assert seen_bob == []

        await ada.unsubscribe_resource(exposed)
        assert subscriptions.unsubscribed == []  # cy still wants it
        await bob.call_tool("alpha__touch", {"uri": NOTES})
        await ada.list_tools()
        await cy.list_tools()
        assert (seen_ada, seen_cy) == ([exposed], [exposed, exposed])

    # cy left without unsubscribing: the upstream subscription ends with the last subscriber.
    async with asyncio.timeout(10):
        await subscriptions.unsubscribe_received.wait()
    assert subscriptions.unsubscribed == [NOTES]


async def test_a_resource_link_in_a_tool_result_reads_back_through_mcpx(sandbox: Sandbox) -> None:
    subscriptions = Subscriptions()
    alpha = Upstream("alpha", json_response=True, customize=subscriptions.customize)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    async with running(alpha), running_daemon(sandbox), agent(sandbox) as client:
        result = await client.call_tool("alpha__linked", {})
        (link,) = result.content
        assert isinstance(link, ResourceLink)
        assert str(link.uri) == f"mcpx://alpha/{NOTES}"
        (content,) = (await client.read_resource(str(link.uri))).contents
        assert isinstance(content, TextResourceContents) and content.text == "notes"


def with_session_echo(server: MCPServer) -> None:
    @server.tool()
    def session(ctx: Context) -> str:
        """The MCP session this call arrived in."""
        headers = ctx.headers or {}
        return str(headers.get("mcp-session-id"))


async def test_per_agent_sharing_gives_each_agent_its_own_upstream_session(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=True, customize=with_session_echo)
    sandbox.write_config(upstream_toml("alpha", alpha.url, sharing="per-agent"))
    async with running(alpha), running_daemon(sandbox):
        async with agent(sandbox) as ada, agent(sandbox) as bob:
            ada_session = text_of(await ada.call_tool("alpha__session", {}))
            bob_session = text_of(await bob.call_tool("alpha__session", {}))
            assert text_of(await ada.call_tool("alpha__session", {})) == ada_session
            assert len({ada_session, bob_session}) == 2
            assert alpha.delete_received.is_set() is False
        # Each agent's session ends when the agent leaves.
        async with asyncio.timeout(10):
            await alpha.delete_received.wait()
        deleted = {r.headers.get("mcp-session-id") for r in alpha.requests if r.method == "DELETE"}
        assert deleted & {ada_session, bob_session}


def with_many_tools(count: int, *, page: int | None = None):  # type: ignore[no-untyped-def]
    """`count` tools; with `page`, the server itself paginates `tools/list` (cursor = offset)."""

    def customize(server: MCPServer) -> None:
        tools = [Tool(name=f"t{index:02d}", input_schema={"type": "object"}) for index in range(count)]
        if page is None:
            for tool in tools:
                server.tool(name=tool.name)(lambda: "ok")
            return

        async def list_tools(ctx: Any, params: PaginatedRequestParams) -> ListToolsResult:
            start = int(params.cursor or 0)
            rest = start + page
            return ListToolsResult(tools=tools[start:rest], next_cursor=str(rest) if rest < count else None)

        server._lowlevel_server.add_request_handler("tools/list", PaginatedRequestParams, list_tools)

    return customize


async def test_aggregated_lists_are_paginated_and_paginated_upstreams_are_read_whole(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=True, customize=with_many_tools(7, page=3))  # pages itself
    beta = Upstream("beta", json_response=True, customize=with_many_tools(4))
    sandbox.write_config(
        "[daemon]\nlist_page_size = 4\n\n" + upstream_toml("alpha", alpha.url) + upstream_toml("beta", beta.url)
    )
    async with running(alpha, beta), running_daemon(sandbox), agent(sandbox) as client:
        names: list[str] = []
        cursor: str | None = None
        pages = 0
        while True:
            listed = await client.list_tools(cursor=cursor)
            assert len(listed.tools) <= 4
            names += [tool.name for tool in listed.tools]
            pages += 1
            if listed.next_cursor is None:
                break
            cursor = listed.next_cursor
        builtin = {f"beta__{name}" for name in ("add", "delete_issue", "echo", "get_issue", "search_issues")}
        expected = {f"alpha__t{index:02d}" for index in range(7)} | {f"beta__t{index:02d}" for index in range(4)}
        assert len(names) == len(set(names))
        assert set(names) - builtin - {f"alpha__{name}" for name in builtin} == expected
        assert pages == -(-len(names) // 4)

        with pytest.raises(MCPError) as raised:
            await client.list_tools(cursor="not-a-cursor")
        assert raised.value.error.code == -32602


def with_completions(server: MCPServer) -> None:
    @server.resource("note://{key}", name="note")
    def note(key: str) -> str:
        return key

    @server.completion()  # type: ignore[no-untyped-call, untyped-decorator]  # the SDK leaves it untyped
    async def complete(ref: Any, argument: Any, context: Any) -> Completion:
        if isinstance(ref, ResourceTemplateReference) and argument.name == "key":
            return Completion(values=[f"{ref.uri!s}:{argument.value}1"])
        return Completion(values=[])


async def test_template_arguments_are_completed_by_the_templates_upstream(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=True, customize=with_completions)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    async with running(alpha), running_daemon(sandbox), agent(sandbox) as client:
        assert client.server_capabilities.completions is not None
        ref = ResourceTemplateReference(type="ref/resource", uri="mcpx://alpha/note://{key}")
        completed = await client.complete(ref, {"name": "key", "value": "ab"})
        assert completed.completion.values == ["note://{key}:ab1"]  # the upstream saw its own template


async def test_instructions_of_the_upstreams_are_combined_under_their_names(sandbox: Sandbox) -> None:
    def instructed(text: str):  # type: ignore[no-untyped-def]
        def customize(server: MCPServer) -> None:
            server._lowlevel_server.instructions = text

        return customize

    alpha = Upstream("alpha", json_response=True, customize=instructed("Use alpha for issues."))
    beta = Upstream("beta", json_response=True, customize=instructed("Beta searches."))
    gamma = Upstream("gamma", json_response=True)
    sandbox.write_config(
        upstream_toml("alpha", alpha.url) + upstream_toml("beta", beta.url) + upstream_toml("gamma", gamma.url)
    )
    async with running(alpha, beta, gamma), running_daemon(sandbox), agent(sandbox) as client:
        instructions = client.instructions
        assert instructions is not None
        assert "## alpha\n\nUse alpha for issues." in instructions
        assert "## beta\n\nBeta searches." in instructions
        assert "gamma" not in instructions
        assert instructions.index("## alpha") < instructions.index("## beta")


def with_everything(server: MCPServer) -> None:
    """Prompts, resources, templates, completions and subscriptions beside the usual tools."""
    Subscriptions().customize(server)
    with_completions(server)

    @server.prompt()
    def review(topic: str) -> str:
        """A prompt."""
        return f"review {topic}"


async def test_every_agent_request_is_answered_under_the_agents_own_id(sandbox: Sandbox) -> None:
    """The table of the handshake-era client requests: each goes through mcpx (to the upstream where it must) and
    comes back under exactly the id the agent sent, strings and integers alike, while all are in flight at once."""
    alpha = Upstream("alpha", json_response=False, customize=with_everything)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    exposed = f"mcpx://alpha/{NOTES}"
    table: list[tuple[int | str, str, dict[str, Any] | None]] = [
        ("ping-1", "ping", None),
        (2, "tools/list", {}),
        ("call-3", "tools/call", {"name": "alpha__echo", "arguments": {"text": "x"}}),
        (4, "prompts/list", {}),
        ("get-5", "prompts/get", {"name": "alpha__review", "arguments": {"topic": "y"}}),
        (6, "resources/list", {}),
        ("7", "resources/templates/list", {}),
        (8, "resources/read", {"uri": exposed}),
        ("sub-9", "resources/subscribe", {"uri": exposed}),
        (
            10,
            "completion/complete",
            {
                "ref": {"type": "ref/resource", "uri": "mcpx://alpha/note://{key}"},
                "argument": {"name": "key", "value": "a"},
            },
        ),
        ("level-11", "logging/setLevel", {"level": "info"}),
    ]
    async with running(alpha), running_daemon(sandbox), raw_agent(sandbox) as peer:
        reply = await peer.request(0, "initialize", {"protocolVersion": "2025-11-25", "capabilities": {}})
        assert reply["result"]["capabilities"]["resources"]["subscribe"] is True
        await peer.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        for request_id, method, params in table:
            message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
            if params is not None:
                message["params"] = params
            await peer.send(message)
        replies: dict[int | str, dict[str, Any]] = {}
        while len(replies) < len(table):
            reply = await peer.next_response()
            replies[reply["id"]] = reply
        assert set(replies) == {request_id for request_id, _, _ in table}
        for request_id, method, _ in table:
            assert "result" in replies[request_id], (method, replies[request_id])
        assert replies["call-3"]["result"]["content"][0]["text"] == "alpha:x"
        assert replies["get-5"]["result"]["messages"][0]["content"]["text"] == "review y"
        assert replies[8]["result"]["contents"][0]["uri"] == exposed
        assert replies[10]["result"]["completion"]["values"] == ["note://{key}:a1"]
        unsubscribed = await peer.request("unsub-12", "resources/unsubscribe", {"uri": exposed})
        assert unsubscribed == {"jsonrpc": "2.0", "id": "unsub-12", "result": {}}


async def test_subscriptions_are_renewed_when_the_upstream_comes_back(sandbox: Sandbox) -> None:
    subscriptions = Subscriptions()
    alpha = Upstream("alpha", json_response=False, customize=subscriptions.customize)
    sandbox.write_config(FAST_RECONNECT + upstream_toml("alpha", alpha.url))
    exposed = f"mcpx://alpha/{NOTES}"
    seen: list[str] = []
    async with running(alpha), running_daemon(sandbox), agent(sandbox, message_handler=updates_of(seen)) as client:
        await client.subscribe_resource(exposed)
        await alpha.stop()
        assert (await client.call_tool("alpha__touch", {"uri": NOTES})).is_error  # mcpx finds it down
        subscriptions.subscribe_received.clear()
        await alpha.start()
        async with asyncio.timeout(15):
            await subscriptions.subscribe_received.wait()  # renewed by mcpx on reconnect, not by the agent
        assert subscriptions.subscribed == [NOTES, NOTES]
        await client.call_tool("alpha__touch", {"uri": NOTES})
        await client.list_tools()
        assert seen == [exposed]


async def test_an_agents_own_session_opened_anew_is_subscribed_again(sandbox: Sandbox) -> None:
    subscriptions = Subscriptions()
    alpha = Upstream("alpha", json_response=True, customize=subscriptions.customize)
    sandbox.write_config(upstream_toml("alpha", alpha.url, sharing="per-agent"))
    async with running(alpha), running_daemon(sandbox), agent(sandbox) as client:
        await client.subscribe_resource(f"mcpx://alpha/{NOTES}")
        await alpha.stop()
        assert (await client.call_tool("alpha__touch", {"uri": NOTES})).is_error  # the agent's session is dropped
        subscriptions.subscribe_received.clear()
        await alpha.start()
        assert text_of(await client.call_tool("alpha__touch", {"uri": NOTES})) == "touched"  # a new session
        async with asyncio.timeout(15):
            await subscriptions.subscribe_received.wait()
        assert subscriptions.subscribed == [NOTES, NOTES]


@pytest.mark.parametrize("sharing", ["shared", "per-agent"])
async def test_subscriptions_are_renewed_when_the_upstream_forgets_the_session(sandbox: Sandbox, sharing: str) -> None:
    subscriptions = Subscriptions()
    alpha = Upstream("alpha", json_response=True, customize=subscriptions.customize)
    sandbox.write_config(upstream_toml("alpha", alpha.url, sharing=sharing))
    async with running(alpha), running_daemon(sandbox), agent(sandbox) as client:
        await client.subscribe_resource(f"mcpx://alpha/{NOTES}")
        subscriptions.subscribe_received.clear()
        await alpha.restart()  # the server forgets every session: mcpx re-initializes on its own (a 404)
        assert text_of(await client.call_tool("alpha__touch", {"uri": NOTES})) == "touched"
        async with asyncio.timeout(15):
            await subscriptions.subscribe_received.wait()  # renewed in the new session, not by the agent
        assert subscriptions.subscribed == [NOTES, NOTES]
