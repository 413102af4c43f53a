"""Upstreams of protocol 2026-07-28 (stateless): `protocol = "auto"` switching to it when the handshake is refused,
pinned, and kept off for a server of both eras; what the server sees (headers, the `_meta` envelope); progress,
MRTR elicitation, resources, prompts and `subscriptions/listen` as the agent sees them; answers that are garbage
or hostile; the config option. Real SDK servers (made modern-only by `Upstream(modern_only=True)`), the real
mcpxd, the SDK client through the real shim.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, cast

import mcp_types
import pytest
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.resolve import Elicit, Resolve
from mcp.server.subscriptions import ListenHandler
from mcp.shared.exceptions import MCPError
from mcp_types import (
    RequestParamsMeta,
    SubscriptionFilter,
    SubscriptionsListenRequestParams,
    SubscriptionsListenResult,
    TextResourceContents,
)
from pydantic import BaseModel, Field

from mcpx.upstream.stateless import header_annotations, header_value, invalid_header_annotation, param_headers
from tests.support.agents import answering_as
from tests.support.configs import config_problems, write_config_file
from tests.support.daemon import FAST_RECONNECT, Sandbox, agent, mcpxctl, running_daemon, upstream_toml
from tests.support.results import text_of
from tests.support.upstream import MODERN_VERSION, SeenPost, TokenCheck, Upstream, running

WAIT = 15.0


async def posts_until(upstream: Upstream, predicate: Callable[[SeenPost], bool]) -> SeenPost:
    """The first POST the upstream received that satisfies `predicate`, waiting (bounded) for it."""
    async with asyncio.timeout(WAIT):
        while True:
            for post in upstream.posts:
                if predicate(post):
                    return post
            upstream.posted.clear()
            await upstream.posted.wait()


def method_is(method: str) -> Callable[[SeenPost], bool]:
    return lambda post: post.body.get("method") == method


async def status_of(sandbox: Sandbox, name: str) -> dict[str, Any]:
    code, out, err = await mcpxctl(sandbox, "status", "--json")
    assert code == 0, err
    (upstream,) = [u for u in json.loads(out)["upstreams"] if u["name"] == name]
    return upstream  # type: ignore[no-any-return]


# --- choosing the era --------------------------------------------------------------------------------------------


async def test_auto_switches_to_stateless_when_the_handshake_is_refused(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=False, modern_only=True)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    async with running(alpha), running_daemon(sandbox), agent(sandbox) as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
        assert {"alpha__echo", "alpha__add"} <= names
        assert text_of(await client.call_tool("alpha__echo", {"text": "hi"})) == "alpha:hi"
        added = await client.call_tool("alpha__add", {"a": 2, "b": 3})
        assert added.structured_content == {"result": 5}

        assert (await status_of(sandbox, "alpha"))["protocol_version"] == MODERN_VERSION
        code, table, _ = await mcpxctl(sandbox, "status")
        assert code == 0 and "PROTOCOL" in table and MODERN_VERSION in table
    methods = [post.body.get("method") for post in alpha.posts]
    assert methods[0] == "initialize" and "server/discover" in methods  # the handshake first, then the switch
    assert methods.count("initialize") == 1
    assert all("mcp-session-id" not in post.headers for post in alpha.posts)


async def test_pinned_2026_07_28_never_tries_the_handshake(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=True, modern_only=True)
    sandbox.write_config(upstream_toml("alpha", alpha.url, protocol="2026-07-28"))
    async with running(alpha), running_daemon(sandbox), agent(sandbox) as client:
        assert text_of(await client.call_tool("alpha__echo", {"text": "pinned"})) == "alpha:pinned"
    assert alpha.posts[0].body.get("method") == "server/discover"
    assert all(post.headers.get("mcp-protocol-version") == MODERN_VERSION for post in alpha.posts)


async def test_a_server_of_both_eras_keeps_the_handshake_under_auto(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=True)  # the SDK's app answers both eras
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    async with running(alpha), running_daemon(sandbox), agent(sandbox) as client:
        assert text_of(await client.call_tool("alpha__echo", {"text": "old"})) == "alpha:old"
        assert (await status_of(sandbox, "alpha"))["protocol_version"] == "2025-11-25"
    calls = [seen for seen in alpha.requests if seen.method == "POST"]
    assert calls and all(seen.headers.get("mcp-protocol-version") != MODERN_VERSION for seen in calls)
    assert any("mcp-session-id" in seen.headers for seen in calls)


async def test_handshake_only_reports_a_modern_server_clearly(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=True, modern_only=True)
    sandbox.write_config(upstream_toml("alpha", alpha.url, protocol="handshake"))
    async with running(alpha), running_daemon(sandbox), agent(sandbox) as client:
        result = await client.call_tool("alpha__echo", {"text": "x"})
        assert result.is_error
        assert "2026-07-28 only" in text_of(result) and 'protocol = "handshake"' in text_of(result)
    assert alpha.posts and all(post.body.get("method") == "initialize" for post in alpha.posts)


# --- what the server sees ----------------------------------------------------------------------------------------


def with_routed_tool(server: MCPServer) -> None:
    @server.tool()
    def regional(
        region: Annotated[str, Field(json_schema_extra={"x-mcp-header": "Region"})],
        query: str,
    ) -> str:
        """A tool whose `region` argument travels as a header too (the SDK server checks it against the body)."""
        return f"{region}:{query}"


def with_a_broken_tool_listed(body: dict[str, Any]) -> bytes | None:
    """A tools/list answer that adds a tool with an invalid annotation (on a number), which an HTTP client must
    drop (the SDK server would not register one)."""
    if body.get("method") != "tools/list":
        return None
    header = {"type": "string", "x-mcp-header": "Region"}
    regional = {"type": "object", "properties": {"region": header, "query": {"type": "string"}}}
    broken = {"type": "object", "properties": {"amount": {"type": "number", "x-mcp-header": "Amount"}}}
    tools = [{"name": "regional", "inputSchema": regional}, {"name": "broken", "inputSchema": broken}]
    result = {"tools": tools, "resultType": "complete", "ttlMs": 0, "cacheScope": "private"}
    return json.dumps({"jsonrpc": "2.0", "id": body["id"], "result": result}).encode()


async def test_headers_and_envelope_the_server_sees(sandbox: Sandbox) -> None:
    alpha = Upstream(
        "alpha", json_response=True, modern_only=True, tokens=TokenCheck({"tok-1234"}), customize=with_routed_tool
    )
    alpha.answer_instead = with_a_broken_tool_listed
    sandbox.env["ALPHA_TOKEN"] = "tok-1234"
    sandbox.write_config(upstream_toml("alpha", alpha.url, auth={"type": "bearer_env", "env": "ALPHA_TOKEN"}))
    async with running(alpha), running_daemon(sandbox), agent(sandbox) as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
        assert "alpha__regional" in names and "alpha__broken" not in names
        result = await client.call_tool(
            "alpha__regional",
            {"region": "Zürich", "query": "q"},
            meta=cast(RequestParamsMeta, {"com.example/trace": "t-1"}),
        )
        assert text_of(result) == "Zürich:q"
    call = await posts_until(alpha, method_is("tools/call"))
    headers, params = call.headers, call.body["params"]
    assert headers["mcp-protocol-version"] == MODERN_VERSION
    assert headers["mcp-method"] == "tools/call"
    assert headers["mcp-name"] == "regional"  # the upstream's own name, not the namespaced one
    assert headers["mcp-param-region"] == header_value("Zürich") and headers["mcp-param-region"].startswith("=?base64?")
    assert headers["authorization"] == "Bearer tok-1234"
    assert "mcp-session-id" not in headers
    meta = params["_meta"]
    assert meta["io.modelcontextprotocol/protocolVersion"] == MODERN_VERSION
    assert meta["io.modelcontextprotocol/clientInfo"]["name"] == "mcpx"
    assert "elicitation" in meta["io.modelcontextprotocol/clientCapabilities"]
    assert meta["com.example/trace"] == "t-1"  # the agent's own keys are kept
    discover = await posts_until(alpha, method_is("server/discover"))
    assert discover.headers["mcp-method"] == "server/discover" and "mcp-name" not in discover.headers


def tool_list_changes(changed: asyncio.Event) -> Callable[[object], Any]:
    """An agent's message handler that sets `changed` on each `notifications/tools/list_changed`."""

    async def on_message(message: object) -> None:
        if getattr(message, "method", None) == "notifications/tools/list_changed":
            changed.set()

    return on_message


