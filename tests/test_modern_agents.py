"""Agents that speak protocol 2026-07-28 (stateless: no initialize, an envelope in every request's `_meta`) use
mcpx as they would a modern server: discovery, lists and calls, an upstream's questions as `input_required`
results they answer by retrying, and change notifications on `subscriptions/listen` streams only. Real SDK
agents in "auto" mode (they probe `server/discover`) through the real shim; real SDK upstreams; raw sockets where
the bytes matter."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
from mcp.server.mcpserver import Context, MCPServer
from mcp.shared.exceptions import MCPError
from mcp.types import RequestParamsMeta, TextResourceContents

from mcpx.config.load import parse_config
from mcpx.downstream.peercred import PeerCredentials
from mcpx.downstream.session import AgentSession
from mcpx.router.router import Router
from tests.support.agents import answering_as
from tests.support.daemon import FAST_RECONNECT, Sandbox, agent, running_daemon, upstream_toml
from tests.support.inprocess import NoControl
from tests.support.raw import RawAgent, raw_agent
from tests.support.results import text_of
from tests.support.servers import NOTES, Subscriptions, with_prompts, with_questions
from tests.support.upstream import MODERN_VERSION, Upstream, running


def with_meta_probe(server: MCPServer) -> None:
    server._lowlevel_server.instructions = "Beta knows issues."

    @server.tool()
    def meta_keys(ctx: Context) -> str:
        """The keys of this request's _meta."""
        meta = ctx.request_context.meta
        return ",".join(sorted(meta or {}))


ENVELOPE = {
    "io.modelcontextprotocol/protocolVersion": MODERN_VERSION,
    "io.modelcontextprotocol/clientCapabilities": {},
    "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "0"},
}


# The `_meta` of an agent that answers form elicitations (for `modern(...)`).
ELICITING: dict[str, Any] = {"io.modelcontextprotocol/clientCapabilities": {"elicitation": {"form": {}}}}


def modern(params: dict[str, Any] | None = None, /, **meta: Any) -> dict[str, Any]:
    """Request params carrying the 2026-07-28 envelope (plus `meta`)."""
    params = dict(params or {})
    params["_meta"] = {**ENVELOPE, **meta}
    return params


async def test_a_modern_agent_discovers_lists_and_calls_without_the_handshake(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=True, customize=with_prompts("alpha"))
    beta = Upstream("beta", json_response=False, customize=with_meta_probe)
    sandbox.write_config(upstream_toml("alpha", alpha.url) + upstream_toml("beta", beta.url))
    async with running(alpha, beta), running_daemon(sandbox), agent(sandbox, mode="auto") as client:
        assert client.protocol_version == MODERN_VERSION
        discovered = client.session.discover_result
        assert discovered is not None and discovered.supported_versions == [MODERN_VERSION]
        assert discovered.capabilities.prompts is not None
        assert "Beta knows issues." in (client.instructions or "")

        names = {tool.name for tool in (await client.list_tools()).tools}
        assert {"alpha__echo", "beta__echo", "beta__add"} <= names
        assert text_of(await client.call_tool("alpha__echo", {"text": "hi"})) == "alpha:hi"
        assert text_of(await client.call_tool("beta__echo", {"text": "hi"})) == "beta:hi"
        added = await client.call_tool("beta__add", {"a": 2, "b": 3})
        assert added.structured_content == {"result": 5}
        got = await client.get_prompt("alpha__review", {"topic": "mcpx"})
        assert "mcpx" in str(got.messages[0].content)
        with pytest.raises(MCPError, match="unknown tool"):
            await client.call_tool("alpha__nope", {})
        # The upstream never sees the envelope of the agent's hop to mcpx (its session is mcpx's own), but sees
        # the rest of the request's _meta.
        meta: RequestParamsMeta = {"progressToken": "p1", "app/key": 1}  # type: ignore[typeddict-unknown-key]
        probed = await client.call_tool("beta__meta_keys", {}, meta=meta)
        assert text_of(probed) == "app/key,progress_token"  # (as the SDK server names it)


