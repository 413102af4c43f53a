"""The aggregated catalogs (pure): which tools and prompts agents see, under which names, owned by which upstream.

Names are `<upstream>__<name>`, or the upstream's own name for an upstream with `namespace = false`. A name that
two upstreams would both expose is withheld from the catalog (never routed to either) and reported. Every
field other than `name` is passed through unchanged, and the serialized list is built once per change.
Tool filters (`include_tools`, `exclude_tools`) apply to tools only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from mcpx import jsonrpc
from mcpx.config.model import UpstreamConfig
from mcpx.redact import scrub

SEPARATOR = "__"


@dataclass(frozen=True, slots=True)
class ToolRoute:
    upstream: str
    tool: str


@dataclass(frozen=True)
class Catalog:
    """One kind of named item (tools or prompts) across all upstreams."""

    items: tuple[dict[str, Any], ...] = ()
    routes: dict[str, ToolRoute] = field(default_factory=dict)
    # exposed name → the upstreams that all wanted it
    collisions: dict[str, tuple[str, ...]] = field(default_factory=dict)
    items_json: bytes = b"[]"

    def counts(self) -> dict[str, int]:
        """Exposed items per upstream."""
        counts: dict[str, int] = {}
        for route in self.routes.values():
            counts[route.upstream] = counts.get(route.upstream, 0) + 1
        return counts


def tool_allowed(tool: str, include: Sequence[str] | None, exclude: Sequence[str]) -> bool:
    """Case-insensitive globs: the tool must match an include pattern (when any are given) and no exclude."""
    name = tool.lower()
    if include is not None and not any(fnmatchcase(name, pattern.lower()) for pattern in include):
        return False
    return not any(fnmatchcase(name, pattern.lower()) for pattern in exclude)


def exposed_name(config: UpstreamConfig, tool: str) -> str:
    return f"{config.name}{SEPARATOR}{tool}" if config.namespace else tool


def build_catalog(
    upstreams: Iterable[tuple[UpstreamConfig, Sequence[dict[str, Any]]]], *, tools: bool = True
) -> Catalog:
    """Build a catalog from each upstream's config and raw item list (tools, or prompts when `tools` is
    false), in config order."""
    candidates: dict[str, list[tuple[ToolRoute, dict[str, Any]]]] = {}
    for config, items in upstreams:
        for item in items:
            original = item["name"]
            if tools and not tool_allowed(original, config.include_tools, config.exclude_tools):
                continue
            name = exposed_name(config, original)
            exposed = item if name == original else {**item, "name": name}
            candidates.setdefault(name, []).append((ToolRoute(config.name, original), exposed))
    routes: dict[str, ToolRoute] = {}
    exposed_items: list[dict[str, Any]] = []
    collisions: dict[str, tuple[str, ...]] = {}
    for name, owners in candidates.items():
        if len(owners) > 1:
            collisions[name] = tuple(route.upstream for route, _ in owners)
            continue
        route, item = owners[0]
        routes[name] = route
        exposed_items.append(item)
    return Catalog(tuple(exposed_items), routes, collisions, scrub(jsonrpc.dumps(exposed_items)))


# --- resources ---------------------------------------------------------------------------------------------------
# A namespaced upstream's resource URIs and URI templates are exposed as `mcpx://<upstream>/<its own URI>`: the
# prefix is plain text, so an agent that expands an exposed template gets a URI whose rest is the upstream's own
# expansion, and any URI the agent lists or builds reads back from exactly the upstream that offered it.
# Upstreams with `namespace = false` keep their URIs; the same URI listed by two of them is withheld.

RESOURCE_SCHEME = "mcpx://"


def exposed_uri(config: UpstreamConfig, uri: str) -> str:
    return f"{RESOURCE_SCHEME}{config.name}/{uri}" if config.namespace else uri


@dataclass(frozen=True)
class ResourceCatalog:
    resources: tuple[dict[str, Any], ...] = ()
    templates: tuple[dict[str, Any], ...] = ()
    resources_json: bytes = b"[]"
    templates_json: bytes = b"[]"
    # upstreams with `namespace = false` that offer resources, in config order
    plain_upstreams: tuple[str, ...] = ()
    # URI listed by one such upstream → that upstream
    plain_owners: dict[str, str] = field(default_factory=dict)
    collisions: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def route(self, uri: str, namespaced: Iterable[str]) -> ToolRoute | None:
        """The upstream and its own URI behind a URI an agent asks for; None when no upstream can be told."""
        if uri.startswith(RESOURCE_SCHEME):
            upstream, separator, original = uri[len(RESOURCE_SCHEME) :].partition("/")
            return ToolRoute(upstream, original) if separator and upstream in namespaced else None
        owner = self.plain_owners.get(uri)
        if owner is None and len(self.plain_upstreams) == 1 and uri not in self.collisions:
            owner = self.plain_upstreams[0]  # e.g. a URI built from that upstream's template
        return ToolRoute(owner, uri) if owner is not None else None


def build_resource_catalog(
    upstreams: Iterable[tuple[UpstreamConfig, Sequence[dict[str, Any]], Sequence[dict[str, Any]]]],
) -> ResourceCatalog:
    """From each upstream's config, resources and resource templates, in config order."""
    entries: list[tuple[str | None, dict[str, Any]]] = []  # (the URI of a plain upstream's resource, resource)
    templates: list[dict[str, Any]] = []
    plain_upstreams: list[str] = []
    claims: dict[str, list[str]] = {}
    for config, listed, listed_templates in upstreams:
        if config.namespace:
            entries.extend((None, {**resource, "uri": exposed_uri(config, resource["uri"])}) for resource in listed)
            templates.extend(
                {**template, "uriTemplate": exposed_uri(config, template["uriTemplate"])}
                for template in listed_templates
            )
            continue
        if listed or listed_templates:
            plain_upstreams.append(config.name)
        for resource in listed:
            if resource["uri"] not in claims:
                entries.append((resource["uri"], resource))
            claims.setdefault(resource["uri"], []).append(config.name)
        templates.extend(listed_templates)
    collisions = {uri: tuple(names) for uri, names in claims.items() if len(names) > 1}
    resources = [resource for uri, resource in entries if uri is None or uri not in collisions]
    return ResourceCatalog(
        tuple(resources),
        tuple(templates),
        scrub(jsonrpc.dumps(resources)),
        scrub(jsonrpc.dumps(templates)),
        tuple(plain_upstreams),
        {uri: names[0] for uri, names in claims.items() if len(names) == 1},
        collisions,
    )


