"""The aggregated tool catalog: names, filters, collisions and pass-through of every tool field."""

from __future__ import annotations

import copy
import json
from typing import Any

from mcpx import jsonrpc
from mcpx.config import UpstreamConfig
from mcpx.router.catalog import (
    SEPARATOR,
    Catalog,
    ToolRoute,
    build_catalog,
    build_resource_catalog,
    exposed_name,
    page_cursor,
    page_of,
    tool_allowed,
)


def _upstream(
    name: str,
    *,
    namespace: bool = True,
    include: tuple[str, ...] | None = None,
    exclude: tuple[str, ...] = (),
) -> UpstreamConfig:
    return UpstreamConfig(
        name=name,
        url=f"https://{name}.example.com/mcp",
        namespace=namespace,
        include_tools=include,
        exclude_tools=exclude,
    )


def _tool(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "inputSchema": {"type": "object"}, **fields}


def _names(catalog: Catalog) -> list[str]:
    return [tool["name"] for tool in catalog.items]


def test_tools_are_exposed_as_upstream_double_underscore_tool() -> None:
    catalog = build_catalog([(_upstream("jira"), [_tool("get_issue"), _tool("search")])])
    assert SEPARATOR == "__"
    assert _names(catalog) == ["jira__get_issue", "jira__search"]
    assert catalog.routes == {
        "jira__get_issue": ToolRoute("jira", "get_issue"),
        "jira__search": ToolRoute("jira", "search"),
    }


def test_tools_of_several_upstreams_keep_config_order() -> None:
    catalog = build_catalog(
        [
            (_upstream("b"), [_tool("z"), _tool("a")]),
            (_upstream("a"), [_tool("m")]),
        ]
    )
    assert _names(catalog) == ["b__z", "b__a", "a__m"]


def test_an_upstream_with_namespace_false_keeps_its_tools_own_names() -> None:
    catalog = build_catalog([(_upstream("fs", namespace=False), [_tool("read_file")])])
    assert _names(catalog) == ["read_file"]
    assert catalog.routes == {"read_file": ToolRoute("fs", "read_file")}


def test_exposed_name_follows_the_namespace_setting() -> None:
    assert exposed_name(_upstream("jira"), "get") == "jira__get"
    assert exposed_name(_upstream("jira", namespace=False), "get") == "get"


def test_tool_allowed_without_filters_allows_everything() -> None:
    assert tool_allowed("anything", None, ())


def test_tool_allowed_requires_a_match_of_some_include_pattern_when_given() -> None:
    include = ("get*", "search*")
    assert tool_allowed("get_issue", include, ())
    assert tool_allowed("search_all", include, ())
    assert not tool_allowed("create_issue", include, ())


def test_an_empty_include_list_allows_nothing() -> None:
    assert not tool_allowed("get_issue", (), ())


def test_tool_allowed_rejects_any_exclude_match_even_when_included() -> None:
    assert not tool_allowed("get_deleted", ("get*",), ("*delete*",))
    assert not tool_allowed("delete_issue", None, ("*delete*",))
    assert tool_allowed("get_issue", ("get*",), ("*delete*",))


def test_tool_allowed_globs_are_case_insensitive_both_ways() -> None:
    assert tool_allowed("GetIssue", ("get*",), ())
    assert tool_allowed("getissue", ("GET*",), ())
    assert not tool_allowed("BulkDELETE", None, ("*delete*",))
    assert not tool_allowed("bulk_delete", None, ("*DELETE*",))


def test_tool_allowed_supports_question_marks_and_character_classes() -> None:
    assert tool_allowed("get1", ("get?",), ())
    assert not tool_allowed("get12", ("get?",), ())
    assert tool_allowed("set", ("[gs]et",), ())
    assert not tool_allowed("pet", ("[gs]et",), ())


def test_tool_allowed_globs_match_the_whole_name() -> None:
    assert not tool_allowed("forget_it", ("get",), ())
    assert tool_allowed("forget_it", ("*get*",), ())