async def test_modern_results_carry_result_type_and_cache_fields_and_envelope_errors_are_the_specs(
    sandbox: Sandbox,
) -> None:
    alpha = Upstream("alpha", json_response=True)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    async with running(alpha), running_daemon(sandbox), raw_agent(sandbox) as raw:
        discovered = (await raw.request(1, "server/discover", modern()))["result"]
        assert discovered["supportedVersions"] == [MODERN_VERSION]
        assert discovered["resultType"] == "complete" and discovered["cacheScope"] == "private"
        assert discovered["ttlMs"] == 0
        assert discovered["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "mcpx"

        listed = (await raw.request(2, "tools/list", modern()))["result"]
        assert listed["resultType"] == "complete" and listed["ttlMs"] == 0 and listed["cacheScope"] == "private"
        assert "alpha__echo" in {tool["name"] for tool in listed["tools"]}
        called = await raw.request(3, "tools/call", modern({"name": "alpha__echo", "arguments": {"text": "x"}}))
        assert called["result"]["resultType"] == "complete"
        assert called["result"]["content"][0]["text"] == "alpha:x"

        wrong_version = await raw.request(
            4, "tools/list", modern(**{"io.modelcontextprotocol/protocolVersion": "2099-01-01"})
        )
        assert wrong_version["error"]["code"] == -32022
        assert wrong_version["error"]["data"] == {"supported": [MODERN_VERSION], "requested": "2099-01-01"}
        no_capabilities = await raw.request(
            5, "tools/list", {"_meta": {"io.modelcontextprotocol/protocolVersion": MODERN_VERSION}}
        )
        assert no_capabilities["error"]["code"] == -32602
        for request_id, removed in enumerate(("ping", "logging/setLevel", "resources/subscribe"), start=6):
            refused = await raw.request(request_id, removed, modern({"level": "info", "uri": "x"}))
            assert refused["error"]["code"] == -32601, refused
            assert MODERN_VERSION in refused["error"]["message"]
        stale = await raw.request(9, "tools/call", modern({"name": "alpha__echo", "requestState": "forged"}))
        assert stale["error"]["code"] == -32602 and "requestState" in stale["error"]["message"]
        # The connection still serves, in either era.
        assert (await raw.request(10, "tools/list"))["result"]["tools"]


async def test_an_upstreams_question_during_a_call_becomes_input_required_and_the_retry_carries_the_answer(
    sandbox: Sandbox,
) -> None:
    alpha = Upstream("alpha", json_response=False, customize=with_questions)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    asked_ada: list[str] = []
    asked_bob: list[str] = []
    async with (
        running(alpha),
        running_daemon(sandbox),
        agent(sandbox, mode="auto", elicitation_callback=answering_as("ada", asked_ada)) as ada,
        agent(sandbox, elicitation_callback=answering_as("bob", asked_bob)) as bob,  # (handshake era)
    ):
        # A modern and a handshake-era agent at once on one shared upstream session: each answers its own.
        results = await asyncio.gather(ada.call_tool("alpha__greet", {}), bob.call_tool("alpha__greet", {}))
        assert [text_of(result) for result in results] == ["hello ada", "hello bob"]
        assert asked_ada == asked_bob == ["Who are you?"]
        # A modern agent without the capability: the upstream is told, as a handshake-era one would be.
        async with agent(sandbox, mode="auto") as unable:
            refused = text_of(await unable.call_tool("alpha__summarize", {"text": "x"}))
            assert refused.startswith("sampling refused: -32601"), refused


async def test_the_input_required_exchange_on_the_wire(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=False, customize=with_questions)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    async with running(alpha), running_daemon(sandbox), raw_agent(sandbox) as raw:
        first = await raw.request(1, "tools/call", modern({"name": "alpha__greet", "arguments": {}}, **ELICITING))
        result = first["result"]
        assert result["resultType"] == "input_required"
        ((key, question),) = result["inputRequests"].items()
        assert question["method"] == "elicitation/create"
        assert question["params"]["message"] == "Who are you?"
        state = result["requestState"]
        # Another agent cannot redeem this call's state.
        async with raw_agent(sandbox) as other:
            stolen = await other.request(
                1, "tools/call", modern({"name": "alpha__greet", "requestState": state}, **ELICITING)
            )
            assert stolen["error"]["code"] == -32602
        answer = {"action": "accept", "content": {"name": "eve"}}
        retried = {"name": "alpha__greet", "arguments": {}, "inputResponses": {key: answer}, "requestState": state}
        done = await raw.request("retry", "tools/call", modern(retried, **ELICITING))
        assert done["result"]["resultType"] == "complete"
        assert done["result"]["content"][0]["text"] == "hello eve"
        # The state was used up.
        again = await raw.request("again", "tools/call", modern(retried, **ELICITING))
        assert again["error"]["code"] == -32602


async def _next_notification(raw: RawAgent, method: str) -> dict[str, Any]:
    while True:
        message = await raw.receive()
        if message.get("method") == method:
            return message


async def test_change_notifications_reach_a_modern_agent_only_on_its_listen_streams(sandbox: Sandbox) -> None:
    subscriptions = Subscriptions()
    alpha = Upstream("alpha", json_response=False, customize=subscriptions.customize)
    late = Upstream("late", json_response=True)
    sandbox.write_config(FAST_RECONNECT + upstream_toml("alpha", alpha.url) + upstream_toml("late", late.url))
    async with running(alpha), running_daemon(sandbox), raw_agent(sandbox) as raw:
        listen = {"notifications": {"toolsListChanged": True, "resourceSubscriptions": []}}
        await raw.send({"jsonrpc": "2.0", "id": "listen-1", "method": "subscriptions/listen", "params": modern(listen)})
        acknowledged = await _next_notification(raw, "notifications/subscriptions/acknowledged")
        assert acknowledged["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"] == "listen-1"
        assert acknowledged["params"]["notifications"] == {"toolsListChanged": True}

        uri = f"mcpx://alpha/{NOTES}"
        resource_listen = {"notifications": {"resourceSubscriptions": [uri]}}
        await raw.send(
            {"jsonrpc": "2.0", "id": "listen-2", "method": "subscriptions/listen", "params": modern(resource_listen)}
        )
        acknowledged = await _next_notification(raw, "notifications/subscriptions/acknowledged")
        assert acknowledged["params"]["notifications"] == {"resourceSubscriptions": [uri]}
        assert subscriptions.subscribed == [NOTES]

        touch = modern({"name": "alpha__touch", "arguments": {"uri": NOTES}})
        await raw.send({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": touch})
        updated = await _next_notification(raw, "notifications/resources/updated")
        assert updated["params"]["uri"] == uri
        assert updated["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"] == "listen-2"

        async with running(late):
            changed = await _next_notification(raw, "notifications/tools/list_changed")
        assert changed["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"] == "listen-1"

        # Cancelling the resource stream ends the upstream subscription (no one else holds it).
        await raw.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": "listen-2"}})
        async with asyncio.timeout(10):
            await subscriptions.unsubscribe_received.wait()
        assert subscriptions.unsubscribed == [NOTES]


async def test_a_modern_sdk_agent_hears_of_tool_changes_through_listen(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=True)
    late = Upstream("late", json_response=False)
    sandbox.write_config(FAST_RECONNECT + upstream_toml("alpha", alpha.url) + upstream_toml("late", late.url))
    async with (
        running(alpha),
        running_daemon(sandbox),
        agent(sandbox, mode=MODERN_VERSION) as client,
        client.listen(tools_list_changed=True) as subscription,
    ):
        assert subscription.honored.tools_list_changed
        async with running(late), asyncio.timeout(15):
            async for _event in subscription:
                names = {tool.name for tool in (await client.list_tools()).tools}
                if "late__echo" in names:
                    break
            else:
                pytest.fail("the listen stream ended before late__echo was listed")


async def test_a_modern_agent_reads_resources_with_cache_fields(sandbox: Sandbox) -> None:
    subscriptions = Subscriptions()
    alpha = Upstream("alpha", json_response=True, customize=subscriptions.customize)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    async with (
        running(alpha),
        running_daemon(sandbox),
        agent(sandbox, mode="auto") as client,
        raw_agent(sandbox) as raw,
    ):
        (resource,) = (await client.list_resources()).resources
        read = await client.read_resource(str(resource.uri))
        (contents,) = read.contents
        assert isinstance(contents, TextResourceContents) and contents.text == "notes"
        assert str(contents.uri) == str(resource.uri)
        read_raw = (await raw.request(1, "resources/read", modern({"uri": f"mcpx://alpha/{NOTES}"})))["result"]
        assert (read_raw["resultType"], read_raw["ttlMs"], read_raw["cacheScope"]) == ("complete", 0, "private")


def with_logs(server: MCPServer) -> None:
    @server.tool()
    async def chatty(ctx: Context) -> str:
        """Logs at two levels during the call."""
        await ctx.debug("a debug line")
        await ctx.warning("a warning line")
        return "said"


async def test_log_messages_of_a_call_follow_the_requests_own_log_level(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=False, customize=with_logs)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    async with running(alpha), running_daemon(sandbox), raw_agent(sandbox) as raw:
        # The upstream is asked to log everything (handshake era), so that what reaches the agent is mcpx's doing.
        await raw.request(0, "logging/setLevel", {"level": "debug"})
        seen: list[str] = []

        async def call(request_id: int, **meta: Any) -> None:
            await raw.send(
                {
                    "jsonrpc": "2.0",
                    "id": request_id,
                    "method": "tools/call",
                    "params": modern({"name": "alpha__chatty"}, **meta),
                }
            )
            while True:
                message = await raw.receive()
                if message.get("id") == request_id:
                    assert message["result"]["content"][0]["text"] == "said"
                    return
                if message.get("method") == "notifications/message":
                    seen.append(f"{request_id}:{message['params']['level']}")

        await call(1)
        await call(2, **{"io.modelcontextprotocol/logLevel": "warning"})
        await call(3, **{"io.modelcontextprotocol/logLevel": "debug"})
        assert seen == ["2:warning", "3:debug", "3:warning"]


async def test_a_stopping_daemon_ends_listen_streams_with_a_complete_result(tmp_path: Path) -> None:
    alpha = Upstream("alpha", json_response=False, customize=with_questions)
    async with running(alpha):
        router = Router(parse_config(upstream_toml("alpha", alpha.url), tmp_path / "config.toml"), tmp_path)
        await router.start()
        sent: list[dict[str, Any]] = []
        arrived = asyncio.Event()

        def send(data: bytes) -> None:
            sent.append(json.loads(data))
            arrived.set()

        async def next_sent(predicate: Any) -> dict[str, Any]:
            async with asyncio.timeout(10):
                while True:
                    found = [message for message in sent if predicate(message)]
                    if found:
                        return found[0]
                    arrived.clear()
                    await arrived.wait()

        session = AgentSession(router, NoControl(), send, PeerCredentials(uid=os.getuid(), pid=None))
        try:
            await router.wait_settled(10)
            listen = {"jsonrpc": "2.0", "id": "l", "method": "subscriptions/listen"}
            session.on_line(
                json.dumps({**listen, "params": modern({"notifications": {"toolsListChanged": True}})}).encode()
            )
            await next_sent(lambda m: m.get("method") == "notifications/subscriptions/acknowledged")
            # A call waiting for the agent's retry (asked for input) is let go too, with no answer owed.
            call = {"jsonrpc": "2.0", "id": "c", "method": "tools/call"}
            session.on_line(json.dumps({**call, "params": modern({"name": "alpha__greet"}, **ELICITING)}).encode())
            asked = await next_sent(lambda m: m.get("id") == "c")
            assert asked["result"]["resultType"] == "input_required"

            assert await session.drain(5) == 0
            ended = await next_sent(lambda m: m.get("id") == "l")
            assert ended["result"] == {
                "resultType": "complete",
                "_meta": {"io.modelcontextprotocol/subscriptionId": "l"},
            }
            assert session._suspended == {} and session._listens == {}
        finally:
            session.close()
            await router.stop()


async def test_a_listen_cancelled_while_it_subscribes_lets_go_of_the_subscriptions_it_holds(sandbox: Sandbox) -> None:
    held = "file:///zz-held.txt"  # (subscribed after NOTES: a listen subscribes in the order of its URIs)
    subscriptions = Subscriptions(held=frozenset({held}))
    alpha = Upstream("alpha", json_response=True, customize=subscriptions.customize)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    async with running(alpha), running_daemon(sandbox), raw_agent(sandbox) as raw:
        uris = [f"mcpx://alpha/{NOTES}", f"mcpx://alpha/{held}"]
        listen = {"notifications": {"resourceSubscriptions": uris}}
        await raw.send({"jsonrpc": "2.0", "id": "listen", "method": "subscriptions/listen", "params": modern(listen)})
        async with asyncio.timeout(10):
            while held not in subscriptions.subscribed:
                await subscriptions.subscribe_received.wait()
                subscriptions.subscribe_received.clear()
        assert subscriptions.subscribed == [NOTES, held]

        # Cancelled while the second subscription waits: the first, which no other stream needs, ends upstream.
        await raw.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": "listen"}})
        async with asyncio.timeout(10):
            await subscriptions.unsubscribe_received.wait()
        assert subscriptions.unsubscribed == [NOTES]
        subscriptions.release.set()

        # The agent can listen to NOTES again, and the upstream is asked for it again.
        subscriptions.subscribe_received.clear()
        again = {"notifications": {"resourceSubscriptions": [f"mcpx://alpha/{NOTES}"]}}
        await raw.send({"jsonrpc": "2.0", "id": "again", "method": "subscriptions/listen", "params": modern(again)})
        acknowledged = await _next_notification(raw, "notifications/subscriptions/acknowledged")
        assert acknowledged["params"]["notifications"] == {"resourceSubscriptions": [f"mcpx://alpha/{NOTES}"]}
        assert subscriptions.subscribed.count(NOTES) == 2