async def test_a_header_mismatch_rereads_the_tool_list_and_sends_the_call_again(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=True, modern_only=True, customize=with_routed_tool)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    tools_changed = asyncio.Event()
    async with (
        running(alpha),
        running_daemon(sandbox),
        agent(sandbox, message_handler=tool_list_changes(tools_changed)) as client,
    ):
        assert "alpha__regional" in {tool.name for tool in (await client.list_tools()).tools}
        # The server's tool now takes its region from another header, and it tells no one: mcpx's headers are stale.
        assert alpha.server is not None
        alpha.server.remove_tool("regional")

        @alpha.server.tool(name="regional")
        def zoned(region: Annotated[str, Field(json_schema_extra={"x-mcp-header": "Zone"})], query: str) -> str:
            return f"{region}/{query}"

        assert text_of(await client.call_tool("alpha__regional", {"region": "eu", "query": "q"})) == "eu/q"
        async with asyncio.timeout(WAIT):  # the agents' catalog follows the tool list mcpx read again
            while True:
                (tool,) = [tool for tool in (await client.list_tools()).tools if tool.name == "alpha__regional"]
                if tool.input_schema["properties"]["region"].get("x-mcp-header") == "Zone":
                    break
                await tools_changed.wait()
                tools_changed.clear()
    first, retry = [post for post in alpha.posts if post.body.get("method") == "tools/call"]
    assert first.headers["mcp-param-region"] == "eu" and "mcp-param-zone" not in first.headers
    assert retry.headers["mcp-param-zone"] == "eu" and "mcp-param-region" not in retry.headers
    assert first.body["id"] != retry.body["id"]
    between = alpha.posts[alpha.posts.index(first) + 1 : alpha.posts.index(retry)]
    assert [post.body.get("method") for post in between] == ["tools/list"]


