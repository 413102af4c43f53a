"""Prompts, completions and logging levels through mcpx: the SDK client as the agent (through the real shim),
real SDK upstreams behind it, over JSON and SSE responses."""

from __future__ import annotations

import pytest
from mcp.shared.exceptions import MCPError
from mcp.types import PromptReference, TextContent

from tests.support.daemon import Sandbox, agent, running_daemon, upstream_toml
from tests.support.servers import with_prompts
from tests.support.upstream import Upstream, running


async def test_prompts_of_every_upstream_are_listed_got_and_completed_under_namespaced_names(sandbox: Sandbox) -> None:
    levels: dict[str, list[str]] = {"alpha": [], "beta": []}
    alpha = Upstream("alpha", json_response=True, customize=with_prompts("alpha", levels["alpha"]))
    beta = Upstream("beta", json_response=False, customize=with_prompts("beta", levels["beta"]))
    plain = Upstream("plain", json_response=True)  # offers no prompts
    sandbox.write_config(
        upstream_toml("alpha", alpha.url) + upstream_toml("beta", beta.url) + upstream_toml("plain", plain.url)
    )
    async with running(alpha, beta, plain), running_daemon(sandbox), agent(sandbox) as client:
        capabilities = client.server_capabilities
        assert capabilities is not None
        assert capabilities.prompts is not None and capabilities.prompts.list_changed
        assert capabilities.completions is not None
        assert capabilities.logging is not None

        prompts = {prompt.name: prompt for prompt in (await client.list_prompts()).prompts}
        assert sorted(prompts) == ["alpha__review", "beta__review"]
        assert prompts["beta__review"].description == "Ask for a review of a topic."
        assert [argument.name for argument in prompts["alpha__review"].arguments or []] == ["topic"]

        got = await client.get_prompt("beta__review", {"topic": "mcpx"})
        (message,) = got.messages
        assert isinstance(message.content, TextContent)
        assert message.content.text == "beta reviews mcpx"

        completed = await client.complete(PromptReference(name="alpha__review"), {"name": "topic", "value": "o"})
        assert completed.completion.values == ["alpha-one", "alpha-two"]

        # The upstream sees its own prompt name, never the namespaced one.
        completed = await client.complete(PromptReference(name="beta__review"), {"name": "topic", "value": "o"})
        assert completed.completion.values == ["beta-one", "beta-two"]

        # Fanned out to every upstream that offers logging (plain does not), answered once they have all answered.
        await client.set_logging_level("warning")
        assert levels == {"alpha": ["warning"], "beta": ["warning"]}


async def test_unknown_prompts_are_protocol_errors_and_the_session_goes_on(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=True, customize=with_prompts("alpha"))
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    async with running(alpha), running_daemon(sandbox), agent(sandbox) as client:
        for name in ("alpha__nope", "nope", "beta__review"):
            with pytest.raises(MCPError, match=f"unknown prompt: {name}") as raised:
                await client.get_prompt(name, {})
            assert raised.value.error.code == -32602
        got = await client.get_prompt("alpha__review", {"topic": "t"})
        (message,) = got.messages
        assert isinstance(message.content, TextContent)
        assert message.content.text == "alpha reviews t"