def test_include_and_exclude_filter_the_catalog_on_the_tools_own_names() -> None:
    tools = [_tool("getIssue"), _tool("searchIssues"), _tool("get_deleted"), _tool("createIssue")]
    catalog = build_catalog([(_upstream("jira", include=("get*", "SEARCH*"), exclude=("*DELETE*",)), tools)])
    assert _names(catalog) == ["jira__getIssue", "jira__searchIssues"]


def test_filters_do_not_match_the_namespaced_name() -> None:
    catalog = build_catalog([(_upstream("jira", include=("jira__*",)), [_tool("get")])])
    assert catalog.items == ()


def test_a_name_two_namespace_free_upstreams_expose_is_withheld_and_reported() -> None:
    catalog = build_catalog(
        [
            (_upstream("a", namespace=False), [_tool("search"), _tool("only_a")]),
            (_upstream("b", namespace=False), [_tool("search"), _tool("only_b")]),
        ]
    )
    assert _names(catalog) == ["only_a", "only_b"]
    assert "search" not in catalog.routes
    assert catalog.collisions == {"search": ("a", "b")}


def test_a_namespaced_name_colliding_with_a_namespace_free_tool_is_withheld_from_both() -> None:
    catalog = build_catalog(
        [
            (_upstream("jira"), [_tool("get")]),
            (_upstream("raw", namespace=False), [_tool("jira__get"), _tool("other")]),
        ]
    )
    assert _names(catalog) == ["other"]
    assert set(catalog.routes) == {"other"}
    assert catalog.collisions == {"jira__get": ("jira", "raw")}


def test_a_collision_among_three_upstreams_names_all_of_them_in_config_order() -> None:
    catalog = build_catalog([(_upstream(name, namespace=False), [_tool("x")]) for name in ("c", "a", "b")])
    assert catalog.items == ()
    assert catalog.routes == {}
    assert catalog.collisions == {"x": ("c", "a", "b")}


def test_a_tool_filtered_out_cannot_collide() -> None:
    catalog = build_catalog(
        [
            (_upstream("a", namespace=False, exclude=("search",)), [_tool("search")]),
            (_upstream("b", namespace=False), [_tool("search")]),
        ]
    )
    assert catalog.routes == {"search": ToolRoute("b", "search")}
    assert catalog.collisions == {}