def listed_with_another_header(body: dict[str, Any]) -> bytes | None:
    """A tools/list answer whose `regional` names another header (`Zone`) than the one the server checks its calls
    against (`Region`): every call of it is refused as a HeaderMismatch."""
    if body.get("method") != "tools/list":
        return None
    zoned = {"type": "object", "properties": {"region": {"type": "string", "x-mcp-header": "Zone"}}}
    echo = {"type": "object", "properties": {"text": {"type": "string"}}}
    tools = [{"name": "regional", "inputSchema": zoned}, {"name": "echo", "inputSchema": echo}]
    result = {"tools": tools, "resultType": "complete", "ttlMs": 0, "cacheScope": "private"}
    return json.dumps({"jsonrpc": "2.0", "id": body["id"], "result": result}).encode()


async def test_headers_refused_again_after_the_retry_fail_the_call_clearly(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=True, modern_only=True, customize=with_routed_tool)
    alpha.answer_instead = listed_with_another_header
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    async with running(alpha), running_daemon(sandbox), agent(sandbox) as client:
        result = await client.call_tool("alpha__regional", {"region": "eu", "query": "q"})
        assert result.is_error
        assert "upstream 'alpha': the server refused the request's headers (HeaderMismatch)" in text_of(result)
        assert "HTTP 400" in text_of(result) and "Mcp-Param-Region header is missing" in text_of(result)
        assert text_of(await client.call_tool("alpha__echo", {"text": "still here"})) == "alpha:still here"
    calls = [post for post in alpha.posts if post.body.get("params", {}).get("name") == "regional"]
    assert len(calls) == 2  # the call and one retry, never more
    assert all(call.headers["mcp-param-zone"] == "eu" for call in calls)
    assert [post.body.get("method") for post in alpha.posts].count("tools/list") == 2  # on connect, and once again


