"""`mcpxctl reload` (and SIGHUP) swap the configuration under connected agents without dropping them."""

from __future__ import annotations

import json
import signal

from tests.support.agents import change_watcher, wait_for_tools
from tests.support.daemon import Sandbox, agent, mcpxctl, running_daemon, upstream_toml
from tests.support.raw import raw_agent
from tests.support.results import text_of
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