def test_every_tool_field_other_than_name_passes_through_unchanged() -> None:
    tool: dict[str, Any] = {
        "name": "get_issue",
        "title": "Get an issue",
        "description": "Fetch one issue by key.",
        "inputSchema": {"type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]},
        "outputSchema": {"type": "object", "properties": {"summary": {"type": "string"}}},
        "annotations": {"readOnlyHint": True, "openWorldHint": False},
        "icons": [{"src": "https://example.com/i.png", "mimeType": "image/png"}],
        "_meta": {"vendor/x": {"nested": [1, 2.5, None, "s"]}},
        "x-future-field": {"anything": ["goes", {"here": True}]},
    }
    original = copy.deepcopy(tool)
    catalog = build_catalog([(_upstream("jira"), [tool])])
    (exposed,) = catalog.items
    assert exposed == {**original, "name": "jira__get_issue"}
    assert list(exposed) == list(original)  # same keys, same order


def test_the_upstreams_tool_dicts_are_not_mutated() -> None:
    tools = [_tool("a", description="d", _meta={"k": "v"}), _tool("b")]
    before = copy.deepcopy(tools)
    build_catalog([(_upstream("up"), tools), (_upstream("free", namespace=False), tools)])
    assert tools == before


def test_a_namespace_free_tool_is_exposed_exactly_as_received() -> None:
    tool = _tool("read", annotations={"readOnlyHint": True}, _meta={"a": 1})
    catalog = build_catalog([(_upstream("fs", namespace=False), [tool])])
    assert catalog.items == (tool,)


def test_tools_json_is_the_serialized_tool_list() -> None:
    catalog = build_catalog(
        [
            (_upstream("a"), [_tool("x", description="é ✓ \u2028"), _tool("y", _meta={"big": 2**70})]),
            (_upstream("b", namespace=False), [_tool("z")]),
        ]
    )
    assert catalog.items_json == jsonrpc.dumps(list(catalog.items))
    assert jsonrpc.loads(catalog.items_json) == list(catalog.items)
    assert b"\n" not in catalog.items_json


def test_an_empty_catalog_serializes_to_an_empty_list() -> None:
    assert build_catalog([]).items_json == b"[]"
    assert build_catalog([(_upstream("a"), [])]).items_json == b"[]"
    assert Catalog().items_json == b"[]"


def test_counts_reports_exposed_tools_per_upstream_without_collided_or_filtered_ones() -> None:
    catalog = build_catalog(
        [
            (_upstream("a"), [_tool("x"), _tool("y")]),
            (_upstream("b", namespace=False, exclude=("hidden",)), [_tool("a__x"), _tool("z"), _tool("hidden")]),
            (_upstream("c", include=()), [_tool("nothing")]),
        ]
    )
    assert catalog.counts() == {"a": 1, "b": 1}
    assert Catalog().counts() == {}


def test_prompts_are_namespaced_unfiltered_and_withheld_on_collision() -> None:
    prompts: list[dict[str, Any]] = [{"name": "review", "arguments": [{"name": "topic"}]}, {"name": "summary"}]
    catalog = build_catalog(
        [
            (_upstream("jira", include=("nothing*",)), prompts),
            (_upstream("a", namespace=False), [{"name": "summary"}]),
            (_upstream("b", namespace=False), [{"name": "summary"}]),
        ],
        tools=False,
    )
    assert _names(catalog) == ["jira__review", "jira__summary"]
    assert catalog.routes["jira__review"] == ToolRoute("jira", "review")
    assert catalog.collisions == {"summary": ("a", "b")}
    assert catalog.items[0]["arguments"] == [{"name": "topic"}]


def test_resources_are_namespaced_by_uri_and_route_back() -> None:
    notes = {"uri": "file:///notes.txt", "name": "notes"}
    template = {"uriTemplate": "note://{key}", "name": "note"}
    catalog = build_resource_catalog(
        [
            (_upstream("alpha"), [notes], [template]),
            (_upstream("p", namespace=False), [notes, {"uri": "only://p"}], [template]),
            (_upstream("q", namespace=False), [notes], []),
        ]
    )
    assert [r["uri"] for r in json.loads(catalog.resources_json)] == ["mcpx://alpha/file:///notes.txt", "only://p"]
    assert [t["uriTemplate"] for t in json.loads(catalog.templates_json)] == [
        "mcpx://alpha/note://{key}",
        "note://{key}",
    ]
    assert catalog.collisions == {"file:///notes.txt": ("p", "q")}
    namespaced = ["alpha"]
    assert catalog.route("mcpx://alpha/note://k", namespaced) == ToolRoute("alpha", "note://k")
    assert catalog.route("mcpx://p/only://p", namespaced) is None  # p keeps its own URIs
    assert catalog.route("only://p", namespaced) == ToolRoute("p", "only://p")
    assert catalog.route("file:///notes.txt", namespaced) is None  # withheld: two plain upstreams list it
    assert catalog.route("note://k", namespaced) is None  # two plain upstreams could own it


def test_a_page_cursor_names_a_page_of_its_own_generation_only() -> None:
    assert page_of(page_cursor(3, 2), 3, 5) == 2
    assert page_of(page_cursor(2, 2), 3, 5) is None  # an older generation's
    assert page_of(page_cursor(3, 5), 3, 5) is None  # past the last page
    # Digits str.isdigit admits but int() refuses, and more digits than int() parses: not cursors, not crashes.
    for cursor in ("3.²", "3.٣", "3." + "1" * 5000, "3.", "3.-1", "3.1.2"):
        assert page_of(cursor, 3, 5) is None, cursor
