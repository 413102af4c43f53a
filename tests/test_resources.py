"""Resources and resource templates through mcpx: two SDK upstreams that use the same URIs, read back through
the `mcpx://<upstream>/` namespacing by the SDK client (through the real shim)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError
from mcp.types import TextResourceContents

from tests.support.daemon import Sandbox, agent, running_daemon, upstream_toml
from tests.support.upstream import Upstream, running


def with_resources(name: str) -> Callable[[MCPServer], None]:
    def customize(server: MCPServer) -> None:
        @server.resource("file:///notes.txt", name="notes", mime_type="text/plain")
        def notes() -> str:
            return f"{name} notes"

        @server.resource("note://{key}", name="note")
        def note(key: str) -> str:
            return f"{name} note {key}"

    return customize


async def test_same_uris_on_two_upstreams_are_listed_and_read_back_from_the_right_one(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=True, customize=with_resources("alpha"))
    beta = Upstream("beta", json_response=False, customize=with_resources("beta"))
    sandbox.write_config(upstream_toml("alpha", alpha.url) + upstream_toml("beta", beta.url))
    async with running(alpha, beta), running_daemon(sandbox), agent(sandbox) as client:
        assert client.server_capabilities.resources is not None

        listed = {str(resource.uri): resource for resource in (await client.list_resources()).resources}
        assert sorted(listed) == ["mcpx://alpha/file:///notes.txt", "mcpx://beta/file:///notes.txt"]
        assert listed["mcpx://beta/file:///notes.txt"].mime_type == "text/plain"

        for upstream in ("alpha", "beta"):
            read = await client.read_resource(f"mcpx://{upstream}/file:///notes.txt")
            (content,) = read.contents
            assert isinstance(content, TextResourceContents)
            assert content.text == f"{upstream} notes"
            assert str(content.uri) == f"mcpx://{upstream}/file:///notes.txt"  # the URI the agent asked for

        templates = sorted(t.uri_template for t in (await client.list_resource_templates()).resource_templates)
        assert templates == ["mcpx://alpha/note://{key}", "mcpx://beta/note://{key}"]
        read = await client.read_resource("mcpx://beta/note://k1")  # the agent's own expansion
        (content,) = read.contents
        assert isinstance(content, TextResourceContents) and content.text == "beta note k1"

        for uri in ("file:///notes.txt", "mcpx://gamma/file:///notes.txt", "mcpx://alpha"):
            with pytest.raises(MCPError, match="unknown resource") as raised:
                await client.read_resource(uri)
            assert raised.value.error.code == -32602


async def test_an_upstream_without_namespace_keeps_its_uris(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=True, customize=with_resources("alpha"))
    sandbox.write_config(upstream_toml("alpha", alpha.url, namespace=False))
    async with running(alpha), running_daemon(sandbox), agent(sandbox) as client:
        listed = [str(resource.uri) for resource in (await client.list_resources()).resources]
        assert listed == ["file:///notes.txt"]
        read = await client.read_resource("note://k2")  # from its template: the only such upstream
        (content,) = read.contents
        assert isinstance(content, TextResourceContents) and content.text == "alpha note k2"
