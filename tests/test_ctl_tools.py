"""`mcpxctl tools`: the catalog agents see, per upstream (against the real daemon), and how tools are attributed
to upstreams (with the daemon's `mcpx/tools` routes, or from the names alone)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mcpx.cli import tools
from mcpx.control.client import ControlError
from tests.support.daemon import Sandbox, agent, mcpxctl, running_daemon, upstream_toml
from tests.support.upstream import Upstream, reserve_port, running


async def test_tools_lists_what_agents_see_grouped_by_upstream(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=True)
    beta = Upstream("beta", json_response=False)
    closed = reserve_port()
    down_url = f"http://127.0.0.1:{closed.getsockname()[1]}/mcp"
    sandbox.write_config(
        upstream_toml("alpha", alpha.url, exclude_tools=["delete*"])
        + upstream_toml("beta", beta.url, namespace=False, include_tools=["search*"])
        + upstream_toml("gone", down_url)
    )
    try:
        async with running(alpha, beta), running_daemon(sandbox):
            async with agent(sandbox) as client:
                seen = {tool.name for tool in (await client.list_tools()).tools}
            code, stdout, stderr = await mcpxctl(sandbox, "tools", "--json")
            assert code == 0, stderr
            text_code, text, text_err = await mcpxctl(sandbox, "tools")
    finally:
        closed.close()

    result = json.loads(stdout)
    by_name = {upstream["name"]: upstream for upstream in result["upstreams"]}
    assert [tool["name"] for tool in by_name["alpha"]["tools"]] == [
        "alpha__echo",
        "alpha__add",
        "alpha__get_issue",
        "alpha__search_issues",
    ]
    assert [tool["name"] for tool in by_name["beta"]["tools"]] == ["search_issues"]
    assert by_name["gone"]["tools"] == []
    assert by_name["gone"]["state"] == "down"
    assert result["unattributed_tools"] == []
    every = [tool for upstream in result["upstreams"] for tool in upstream["tools"]]
    assert {tool["name"] for tool in every} == seen
    echo = by_name["alpha"]["tools"][0]
    assert echo["description"] == "Echo the text back, prefixed with the server's name."
    assert echo["inputSchema"]["properties"]["text"]["type"] == "string"  # the whole tool, as agents get it

    assert text_code == 0, text_err
    lines = text.splitlines()
    assert lines[0] == "alpha  (ready, 4 tools)"
    assert lines[1].split(maxsplit=1) == ["alpha__echo", "Echo the text back, prefixed with the server's name."]
    assert "beta  (ready, 1 tool)" in lines
    assert any(line.startswith("gone  (down, 0 tools): ") for line in lines)
    assert lines[-1] == "5 tools in all"


class _FakeDaemon:
    def __init__(self, upstreams: list[dict[str, Any]], names: list[str], routes: dict[str, str] | None) -> None:
        self.answers: dict[str, Any] = {
            "mcpx/status": {"upstreams": upstreams},
            "tools/list": {"tools": [{"name": name, "description": f"{name} does things"} for name in names]},
        }
        if routes is not None:
            self.answers["mcpx/tools"] = {
                "routes": {name: {"upstream": owner, "tool": name} for name, owner in routes.items()}
            }

    def __call__(self, socket_path: Path, method: str, params: Any = None, **_: Any) -> Any:
        if method not in self.answers:
            raise ControlError({"code": -32601, "message": f"method not found: {method}"})
        return self.answers[method]


def _upstream(name: str, count: int) -> dict[str, Any]:
    return {"name": name, "state": "ready", "tools": count, "withheld_tools": [], "last_error": None}


def _grouped(result: dict[str, Any]) -> dict[str, list[str]]:
    grouped = {upstream["name"]: [tool["name"] for tool in upstream["tools"]] for upstream in result["upstreams"]}
    grouped["?"] = [tool["name"] for tool in result["unattributed_tools"]]
    return grouped


def test_without_routes_two_unprefixed_upstreams_leave_their_tools_unattributed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstreams = [_upstream("a", 1), _upstream("b", 1), _upstream("c", 1)]
    monkeypatch.setattr(tools, "call", _FakeDaemon(upstreams, ["a__x", "y", "z"], routes=None))

    result = tools.catalog(Path("unused"))

    assert _grouped(result) == {"a": ["a__x"], "b": [], "c": [], "?": ["y", "z"]}
    assert "upstream not known (namespace = false)" in tools.render(result)


def test_the_daemons_routes_win_over_the_names(monkeypatch: pytest.MonkeyPatch) -> None:
    upstreams = [_upstream("a", 1), _upstream("b", 2)]
    routes = {"a__x": "b", "y": "b", "z": "a"}  # an upstream with namespace = false may expose a name like "a__x"
    monkeypatch.setattr(tools, "call", _FakeDaemon(upstreams, ["a__x", "y", "z"], routes))

    assert _grouped(tools.catalog(Path("unused"))) == {"a": ["z"], "b": ["a__x", "y"], "?": []}
