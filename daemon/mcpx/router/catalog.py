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