async def test_progress_of_a_call_reaches_the_agent(sandbox: Sandbox) -> None:
    def chatty(server: MCPServer) -> None:
        @server.tool()
        async def work(steps: int, ctx: Context) -> str:
            for step in range(1, steps + 1):
                await ctx.report_progress(step, steps, f"step {step}")
            return "worked"

    alpha = Upstream("alpha", json_response=False, modern_only=True, customize=chatty)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with running(alpha), running_daemon(sandbox), agent(sandbox) as client:
        result = await client.call_tool("alpha__work", {"steps": 3}, progress_callback=on_progress)
        assert text_of(result) == "worked"
    assert seen == [(1, 3, "step 1"), (2, 3, "step 2"), (3, 3, "step 3")]
    call = await posts_until(alpha, method_is("tools/call"))
    assert "progressToken" in call.body["params"]["_meta"]  # mcpx's own token, next to the envelope


# --- MRTR: the server asks the agent -----------------------------------------------------------------------------


class Name(BaseModel):
    name: str


def ask_name() -> Elicit[Name]:
    return Elicit("Who are you?", Name)


def with_question(server: MCPServer) -> None:
    @server.tool()
    def greet(answer: Annotated[Name, Resolve(ask_name)]) -> str:
        """Greet the user, whose name is elicited first (over 2026-07-28: an input_required result)."""
        return f"hello {answer.name}"


async def test_an_elicitation_is_answered_by_the_calling_agent(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=True, modern_only=True, customize=with_question)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    asked: list[str] = []
    on_elicit = answering_as("ada", asked)
    async with running(alpha), running_daemon(sandbox), agent(sandbox, elicitation_callback=on_elicit) as client:
        assert text_of(await client.call_tool("alpha__greet", {})) == "hello ada"
    assert asked == ["Who are you?"]
    calls = [post for post in alpha.posts if post.body.get("method") == "tools/call"]
    assert len(calls) == 2  # the call, then the same call with the answer and the state
    first, retry = calls[0].body, calls[1].body
    assert first["id"] != retry["id"]
    assert "inputResponses" not in first["params"]
    (answer,) = retry["params"]["inputResponses"].values()
    assert answer == {"action": "accept", "content": {"name": "ada"}}
    assert isinstance(retry["params"].get("requestState"), str)


async def test_a_2026_07_28_agent_and_upstream_with_a_question_in_between(sandbox: Sandbox) -> None:
    # Both ends stateless: the upstream's input_required reaches the agent as an input_required of mcpx's own (its
    # requestState is mcpx's, bound to the agent's connection), and the agent's answer goes back in the retry.
    alpha = Upstream("alpha", json_response=False, modern_only=True, customize=with_question)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    asked: list[str] = []
    on_elicit = answering_as("eve", asked)

    async with (
        running(alpha),
        running_daemon(sandbox),
        agent(sandbox, mode="auto", elicitation_callback=on_elicit) as client,
    ):
        assert client.protocol_version == MODERN_VERSION
        assert text_of(await client.call_tool("alpha__greet", {})) == "hello eve"
        assert text_of(await client.call_tool("alpha__echo", {"text": "hi"})) == "alpha:hi"
    assert asked == ["Who are you?"]
    calls = [post.body for post in alpha.posts if post.body.get("method") == "tools/call"]
    states = [call["params"].get("requestState") for call in calls]
    assert len(calls) == 3 and states[0] is None and isinstance(states[1], str)


async def test_an_agent_that_cannot_answer_gets_an_error_and_the_daemon_serves_on(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=True, modern_only=True, customize=with_question)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    async with running(alpha), running_daemon(sandbox), agent(sandbox) as client:  # no elicitation callback
        with pytest.raises(MCPError, match="elicitation/create was refused"):
            await client.call_tool("alpha__greet", {})
        assert text_of(await client.call_tool("alpha__echo", {"text": "next"})) == "alpha:next"


# --- resources, prompts, the listen stream -----------------------------------------------------------------------


