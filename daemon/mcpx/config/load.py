"""Read and validate a config file as a whole; every problem is reported at once, naming file, upstream and field."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mcpx.config.model import AUTH_TYPES, Config
from mcpx.config.model import DuplicateUpstreamName as _DuplicateName
from mcpx.errors import ConfigError
from mcpx.paths import read_config_file


def load_config(path: Path, *, missing_ok: bool = False) -> Config:
    """Load `path`. A missing file is an error unless `missing_ok` (then the config is empty).

    Raises:
        ConfigError: the file cannot be read, is not TOML, or does not validate.
    """
    try:
        raw = read_config_file(path)
    except FileNotFoundError:
        if missing_ok:
            return Config()
        raise ConfigError([f"{path}: no such file"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    return parse_config(text, path)


def parse_config(text: str, path: Path) -> Config:
    """Validate `text` as the content of the config file `path` (named in every problem).

    Raises:
        ConfigError: `text` is not TOML or does not validate.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from None
    labels, problems = _adopt_agent_servers(path, document)
    try:
        config = Config.model_validate({**document, "source": path})
    except ValidationError as exc:
        # Names used twice are reported from the raw document only: pydantic checks them only once every upstream
        # is valid, and they are to be reported with every other problem.
        problems += [_describe(path, document, error, labels) for error in exc.errors() if not _duplicate_name(error)]
    else:
        if not problems:
            return config
    problems += [f"{path}: upstream {name!r}: name: used by more than one upstream" for name in _duplicates(document)]
    # Two upstreams of one name may have the same problem: it is said once.
    raise ConfigError(list(dict.fromkeys(problems)))


# `type` of an `mcpServers` entry (Claude Code, VS Code, Cursor) → the upstream's `transport` (None: a stdio server).
_AGENT_SERVER_TYPES: dict[str, str | None] = {
    "stdio": None,
    "http": "auto",
    "streamable-http": "streamable-http",
    "streamableHttp": "streamable-http",
    "sse": "sse",
}


def _adopt_agent_servers(path: Path, document: dict[str, Any]) -> tuple[dict[int, str], list[str]]:
    """Move the `[mcpServers.<name>]` tables (the spelling of Claude Desktop, Claude Code and VS Code: `command`,
    `args`, `env`, `cwd`, or `url`, `type`, `headers`; any other upstream key too) into `proxy.upstream`, in place.

    Returns the label of each moved entry by its index in `proxy.upstream` (for error messages), and the problems
    found in the entries' shape.
    """
    servers = document.pop("mcpServers", None)
    if servers is None:
        return {}, []
    if not isinstance(servers, dict):
        return {}, [f"{path}: mcpServers: must be a table of servers ([mcpServers.<name>])"]
    proxy = document.setdefault("proxy", {})
    upstreams = proxy.setdefault("upstream", []) if isinstance(proxy, dict) else None
    if not isinstance(upstreams, list):
        return {}, []  # the model reports the malformed [proxy] table
    labels: dict[int, str] = {}
    problems: list[str] = []
    for name, entry in servers.items():
        where = f"{path}: mcpServers {name!r}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be a table")
            continue
        upstream = dict(entry)
        if "name" in upstream:
            problems.append(f"{where}: name: unknown key (the table's own name is the upstream's name)")
            continue
        kind = upstream.pop("type", None)
        if kind is not None:
            if kind not in _AGENT_SERVER_TYPES:
                expected = ", ".join(f'"{known}"' for known in _AGENT_SERVER_TYPES)
                problems.append(f"{where}: type: must be one of {expected}")
                continue
            transport = _AGENT_SERVER_TYPES[kind]
            if (transport is None) != ("url" not in upstream):
                needs = "`command`" if transport is None else "`url`"
                problems.append(f'{where}: type: "{kind}" is for servers given by {needs}')
                continue
            if transport is not None and "transport" in upstream:
                problems.append(f"{where}: give `type` or `transport`, not both")
                continue
            if transport is not None and transport != "auto":
                upstream["transport"] = transport
        labels[len(upstreams)] = f"mcpServers {name!r}"
        upstreams.append({"name": name, **upstream})
    return labels, problems


def _duplicate_name(error: Any) -> bool:
    return isinstance(error.get("ctx", {}).get("error"), _DuplicateName)


def _duplicates(document: dict[str, Any]) -> list[str]:
    """Upstream names used twice, found in the raw document so they are reported with every other problem."""
    proxy = document.get("proxy")
    upstreams = proxy.get("upstream") if isinstance(proxy, dict) else None
    if not isinstance(upstreams, list):
        return []
    names = [upstream.get("name") for upstream in upstreams if isinstance(upstream, dict)]
    return sorted({name for name in names if isinstance(name, str) and names.count(name) > 1})


def _describe(path: Path, document: dict[str, Any], error: Any, labels: dict[int, str]) -> str:
    location: tuple[int | str, ...] = tuple(error["loc"])
    where = ""
    if location[:2] == ("proxy", "upstream") and len(location) >= 3 and isinstance(location[2], int):
        index = location[2]
        upstreams = document.get("proxy", {}).get("upstream", [])
        name = upstreams[index].get("name") if index < len(upstreams) and isinstance(upstreams[index], dict) else None
        where = f"upstream {name!r}" if isinstance(name, str) else f"upstream #{index + 1}"
        where = labels.get(index, where)
        location = location[3:]
        # Drop the discriminator tag pydantic inserts for tagged unions (e.g. auth.bearer_env.env).
        if len(location) >= 2 and location[0] == "auth" and location[1] in AUTH_TYPES:
            location = (location[0], *location[2:])
    field = ".".join(str(part) for part in location)
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    elif error["type"] == "missing":
        message = "required field is missing"
    return ": ".join(part for part in (str(path), where, field, message) if part)