def expose_content_uris(config: UpstreamConfig, result: Any) -> Any:
    """`result` (a tool result or a prompt) with the URIs of its `resource_link` and embedded `resource` content
    exposed as agents read them back (`exposed_uri`); `result` itself when nothing needed it.

    Only a namespaced upstream's URIs change. Content is found where MCP puts it: `content` (tool results) and
    `messages[].content` (prompts); every other field stays as it is.
    """
    if not config.namespace or not isinstance(result, dict):
        return result
    changed = False

    def expose(item: Any) -> Any:
        nonlocal changed
        if not isinstance(item, dict):
            return item
        if item.get("type") == "resource_link" and isinstance(item.get("uri"), str):
            changed = True
            return {**item, "uri": exposed_uri(config, item["uri"])}
        resource = item.get("resource")
        if item.get("type") == "resource" and isinstance(resource, dict) and isinstance(resource.get("uri"), str):
            changed = True
            return {**item, "resource": {**resource, "uri": exposed_uri(config, resource["uri"])}}
        return item

    content = result.get("content")
    if isinstance(content, list):
        result = {**result, "content": [expose(item) for item in content]}
    messages = result.get("messages")
    if isinstance(messages, list):
        result = {
            **result,
            "messages": [
                {**message, "content": expose(message["content"])}
                if isinstance(message, dict) and "content" in message
                else message
                for message in messages
            ],
        }
    return result if changed else None


# --- pagination of the aggregated lists -------------------------------------------------------------------------
# An agent's list request is answered from pre-serialized pages. The cursor names the catalog's generation and
# the page, so a cursor from before a catalog change is refused (-32602) instead of skipping or repeating items.


def paginate(items: Sequence[Any], serialized: bytes, page_size: int) -> tuple[bytes, ...]:
    """The serialized pages of `items` (at least one, possibly empty), secrets scrubbed; `serialized` is the
    whole list, already serialized (the one page of a short list)."""
    if len(items) <= page_size:
        return (serialized,)
    return tuple(
        scrub(jsonrpc.dumps(list(items[start : start + page_size]))) for start in range(0, len(items), page_size)
    )


def page_cursor(generation: int, page: int) -> str:
    return f"{generation}.{page}"


def page_of(cursor: str, generation: int, pages: int) -> int | None:
    """The page a cursor names, or None when it is not one of this generation's cursors."""
    stamp, separator, number = cursor.partition(".")
    # (str.isdigit also admits digits int() refuses, such as "²"; and int() refuses over 4,300 digits)
    if not separator or stamp != str(generation) or not (number.isascii() and number.isdigit()) or len(number) > 18:
        return None
    page = int(number)
    return page if 0 < page < pages else None
