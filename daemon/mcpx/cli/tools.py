"""`mcpxctl tools`: the catalog agents see, grouped by upstream.

The tools come from the daemon's own `tools/list` (exactly what an agent gets) and the upstreams from
`mcpx/status`. Which upstream owns a tool is asked with `mcpx/tools` (exposed name → upstream and original
name) when the daemon offers it; otherwise it is read from the `<upstream>__` prefix, and a tool without one
(an upstream with `namespace = false`) belongs to the only upstream whose count is not accounted for, or is
listed as unattributed. Standard library only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mcpx.control.client import ControlError, call

SEPARATOR = "__"
_METHOD_NOT_FOUND = -32601


def _routes(socket_path: Path) -> dict[str, str] | None:
    """Exposed tool name → upstream, from `mcpx/tools` when the daemon has it."""
    try:
        result = call(socket_path, "mcpx/tools")
    except ControlError as exc:
        if exc.error.get("code") == _METHOD_NOT_FOUND:
            return None
        raise
    routes = result.get("routes") if isinstance(result, dict) else None
    if not isinstance(routes, dict):
        return None
    return {name: route["upstream"] for name, route in routes.items() if isinstance(route, dict)}


def _owner(name: str, upstreams: dict[str, dict[str, Any]], unprefixed_owner: str | None) -> str | None:
    prefix, separator, _ = name.partition(SEPARATOR)
    if separator and prefix in upstreams:
        return prefix
    return unprefixed_owner


def catalog(socket_path: Path) -> dict[str, Any]:
    """`{"upstreams": [{name, state, tools, withheld_tools, last_error}], "unattributed_tools": [...]}`: each
    tool exactly as agents see it."""
    status = call(socket_path, "mcpx/status")
    tools: list[dict[str, Any]] = call(socket_path, "tools/list")["tools"]
    upstreams = {upstream["name"]: upstream for upstream in status["upstreams"]}
    routes = _routes(socket_path)
    if routes is None:
        prefixed: dict[str, int] = {}
        for tool in tools:
            owner = _owner(tool["name"], upstreams, None)
            if owner is not None:
                prefixed[owner] = prefixed.get(owner, 0) + 1
        unaccounted = [name for name, info in upstreams.items() if info.get("tools", 0) > prefixed.get(name, 0)]
        unprefixed_owner = unaccounted[0] if len(unaccounted) == 1 else None
        routes = {}
        for tool in tools:
            owner = _owner(tool["name"], upstreams, unprefixed_owner)
            if owner is not None:
                routes[tool["name"]] = owner
    grouped: dict[str, list[dict[str, Any]]] = {name: [] for name in upstreams}
    unattributed = []
    for tool in tools:
        owner = routes.get(tool["name"])
        if owner in grouped:
            grouped[owner].append(tool)
        else:
            unattributed.append(tool)
    return {
        "upstreams": [
            {
                "name": name,
                "state": info["state"],
                "last_error": info.get("last_error"),
                "tools": grouped[name],
                "withheld_tools": info.get("withheld_tools", []),
            }
            for name, info in upstreams.items()
        ],
        "unattributed_tools": unattributed,
    }


def _summary(tool: dict[str, Any], width: int) -> str:
    description = tool.get("description")
    line = description.strip().splitlines()[0] if isinstance(description, str) and description.strip() else ""
    return line if len(line) <= width else line[: max(width - 1, 0)] + "…"


def _tool_line(tool: dict[str, Any], column: int, width: int) -> str:
    return f"  {tool['name'].ljust(column)}  {_summary(tool, width - column - 4)}".rstrip()


def render(result: dict[str, Any], width: int = 120) -> str:
    lines: list[str] = []
    names = [tool["name"] for upstream in result["upstreams"] for tool in upstream["tools"]]
    names += [tool["name"] for tool in result["unattributed_tools"]]
    column = min(max((len(name) for name in names), default=0), 48)
    total = len(names)
    for upstream in result["upstreams"]:
        count = len(upstream["tools"])
        header = f"{upstream['name']}  ({upstream['state']}, {count} tool{'s' if count != 1 else ''})"
        if upstream["state"] != "ready" and upstream.get("last_error"):
            header += f": {upstream['last_error']}"
        lines.append(header)
        lines.extend(_tool_line(tool, column, width) for tool in upstream["tools"])
        if upstream["withheld_tools"]:
            lines.append(f"  withheld (name collision): {', '.join(upstream['withheld_tools'])}")
        lines.append("")
    if result["unattributed_tools"]:
        lines.append("upstream not known (namespace = false)")
        lines.extend(_tool_line(tool, column, width) for tool in result["unattributed_tools"])
        lines.append("")
    if not result["upstreams"]:
        lines.append("no upstreams configured")
    else:
        lines.append(f"{total} tool{'s' if total != 1 else ''} in all")
    return "\n".join(lines)