def with_content(server: MCPServer) -> None:
    @server.resource("note://{key}", name="note")
    def note(key: str) -> str:
        return f"note {key}"

    @server.resource("file:///notes.txt", name="notes", mime_type="text/plain")
    def notes() -> str:
        return "the notes"

    @server.prompt()
    def review(topic: str) -> str:
        """Review something."""
        return f"please review {topic}"

    @server.tool()
    async def grow(ctx: Context) -> str:
        """Add a tool and say so (to listeners)."""

        def added() -> str:
            return "new"

        server.tool(name="added")(added)
        await ctx.notify_tools_changed()
        return "grown"

    @server.tool()
    async def touch(ctx: Context) -> str:
        """Say the notes changed (to listeners subscribed to them)."""
        await ctx.notify_resource_updated("file:///notes.txt")
        return "touched"


async def test_resources_and_prompts(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=False, modern_only=True, customize=with_content)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    async with running(alpha), running_daemon(sandbox), agent(sandbox) as client:
        read = await client.read_resource("mcpx://alpha/note://café")
        (content,) = read.contents
        assert isinstance(content, TextResourceContents) and content.text == "note café"
        prompt = await client.get_prompt("alpha__review", {"topic": "mcpx"})
        message = prompt.messages[0].content
        assert isinstance(message, mcp_types.TextContent) and message.text == "please review mcpx"
    read_post = await posts_until(alpha, method_is("resources/read"))
    assert read_post.headers["mcp-name"] == header_value("note://café") != "note://café"
    assert (await posts_until(alpha, method_is("prompts/get"))).headers["mcp-name"] == "review"


class _Notifications:
    """What an agent hears of tool list changes and resource updates."""

    def __init__(self) -> None:
        self.tools_changed = asyncio.Event()
        self.updated = asyncio.Event()
        self.updated_uris: list[str] = []

    async def on_message(self, message: object) -> None:
        method = getattr(message, "method", None)
        if method == "notifications/tools/list_changed":
            self.tools_changed.set()
        elif method == "notifications/resources/updated":
            self.updated_uris.append(str(getattr(getattr(message, "params", None), "uri", "")))
            self.updated.set()


async def test_list_changes_and_resource_updates_arrive_through_subscriptions_listen(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=False, modern_only=True, customize=with_content)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    watched = _Notifications()

    async with running(alpha), running_daemon(sandbox), agent(sandbox, message_handler=watched.on_message) as client:
        await posts_until(alpha, method_is("subscriptions/listen"))
        assert "alpha__added" not in {tool.name for tool in (await client.list_tools()).tools}
        assert text_of(await client.call_tool("alpha__grow", {})) == "grown"
        async with asyncio.timeout(WAIT):
            while "alpha__added" not in {tool.name for tool in (await client.list_tools()).tools}:
                await watched.tools_changed.wait()
                watched.tools_changed.clear()

        posts_before = len(alpha.posts)
        await client.subscribe_resource("mcpx://alpha/file:///notes.txt")
        renewed = await posts_until(
            alpha,
            lambda post: (
                post.body.get("method") == "subscriptions/listen"
                and post.body["params"]["notifications"].get("resourceSubscriptions") == ["file:///notes.txt"]
            ),
        )
        assert alpha.posts.index(renewed) >= posts_before
        assert text_of(await client.call_tool("alpha__touch", {})) == "touched"
        async with asyncio.timeout(WAIT):
            await watched.updated.wait()
    assert watched.updated_uris == ["mcpx://alpha/file:///notes.txt"]
    listen = await posts_until(alpha, method_is("subscriptions/listen"))
    assert listen.headers["accept"].startswith("text/event-stream")
    assert listen.body["params"]["notifications"]["toolsListChanged"] is True


