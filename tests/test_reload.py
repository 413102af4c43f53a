"""`mcpxctl reload` (and SIGHUP) swap the configuration under connected agents without dropping them."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from mcpx.config.load import parse_config
from mcpx.errors import UpstreamUnavailable
from mcpx.jsonrpc import Message
from mcpx.router.router import Router
from mcpx.upstream.supervisor import AgentUpstream
from tests.support.agents import change_watcher, wait_for_tools
from tests.support.daemon import Sandbox, agent, mcpxctl, running_daemon, upstream_toml
from tests.support.lifecycle import WAIT, GatedTool
from tests.support.raw import raw_agent
from tests.support.results import text_of
from tests.support.servers import NOTES, Subscriptions
from tests.support.upstream import Upstream, running


async def test_reload_adds_changes_and_removes_upstreams_while_an_agent_stays_connected(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=True)
    beta = Upstream("beta", json_response=False)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    changed, on_message = change_watcher()
    async with running(alpha, beta), running_daemon(sandbox), agent(sandbox, message_handler=on_message) as client:
        await wait_for_tools(client, changed, lambda names: "alpha__echo" in names)

        sandbox.write_config(upstream_toml("alpha", alpha.url) + upstream_toml("beta", beta.url))
        code, out, err = await mcpxctl(sandbox, "reload")
        assert code == 0, err
        assert "added: beta" in out
        await wait_for_tools(client, changed, lambda names: "beta__echo" in names)
        assert text_of(await client.call_tool("beta__echo", {"text": "new"})) == "beta:new"

        sandbox.write_config(
            upstream_toml("alpha", alpha.url, exclude_tools=["echo"]) + upstream_toml("beta", beta.url)
        )
        code, out, err = await mcpxctl(sandbox, "reload")
        assert code == 0, err
        assert "changed: alpha" in out
        names = await wait_for_tools(
            client, changed, lambda names: "alpha__echo" not in names and "alpha__add" in names
        )
        assert "beta__echo" in names

        sandbox.write_config(upstream_toml("beta", beta.url))
        code, out, err = await mcpxctl(sandbox, "reload")
        assert code == 0, err
        assert "removed: alpha" in out
        await wait_for_tools(client, changed, lambda names: not any(name.startswith("alpha__") for name in names))
        # The same agent session kept working throughout.
        assert text_of(await client.call_tool("beta__echo", {"text": "still here"})) == "beta:still here"


async def test_invalid_config_on_reload_is_refused_and_the_running_one_kept(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=True)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    async with running(alpha), running_daemon(sandbox), agent(sandbox) as client:
        assert text_of(await client.call_tool("alpha__echo", {"text": "a"})) == "alpha:a"
        sandbox.write_config(upstream_toml("alpha", alpha.url, bogus_key=1) + "[[proxy.upstream]]\nname = 'x'\n")
        code, _, err = await mcpxctl(sandbox, "reload")
        assert code != 0
        assert "invalid" in err
        assert "bogus_key" in err
        assert "upstream 'x'" in err and "url" in err
        assert str(sandbox.config) in err
        sandbox.config.write_text("this is [not toml")
        code, _, err = await mcpxctl(sandbox, "reload")
        assert code != 0
        assert "invalid TOML" in err
        assert text_of(await client.call_tool("alpha__echo", {"text": "b"})) == "alpha:b"
        code, out, _ = await mcpxctl(sandbox, "status", "--json")
        assert [upstream["name"] for upstream in json.loads(out)["upstreams"]] == ["alpha"]


async def test_sighup_reloads_the_config(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=True)
    beta = Upstream("beta", json_response=True)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    changed, on_message = change_watcher()
    async with (
        running(alpha, beta),
        running_daemon(sandbox) as daemon,
        agent(sandbox, message_handler=on_message) as client,
    ):
        await wait_for_tools(client, changed, lambda names: "alpha__echo" in names)
        sandbox.write_config(upstream_toml("alpha", alpha.url) + upstream_toml("beta", beta.url))
        daemon.signal(signal.SIGHUP)
        await wait_for_tools(client, changed, lambda names: "beta__echo" in names)


async def test_a_reload_whose_requester_goes_away_still_ends(sandbox: Sandbox) -> None:
    # `mcpxctl reload` interrupted: the daemon reads the request, then the end of the connection. A reload cut off
    # with it could stop changed upstreams and never start them again; it is the daemon's own work, and ends.
    alpha = Upstream("alpha", json_response=True)
    beta = Upstream("beta", json_response=True)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    changed, on_message = change_watcher()
    async with running(alpha, beta), running_daemon(sandbox), agent(sandbox, message_handler=on_message) as client:
        await wait_for_tools(client, changed, lambda names: "alpha__echo" in names)
        sandbox.write_config(
            upstream_toml("alpha", alpha.url, exclude_tools=["echo"]) + upstream_toml("beta", beta.url)
        )
        async with raw_agent(sandbox) as requester:
            await requester.send({"jsonrpc": "2.0", "id": 1, "method": "mcpx/reload"})
        names = await wait_for_tools(client, changed, lambda names: "beta__echo" in names and "alpha__add" in names)
        assert "alpha__echo" not in names
        assert text_of(await client.call_tool("beta__echo", {"text": "x"})) == "beta:x"


class _HoldsSessionEnds(Upstream):
    """The fault: an upstream slow to end a session. Each DELETE waits until `release` is set; `ending` is set when
    one arrives."""

    def __init__(self, name: str) -> None:
        super().__init__(name, json_response=True)
        self.ending = asyncio.Event()
        self.release = asyncio.Event()

    def app(self) -> ASGIApp:
        inner = super().app()

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and scope["method"] == "DELETE":
                self.ending.set()
                await self.release.wait()
            await inner(scope, receive, send)

        return app


class _HoldsNewSessions(Upstream):
    """The fault: an upstream slow to open a session. Once `holding`, each initialize (a POST without a session)
    waits until `release` is set; `held` is set when one arrives."""

    def __init__(self, name: str) -> None:
        super().__init__(name, json_response=True)
        self.holding = False
        self.held = asyncio.Event()
        self.release = asyncio.Event()

    def app(self) -> ASGIApp:
        inner = super().app()

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if (
                self.holding
                and scope["type"] == "http"
                and scope["method"] == "POST"
                and all(key.lower() != b"mcp-session-id" for key, _ in scope["headers"])
            ):
                self.held.set()
                await self.release.wait()
            await inner(scope, receive, send)

        return app


class _NoAgent:
    """The client side of an agent's own session in a test without agents."""

    agent: object = None

    def notify(self, message: Message) -> None:
        pass

    async def ask(self, method: str, params: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
        return {"error": {"code": -32601, "message": f"{method} not supported here"}}


async def test_a_call_made_while_a_reload_stops_a_changed_upstream_goes_to_the_new_session(sandbox: Sandbox) -> None:
    alpha = _HoldsSessionEnds("alpha")
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    async with running(alpha), running_daemon(sandbox), agent(sandbox) as client:
        assert text_of(await client.call_tool("alpha__echo", {"text": "before"})) == "alpha:before"
        sandbox.write_config(upstream_toml("alpha", alpha.url, timeout=30.0))
        reload = asyncio.create_task(mcpxctl(sandbox, "reload"))
        try:
            async with asyncio.timeout(WAIT):
                await alpha.ending.wait()  # the reload is ending the old session
            assert text_of(await client.call_tool("alpha__echo", {"text": "during"})) == "alpha:during"
        finally:
            alpha.release.set()
            code, out, err = await reload
        assert code == 0, err
        assert "changed: alpha" in out


async def test_a_call_in_flight_on_an_agents_own_session_finishes_through_a_reload(sandbox: Sandbox) -> None:
    gated = GatedTool("gated")
    alpha = Upstream("alpha", json_response=True, customize=gated.customize)
    sandbox.write_config(upstream_toml("alpha", alpha.url, sharing="per-agent"))
    async with running(alpha), running_daemon(sandbox), agent(sandbox) as client:
        call = asyncio.create_task(client.call_tool("alpha__gated", {"text": "in flight"}))
        async with asyncio.timeout(WAIT):
            await gated.started.wait()
        sandbox.write_config(upstream_toml("alpha", alpha.url, sharing="per-agent", timeout=30.0))
        code, out, err = await mcpxctl(sandbox, "reload")
        assert code == 0, err
        assert "changed: alpha" in out
        gated.gate.set()
        async with asyncio.timeout(WAIT):
            result = await call
        assert text_of(result) == "gated:in flight"
        assert text_of(await client.call_tool("alpha__echo", {"text": "after"})) == "alpha:after"


@pytest.mark.parametrize("sharing", ["shared", "per-agent"])
async def test_a_reload_that_changes_an_upstream_renews_the_agents_subscriptions(
    sandbox: Sandbox, sharing: str
) -> None:
    subscriptions = Subscriptions()
    alpha = Upstream("alpha", json_response=False, customize=subscriptions.customize)
    sandbox.write_config(upstream_toml("alpha", alpha.url, sharing=sharing))
    async with running(alpha), running_daemon(sandbox), agent(sandbox) as client:
        await client.subscribe_resource(f"mcpx://alpha/{NOTES}")
        subscriptions.subscribe_received.clear()
        sandbox.write_config(upstream_toml("alpha", alpha.url, sharing=sharing, timeout=30.0))
        code, out, err = await mcpxctl(sandbox, "reload")
        assert code == 0, err
        assert "changed: alpha" in out
        async with asyncio.timeout(WAIT):
            await subscriptions.subscribe_received.wait()  # in the new session, and not asked by the agent
        assert subscriptions.subscribed == [NOTES, NOTES]


async def test_an_agents_own_session_closed_while_it_opens_does_not_outlive_the_close(tmp_path: Path) -> None:
    # What a reload (or the agent leaving) closes may still be opening: that session is closed once it has opened.
    alpha = _HoldsNewSessions("alpha")
    async with running(alpha):
        config = parse_config(upstream_toml("alpha", alpha.url, sharing="per-agent"), tmp_path / "config.toml")
        router = Router(config, tmp_path)
        await router.start()
        try:
            await router.wait_settled(WAIT)
            private = AgentUpstream(router.upstreams["alpha"], _NoAgent())
            alpha.holding = True
            params = {"name": "echo", "arguments": {"text": "x"}}
            call = asyncio.create_task(private.request("tools/call", params, None))
            async with asyncio.timeout(WAIT):
                await alpha.held.wait()
            await private.close()
            alpha.delete_received.clear()
            alpha.release.set()
            with pytest.raises(UpstreamUnavailable):
                async with asyncio.timeout(WAIT):
                    await call
            async with asyncio.timeout(WAIT):
                await alpha.delete_received.wait()  # the session that opened after the close was ended
        finally:
            alpha.release.set()
            await router.stop()


async def test_a_reload_closes_the_oauth_http_client_of_a_host_no_upstream_is_on_any_more(tmp_path: Path) -> None:
    alpha = Upstream("alpha", json_response=True)
    async with running(alpha):
        by_name = alpha.url.replace("127.0.0.1", "localhost")  # the same server under another host name
        both = upstream_toml("alpha", alpha.url) + upstream_toml("beta", by_name)
        router = Router(parse_config(both, tmp_path / "config.toml"), tmp_path)
        await router.start()
        try:
            await router.wait_settled(WAIT)
            # What the OAuth fetches of each upstream use (made on first use, one per host).
            kept, dropped = router.oauth.http(alpha.url), router.oauth.http(by_name)
            assert kept is not dropped
            changes = await router.apply(parse_config(upstream_toml("alpha", alpha.url), tmp_path / "config.toml"))
            assert changes["removed"] == ["beta"]
            assert dropped.closed
            assert not kept.closed
            assert router.oauth.http(alpha.url) is kept
        finally:
            await router.stop()