class EndedListens:
    """An SDK server's listen streams, each recorded (its filter) as it opens, and ended on demand by the SDK's own
    graceful end (after which, its docs say, the client listens again and fetches afresh: there is no replay)."""

    def __init__(self) -> None:
        self.filters: list[SubscriptionFilter] = []
        self.opened = asyncio.Event()
        self._handler: ListenHandler | None = None

    def customize(self, server: MCPServer) -> None:
        lowlevel = server._lowlevel_server
        entry = lowlevel.get_request_handler("subscriptions/listen")
        assert entry is not None and isinstance(entry.handler, ListenHandler)
        handler = self._handler = entry.handler

        async def listen(ctx: Any, params: SubscriptionsListenRequestParams) -> SubscriptionsListenResult:
            self.filters.append(params.notifications)
            self.opened.set()
            return await handler(ctx, params)  # (the stream is registered before this first yields)

        lowlevel.add_request_handler("subscriptions/listen", SubscriptionsListenRequestParams, listen)

    async def until(self, predicate: Callable[[list[SubscriptionFilter]], bool]) -> None:
        async with asyncio.timeout(WAIT):
            while not predicate(self.filters):
                self.opened.clear()
                await self.opened.wait()

    def end_all(self) -> None:
        assert self._handler is not None
        self._handler.close()


async def test_what_the_listen_stream_missed_while_down_is_made_up_for(sandbox: Sandbox) -> None:
    listens = EndedListens()

    def customize(server: MCPServer) -> None:
        with_content(server)
        listens.customize(server)

    alpha = Upstream("alpha", json_response=False, modern_only=True, customize=customize)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    watched = _Notifications()

    def tool_lists() -> int:
        return [post.body.get("method") for post in alpha.posts].count("tools/list")

    async with running(alpha), running_daemon(sandbox), agent(sandbox, message_handler=watched.on_message) as client:
        await client.subscribe_resource("mcpx://alpha/file:///notes.txt")
        await listens.until(lambda filters: filters[-1].resource_subscriptions == ["file:///notes.txt"])
        assert tool_lists() == 1  # neither the first stream nor the renewed one made up for anything

        listens.end_all()
        # Changed while no stream listens, and said to no one: only mcpx's catch-up can find it.
        assert alpha.server is not None

        def added() -> str:
            return "new"

        alpha.server.add_tool(added)

        await listens.until(lambda filters: len(filters) == 3)
        async with asyncio.timeout(WAIT):
            while "alpha__added" not in {tool.name for tool in (await client.list_tools()).tools}:
                await watched.tools_changed.wait()
                watched.tools_changed.clear()
            await watched.updated.wait()
        assert len(listens.filters) == 3 and listens.filters[2].resource_subscriptions == ["file:///notes.txt"]
    assert watched.updated_uris == ["mcpx://alpha/file:///notes.txt"]
    assert tool_lists() == 2  # on connect, and once to catch up


# --- garbage and hostile answers ---------------------------------------------------------------------------------


async def test_garbage_and_hostile_answers_give_clear_errors_and_the_daemon_serves_on(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=True, modern_only=True)
    sandbox.write_config(FAST_RECONNECT + upstream_toml("alpha", alpha.url, timeout=10))

    def hostile(body: dict[str, Any]) -> bytes | None:
        if body.get("method") != "tools/call":
            return None
        name = body["params"]["name"]
        result: dict[str, Any]
        if name == "get_issue":
            return b"this is not JSON"
        if name == "search_issues":  # asks for input forever
            result = {"resultType": "input_required", "requestState": "again"}
        elif name == "delete_issue":  # asks the agent something no server may ask
            result = {"resultType": "input_required", "inputRequests": {"k": {"method": "tools/call", "params": {}}}}
        else:
            return None
        return json.dumps({"jsonrpc": "2.0", "id": body["id"], "result": result}).encode()

    alpha.answer_instead = hostile
    async with running(alpha), running_daemon(sandbox), agent(sandbox) as client:
        garbage = await client.call_tool("alpha__get_issue", {"key": "K"})
        assert garbage.is_error and "not a JSON-RPC message" in text_of(garbage)
        forever = await client.call_tool("alpha__search_issues", {"query": "q"})
        assert forever.is_error and "still asked for input after 16 rounds" in text_of(forever)
        assert len([p for p in alpha.posts if p.body.get("params", {}).get("name") == "search_issues"]) == 17
        asked = await client.call_tool("alpha__delete_issue", {"key": "K"})
        assert asked.is_error and "is not one a server may make" in text_of(asked)
        assert text_of(await client.call_tool("alpha__echo", {"text": "still here"})) == "alpha:still here"


# --- pieces ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("us-west1", "us-west1"),
        ("a b", "a b"),
        ("Hello, 世界", "=?base64?SGVsbG8sIOS4lueVjA==?="),
        (" padded ", "=?base64?IHBhZGRlZCA=?="),
        ("line1\nline2", "=?base64?bGluZTEKbGluZTI=?="),
        ("=?base64?literal?=", "=?base64?PT9iYXNlNjQ/bGl0ZXJhbD89?="),
    ],
)
def test_header_values_are_encoded_as_the_spec_says(value: str, expected: str) -> None:
    assert header_value(value) == expected


@pytest.mark.parametrize(
    ("schema", "why"),
    [
        ({"type": "object", "properties": {"n": {"type": "number", "x-mcp-header": "N"}}}, "not a string, integer"),
        ({"properties": {"a": {"type": "string", "x-mcp-header": ""}}}, "non-empty HTTP token"),
        ({"properties": {"a": {"type": "string", "x-mcp-header": "A B"}}}, "non-empty HTTP token"),
        (
            {
                "properties": {
                    "a": {"type": "string", "x-mcp-header": "R"},
                    "b": {"type": "string", "x-mcp-header": "r"},
                }
            },
            "used twice",
        ),
        ({"items": {"type": "string", "x-mcp-header": "I"}}, "not a property reached"),
        ({"x-mcp-header": "Root"}, "not a property reached"),
    ],
)
def test_invalid_header_annotations_are_found(schema: dict[str, Any], why: str) -> None:
    problem = invalid_header_annotation(schema)
    assert problem is not None and why in problem


def test_valid_annotations_give_headers_from_the_arguments() -> None:
    schema = {
        "type": "object",
        "properties": {
            "region": {"type": "string", "x-mcp-header": "Region"},
            "opts": {"type": "object", "properties": {"dry": {"type": "boolean", "x-mcp-header": "Dry"}}},
            "n": {"type": "integer", "x-mcp-header": "N"},
            "note": {"type": "string", "default": {"x-mcp-header": "data, not a schema"}},
        },
    }
    assert invalid_header_annotation(schema) is None
    paths = header_annotations(schema)
    assert paths == {("region",): "Region", ("opts", "dry"): "Dry", ("n",): "N"}
    headers = param_headers(paths, {"region": "eu", "opts": {"dry": True}, "n": None})
    assert headers == {"Mcp-Param-Region": "eu", "Mcp-Param-Dry": "true"}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ('url = "https://example.com/mcp"\nprotocol = "2025"', "protocol: Input should be 'auto', 'handshake' or"),
        ('command = "x"\nprotocol = "2026-07-28"', "`protocol`: only for `url` upstreams"),
        (
            'url = "https://example.com/mcp"\ntransport = "sse"\nprotocol = "2026-07-28"',
            "spoken over streamable HTTP only",
        ),
        ('url = "https://example.com/mcp"\nheaders = { "Mcp-Param-Region" = "x" }', "is set by mcpx itself"),
        ('url = "https://example.com/mcp"\nheaders = { "Mcp-Method" = "x" }', "is set by mcpx itself"),
    ],
)
def test_protocol_option_mistakes_name_the_upstream(tmp_path: Path, fields: str, expected: str) -> None:
    path = write_config_file(tmp_path, f'[[proxy.upstream]]\nname = "remote"\n{fields}\n')
    (problem,) = config_problems(path)
    assert "remote" in problem and expected in problem


def test_protocol_defaults_to_auto_and_takes_each_value(tmp_path: Path) -> None:
    from mcpx.config.load import load_config

    text = "".join(
        f'[[proxy.upstream]]\nname = "u{index}"\nurl = "https://example.com/{index}"\n{line}\n'
        for index, line in enumerate(("", 'protocol = "handshake"', 'protocol = "2026-07-28"'))
    )
    upstreams = {u.name: u for u in load_config(write_config_file(tmp_path, text)).upstreams}
    assert [upstreams[f"u{index}"].protocol for index in range(3)] == ["auto", "handshake", "2026-07-28"]
