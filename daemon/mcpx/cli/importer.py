"""`mcpxctl import`: read the MCP servers configured in agents (Claude Desktop, Claude Code, Cursor, VS Code,
Codex, or a given file) and turn them into mcpx upstreams: remote ones as `url` upstreams, local ones (stdio) as
`command` upstreams.

Secrets never travel as literals: a bearer token becomes `auth = { type = "bearer_env", env = "NAME_TOKEN" }`,
another secret-looking header or environment value becomes `${NAME_HEADER}` / `${NAME_VARIABLE}`, and the command
lists the variables the user must give mcpxd. References the agent config already used (`${VAR}`, `${env:VAR}`,
VS Code's `${input:id}`, Codex's `bearer_token_env_var`) become variables of the same (or a derived) name. Servers
an agent runs through `mcp-remote` are imported as the remote server they point at. A local server whose arguments
use a placeholder (mcpx expands `${VAR}` only in `env`) or seem to hold a secret is listed as not imported, with
what to change. Standard library only, except the config loader that validates the result (imported inside
`validate`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mcpx import paths
from mcpx.cli.files import atomic_write

CLIENTS = ("claude-desktop", "claude-code", "cursor", "vscode", "codex")

_VAR = r"[A-Za-z_][A-Za-z0-9_]*"
# `${input:id}` (VS Code prompts for it), `${env:VAR}` (VS Code, Cursor), `${VAR}` / `${VAR:-default}` (Claude
# Code, mcp-remote; in VS Code and Cursor these name editor variables such as ${workspaceFolder}).
_INPUT_FORM = r"\$\{input:([^}]+)\}"
_ENV_FORM = r"\$\{env:(" + _VAR + r")\}"
_PLAIN_FORM = r"\$\{(" + _VAR + r")(?::-[^}]*)?\}"
_REFERENCE = re.compile("|".join((_INPUT_FORM, _ENV_FORM, _PLAIN_FORM)))
_EDITOR_REFERENCE = re.compile("|".join((_INPUT_FORM, _ENV_FORM)))
_ANY_PLACEHOLDER = re.compile(r"\$\{[^}]*\}")
_PLAIN_REFERENCE = re.compile(r"\$\{(" + _VAR + r")\}")
_SECRET_NAME = re.compile(r"auth|token|key|secret|passw|cookie|session|credential|signature", re.IGNORECASE)
# A command-line argument that is a token by its shape alone.
_TOKEN_ARGUMENT = re.compile(r"(?=[A-Za-z_-]*[0-9])(?=[0-9_-]*[A-Za-z])[A-Za-z0-9_-]{32,}")
_BEARER = re.compile(r"^\s*bearer\s+(.+?)\s*$", re.IGNORECASE)
_MCP_REMOTE_VALUE_FLAGS = {
    "--header",
    "--transport",
    "--static-oauth-client-info",
    "--static-oauth-client-metadata",
    "--host",
    "--auth-timeout",
    "--resource",
    "--ignore-tool",
}
_NODE_RUNNERS = {"npx", "bunx", "pnpx", "pnpm", "yarn", "npm", "mcp-remote"}


class ImportFailed(Exception):
    """A source named on the command line cannot be read or parsed."""


@dataclass(frozen=True)
class Source:
    """One agent config file (and, for Claude Code, the project whose entries these are)."""

    client: str
    path: Path
    key: str  # where the servers live: "mcpServers", "servers", "mcp.servers", "mcp_servers"
    project: str | None = None

    @property
    def label(self) -> str:
        where = _home_relative(self.path)
        return f"{where} (project {self.project})" if self.project else where


@dataclass
class Upstream:
    name: str
    original: str
    source: Source
    url: str | None = None
    transport: str | None = None
    command: str | None = None
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    auth: dict[str, str] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    exclude_tools: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Skipped:
    original: str
    source: Source
    reason: str


@dataclass
class Result:
    upstreams: list[Upstream] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    variables: dict[str, str] = field(default_factory=dict)  # name → what it holds
    sources: list[Source] = field(default_factory=list)
    has_mcpx: set[Source] = field(default_factory=set)  # agent configs that already list mcpx-shim


# --- finding and reading agent configs ---------------------------------------------------------------------------


def _home_relative(path: Path) -> str:
    try:
        return "~/" + str(path.relative_to(Path.home()))
    except ValueError:
        return str(path)


def _app_support() -> Path:
    return Path.home() / "Library" / "Application Support"


def default_files(client: str) -> list[Path]:
    """Where each client keeps its MCP servers (user level; VS Code's workspace file in the current directory)."""
    if client == "claude-desktop":
        return [
            _app_support() / "Claude" / "claude_desktop_config.json",
            paths.config_home() / "Claude" / "claude_desktop_config.json",
        ]
    if client == "claude-code":
        return [Path.home() / ".claude.json"]
    if client == "cursor":
        return [Path.home() / ".cursor" / "mcp.json"]
    if client == "vscode":
        user_dirs = [_app_support() / "Code" / "User", paths.config_home() / "Code" / "User"]
        files = [directory / name for directory in user_dirs for name in ("mcp.json", "settings.json")]
        return [*files, Path.cwd() / ".vscode" / "mcp.json"]
    codex_home = os.environ.get("CODEX_HOME")
    return [(Path(codex_home) if codex_home else Path.home() / ".codex") / "config.toml"]


def _string_end(text: str, start: int) -> int:
    """The index just after the JSON string that starts at `start` (a double quote)."""
    index = start + 1
    while index < len(text) and text[index] != '"':
        index += 2 if text[index] == "\\" else 1
    return index + 1


def strip_jsonc(text: str) -> str:
    """JSON with comments and trailing commas (VS Code's settings) → JSON; strings are left alone."""
    out: list[str] = []
    index, length = 0, len(text)
    while index < length:
        if text[index] == '"':
            end = _string_end(text, index)
            out.append(text[index:end])
            index = end
        elif text.startswith("//", index):
            newline = text.find("\n", index)
            index = length if newline < 0 else newline
        elif text.startswith("/*", index):
            close = text.find("*/", index + 2)
            index = length if close < 0 else close + 2
        else:
            out.append(text[index])
            index += 1
    stripped, out = "".join(out), []
    index, length = 0, len(stripped)
    while index < length:
        char = stripped[index]
        if char == '"':
            end = _string_end(stripped, index)
            out.append(stripped[index:end])
            index = end
            continue
        if char == "," and stripped[index + 1 :].lstrip()[:1] in ("}", "]"):
            index += 1
            continue
        out.append(char)
        index += 1
    return "".join(out)


def _load(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        return tomllib.loads(text)
    return json.loads(strip_jsonc(text))


def _servers(document: Any, key: str) -> dict[str, Any]:
    node = document
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return {name: entry for name, entry in node.items() if isinstance(entry, dict)} if isinstance(node, dict) else {}


def entries_of(client: str, path: Path, document: Any) -> list[tuple[Source, str, dict[str, Any]]]:
    """Every server entry of one parsed file, with its source."""
    found: list[tuple[Source, str, dict[str, Any]]] = []
    if client == "codex":
        keys = ["mcp_servers"]
    elif client == "vscode":
        keys = ["servers", "mcp.servers"]
    else:
        keys = ["mcpServers"]
    for key in keys:
        source = Source(client, path, key)
        found += [(source, name, entry) for name, entry in _servers(document, key).items()]
    if client == "claude-code" and isinstance(document, dict) and isinstance(document.get("projects"), dict):
        for project, settings in document["projects"].items():
            source = Source(client, path, "mcpServers", project=str(project))
            found += [(source, name, entry) for name, entry in _servers(settings, "mcpServers").items()]
    return found


def detect_client(path: Path, document: Any) -> str:
    """Which client's format a file given on the command line is in."""
    if path.suffix == ".toml":
        return "codex"
    if isinstance(document, dict):
        if isinstance(document.get("projects"), dict):
            return "claude-code"
        if "servers" in document or isinstance(document.get("mcp"), dict):
            return "vscode"
    return "cursor" if path.name == "mcp.json" else "claude-desktop"


def read_sources(choice: str | None) -> tuple[list[tuple[Source, str, dict[str, Any]]], list[Source]]:
    """The entries of the chosen client (or file), or of every client whose files exist.

    Raises:
        ImportFailed: a named file is missing, or any file found cannot be parsed.
    """
    if choice is not None and choice not in CLIENTS:
        path = Path(choice).expanduser()
        try:
            document = _load(path)
        except FileNotFoundError:
            raise ImportFailed(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError, ValueError, tomllib.TOMLDecodeError) as exc:
            raise ImportFailed(f"{path}: cannot read it: {exc}") from None
        client = detect_client(path, document)
        return entries_of(client, path, document), [Source(client, path, "")]
    entries: list[tuple[Source, str, dict[str, Any]]] = []
    sources: list[Source] = []
    for client in [choice] if choice else list(CLIENTS):
        for path in dict.fromkeys(default_files(client)):
            try:
                document = _load(path)
            except FileNotFoundError:
                continue
            except (OSError, UnicodeDecodeError, ValueError, tomllib.TOMLDecodeError) as exc:
                raise ImportFailed(f"{path}: cannot read it: {exc}") from None
            sources.append(Source(client, path, ""))
            entries += entries_of(client, path, document)
    return entries, sources


# --- converting entries ------------------------------------------------------------------------------------------


def _variable_stem(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").upper()
    return stem if stem and not stem[0].isdigit() else f"MCP_{stem}"


def _looks_secret(header: str, value: str) -> bool:
    if _SECRET_NAME.search(header):
        return True
    compact = value.strip()
    return (
        len(compact) >= 20
        and " " not in compact
        and any(c.isdigit() for c in compact)
        and any(c.isalpha() for c in compact)
    )


class _Converter:
    def __init__(self, result: Result) -> None:
        self.result = result

    def need(self, variable: str, why: str) -> str:
        self.result.variables.setdefault(variable, why)
        return variable

    def references(self, value: str, upstream: Upstream, env: dict[str, Any], *, plain_is_env: bool) -> str | None:
        """`value` with the agent's references rewritten as `${VAR}` (a variable the config itself set is put back
        as the literal it is); None if it uses a placeholder mcpx cannot fill."""
        pattern = _REFERENCE if plain_is_env else _EDITOR_REFERENCE
        if "${" in pattern.sub("", value):
            return None  # e.g. ${workspaceFolder}

        def substitute(match: re.Match[str]) -> str:
            prompted, variable = match.group(1), match.group(2) or (match.group(3) if plain_is_env else None)
            if prompted is not None:
                return "${" + self.need(_variable_stem(prompted), f"what VS Code prompts for as {prompted!r}") + "}"
            assert variable is not None
            local = env.get(variable)
            if isinstance(local, str) and local and not _ANY_PLACEHOLDER.search(local):
                return local
            self.need(variable, f"used by '{upstream.name}' (from the agent's environment)")
            return "${" + variable + "}"

        return pattern.sub(substitute, value)

    def header(self, upstream: Upstream, name: str, value: str, env: dict[str, Any], *, plain_is_env: bool) -> None:
        # The config's own rules (headers mcpx sets itself, RFC 9110 names), imported only when `import` runs:
        # mcpxctl starts without pydantic.
        from mcpx.config.model import HEADER_NAME, is_reserved_header

        if not HEADER_NAME.match(name) or is_reserved_header(name):
            upstream.notes.append(f"header {name!r} left out (mcpx sets it itself or it is not a valid name)")
            return
        rewritten = self.references(value, upstream, env, plain_is_env=plain_is_env)
        if rewritten is None:
            upstream.notes.append(f"header {name!r} left out: it uses a placeholder mcpx cannot fill")
            return
        stem = _variable_stem(upstream.name)
        literal = _PLAIN_REFERENCE.sub("", rewritten)
        if name.lower() == "authorization" and upstream.auth is not None:
            upstream.notes.append("its Authorization header is left out: the token comes from `auth`")
            return
        if name.lower() == "authorization":
            bearer = _BEARER.match(rewritten)
            token = bearer.group(1) if bearer else None
            if token is not None and _PLAIN_REFERENCE.fullmatch(token):
                upstream.auth = {"type": "bearer_env", "env": token[2:-1]}
            elif token is not None and "${" not in token:
                upstream.auth = {
                    "type": "bearer_env",
                    "env": self.need(f"{stem}_TOKEN", self._was(upstream, "bearer token")),
                }
            elif literal.strip():
                variable = self.need(f"{stem}_AUTHORIZATION", self._was(upstream, "Authorization header value"))
                upstream.auth = {"type": "static_header", "header": "Authorization", "value": "${" + variable + "}"}
            else:
                upstream.auth = {"type": "static_header", "header": "Authorization", "value": rewritten}
            return
        if literal.strip() and _looks_secret(name, literal):
            variable = self.need(f"{stem}_{_variable_stem(name)}", self._was(upstream, f"{name} header value"))
            rewritten = "${" + variable + "}"
        upstream.headers[name] = rewritten

    def environment(
        self, upstream: Upstream, name: str, value: str, env: dict[str, Any], *, plain_is_env: bool
    ) -> None:
        """One `env` entry of a local server: references become `${VAR}`, a secret-looking literal a variable."""
        rewritten = self.references(value, upstream, env, plain_is_env=plain_is_env)
        if rewritten is None:
            upstream.notes.append(f"env {name} left out: it uses a placeholder mcpx cannot fill")
            return
        literal = _PLAIN_REFERENCE.sub("", rewritten)
        if literal.strip() and _looks_secret(name, literal):
            stem, own = _variable_stem(upstream.name), _variable_stem(name)
            variable = own if own.startswith(f"{stem}_") else f"{stem}_{own}"
            rewritten = "${" + self.need(variable, self._was(upstream, f"{name} environment value")) + "}"
        upstream.env[name] = rewritten

    @staticmethod
    def _was(upstream: Upstream, what: str) -> str:
        return f"the {what} of '{upstream.name}' (written out in {upstream.source.label}: copy it from there)"


def _mcp_remote(command: str, args: list[str]) -> tuple[str, list[tuple[str, str]], dict[str, str]] | None:
    """(url, headers, other flags) when `command args` runs mcp-remote, else None."""
    if Path(command).name not in _NODE_RUNNERS:
        return None
    if Path(command).name == "mcp-remote":
        rest = args
    else:
        package = next((i for i, arg in enumerate(args) if arg == "mcp-remote" or arg.startswith("mcp-remote@")), None)
        if package is None:
            return None
        rest = args[package + 1 :]
    url, headers, flags = None, [], {}
    index = 0
    while index < len(rest):
        arg = rest[index]
        if arg in _MCP_REMOTE_VALUE_FLAGS and index + 1 < len(rest):
            value = rest[index + 1]
            if arg == "--header":
                name, _, header_value = value.partition(":")
                headers.append((name.strip(), header_value.strip()))
            else:
                flags[arg] = value
            index += 2
            continue
        if not arg.startswith("-") and url is None:
            url = arg
        index += 1
    return (url, headers, flags) if url else None


def command_key(command: str, args: list[str] | tuple[str, ...]) -> str:
    """How a local server is recognized as already configured: its command line."""
    return "command:" + json.dumps([command, *args])


def _unusable_arguments(command: str, args: list[str]) -> str | None:
    """Why a local server's command line cannot be imported as it is (None: it can)."""
    if _ANY_PLACEHOLDER.search(command) or any(_ANY_PLACEHOLDER.search(arg) for arg in args):
        return (
            "its command line uses a placeholder (${...}), which mcpx expands only in env: "
            "pass the value through env, or add it by hand"
        )
    for index, arg in enumerate(args):
        flag, equals, value = arg.partition("=")
        flagged = flag.startswith("-") and _SECRET_NAME.search(flag)
        follows = index > 0 and args[index - 1].startswith("-") and _SECRET_NAME.search(args[index - 1])
        if (flagged and equals and value) or (follows and not arg.startswith("-")) or _TOKEN_ARGUMENT.fullmatch(arg):
            return "one of its arguments looks like a secret: pass it through env instead, then import again"
    return None


def _local(
    converter: _Converter, source: Source, original: str, entry: dict[str, Any], taken: set[str]
) -> Upstream | Skipped:
    """A stdio server entry as a `command` upstream (or why it is not imported)."""
    command = str(entry["command"])
    args = [str(arg) for arg in entry.get("args", []) if isinstance(arg, str | int | float)]
    why = _unusable_arguments(command, args)
    if why is not None:
        return Skipped(original, source, f"a stdio server ({Path(command).name}): {why}")
    upstream = Upstream(_unique(original, taken), original, source, command=command, args=args)
    env = entry.get("env") if isinstance(entry.get("env"), dict) else {}
    assert isinstance(env, dict)
    plain_is_env = source.client in ("claude-code", "claude-desktop", "codex")
    for name, value in env.items():
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            converter.environment(upstream, str(name), str(value), env, plain_is_env=plain_is_env)
    cwd = entry.get("cwd")
    if isinstance(cwd, str) and cwd:
        if _ANY_PLACEHOLDER.search(cwd) or not (cwd.startswith(("/", "~"))):
            upstream.notes.append(f"cwd {cwd!r} left out: mcpx needs an absolute path (it runs it from your home)")
        else:
            upstream.cwd = cwd
    return upstream


def _unique(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")[:60] or "upstream"
    candidate, number = base, 2
    while candidate.lower() in taken:
        candidate = f"{base}-{number}"
        number += 1
    taken.add(candidate.lower())
    return candidate


def convert(
    entries: list[tuple[Source, str, dict[str, Any]]], existing: dict[str, str], sources: list[Source]
) -> Result:
    """Turn agent entries into upstreams. `existing` is the current config's url → name."""
    result = Result(sources=sources)
    converter = _Converter(result)
    taken = {name.lower() for name in existing.values()}
    seen_urls = dict(existing)
    for source, original, entry in entries:
        if entry.get("disabled") is True or entry.get("enabled") is False:
            result.skipped.append(Skipped(original, source, "disabled there"))
            continue
        command = entry.get("command")
        args = [str(arg) for arg in entry.get("args", []) if isinstance(arg, str | int | float)]
        env = entry.get("env") if isinstance(entry.get("env"), dict) else {}
        assert isinstance(env, dict)
        headers: list[tuple[str, str]] = []
        flags: dict[str, str] = {}
        url = entry.get("url") or entry.get("serverUrl")
        via_mcp_remote = False
        if isinstance(command, str) and Path(command).name == "mcpx-shim":
            result.has_mcpx.add(source)
            continue
        if url is None and isinstance(command, str):
            remote = _mcp_remote(command, args)
            if remote is None:
                key = command_key(command, args)
                if key in seen_urls:
                    result.skipped.append(Skipped(original, source, f"already in mcpx's config as '{seen_urls[key]}'"))
                    continue
                local = _local(converter, source, original, entry, taken)
                if isinstance(local, Skipped):
                    result.skipped.append(local)
                else:
                    seen_urls[key] = local.name
                    result.upstreams.append(local)
                continue
            url, headers, flags = remote
            via_mcp_remote = True
        if not isinstance(url, str):
            result.skipped.append(Skipped(original, source, "neither a url nor a command"))
            continue
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            result.skipped.append(Skipped(original, source, f"{url!r} is not an http(s) URL"))
            continue
        kind = str(entry.get("type") or entry.get("transport") or "").lower()
        if url in seen_urls:
            result.skipped.append(Skipped(original, source, f"already in mcpx's config as '{seen_urls[url]}'"))
            continue
        upstream = Upstream(_unique(original, taken), original, source, url)
        if kind == "sse" or flags.get("--transport") == "sse-only":
            upstream.transport = "sse"  # the legacy HTTP+SSE transport, as the agent's config says
        seen_urls[url] = upstream.name
        if isinstance(entry.get("headers"), dict):
            headers += [(str(k), str(v)) for k, v in entry["headers"].items()]
        if isinstance(entry.get("http_headers"), dict):  # Codex
            headers += [(str(k), str(v)) for k, v in entry["http_headers"].items()]
        if isinstance(entry.get("env_http_headers"), dict):  # Codex: header → variable holding its value
            headers += [(str(k), "${" + str(v) + "}") for k, v in entry["env_http_headers"].items()]
        bearer_variable = entry.get("bearer_token_env_var")  # Codex
        if isinstance(bearer_variable, str) and bearer_variable:
            upstream.auth = {
                "type": "bearer_env",
                "env": converter.need(bearer_variable, f"the bearer token of '{upstream.name}'"),
            }
        plain_is_env = via_mcp_remote or source.client in ("claude-code", "claude-desktop", "codex")
        for name, value in headers:
            converter.header(upstream, name, value, env, plain_is_env=plain_is_env)
        if "--ignore-tool" in flags:
            upstream.exclude_tools.append(flags["--ignore-tool"])
        if upstream.auth is None and via_mcp_remote:
            upstream.notes.append(
                f'mcp-remote may have logged in for it: if it asks for a login, set auth = {{ type = "oauth" }} '
                f"and run `mcpxctl login {upstream.name}`"
            )
        if upstream.transport is None and parts.path.rstrip("/").endswith("/sse"):
            upstream.notes.append(
                "the URL ends in /sse: mcpx tries streamable HTTP first and falls back to the legacy SSE transport"
            )
        result.upstreams.append(upstream)
    return result


# --- output ------------------------------------------------------------------------------------------------------


def toml_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    escaped = re.sub(r"[\x00-\x1f\x7f]", lambda match: f"\\u{ord(match.group()):04x}", escaped)
    return f'"{escaped}"'


def _inline(table: dict[str, str]) -> str:
    return (
        "{ "
        + ", ".join(
            f"{toml_string(key) if not re.fullmatch(r'[A-Za-z0-9_-]+', key) else key} = {toml_string(value)}"
            for key, value in table.items()
        )
        + " }"
    )


def render_toml(result: Result) -> str:
    blocks = []
    for upstream in result.upstreams:
        lines = [f"# imported from {upstream.source.label}, where it was {upstream.original!r}"]
        lines += [f"# note: {note}" for note in upstream.notes]
        lines += ["[[proxy.upstream]]", f"name = {toml_string(upstream.name)}"]
        if upstream.url is not None:
            lines.append(f"url = {toml_string(upstream.url)}")
        if upstream.transport is not None:
            lines.append(f"transport = {toml_string(upstream.transport)}")
        if upstream.command is not None:
            lines.append(f"command = {toml_string(upstream.command)}")
        if upstream.args:
            lines.append("args = [" + ", ".join(map(toml_string, upstream.args)) + "]")
        if upstream.env:
            lines.append(f"env = {_inline(upstream.env)}")
        if upstream.cwd is not None:
            lines.append(f"cwd = {toml_string(upstream.cwd)}")
        if upstream.auth is not None:
            lines.append(f"auth = {_inline(upstream.auth)}")
        if upstream.headers:
            lines.append(f"headers = {_inline(upstream.headers)}")
        if upstream.exclude_tools:
            lines.append("exclude_tools = [" + ", ".join(map(toml_string, upstream.exclude_tools)) + "]")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def shim_command() -> str:
    on_path = shutil.which("mcpx-shim")
    beside = Path(sys.executable).parent / "mcpx-shim"
    return "mcpx-shim" if on_path or not beside.exists() else str(beside)


def replacement(source: Source, names: list[str], shim: str, *, has_mcpx: bool) -> list[str]:
    """How to point one agent config at mcpx instead of the imported servers."""
    listed = ", ".join(json.dumps(name) for name in names)
    if source.client == "codex":
        tables = ", ".join(f"[mcp_servers.{name}]" for name in names)
        if has_mcpx:
            return [f"{source.label}: remove {tables} ([mcp_servers.mcpx] is there already)"]
        return [
            f"{source.label}: replace {tables} with:",
            "    [mcp_servers.mcpx]",
            f"    command = {toml_string(shim)}",
        ]
    if source.client == "claude-code":
        scope = "local" if source.project else "user"
        where = f"in {source.project}: " if source.project else ""
        removes = "; ".join(f"claude mcp remove {name} -s {scope}" for name in names)
        lines = [f"{source.label}: {where}{removes}"]
        return lines if has_mcpx else [*lines, f"    then, once: claude mcp add --scope user mcpx -- {shim}"]
    entry = {"command": shim} if source.client != "vscode" else {"type": "stdio", "command": shim}
    key = {"mcp.servers": '"servers" of "mcp"', "servers": '"servers"'}.get(source.key, '"mcpServers"')
    if has_mcpx:
        return [f'{source.label}: in {key}, remove {listed} ("mcpx" is there already)']
    return [f"{source.label}: in {key}, replace {listed} with:", f'    "mcpx": {json.dumps(entry)}']


def report(result: Result, config_path: Path, *, written: bool) -> list[str]:
    """Everything but the TOML, as TOML comment lines (so the whole output can be appended to a config)."""
    lines: list[str] = []
    if result.variables:
        lines += ["", "Environment variables mcpxd needs (their values are never written to its config):"]
        width = max(map(len, result.variables))
        lines += [f"  {name.ljust(width)}  {why}" for name, why in sorted(result.variables.items())]
        lines.append(
            f"  (as a systemd user service, mcpxd reads them from {paths.env_file(config_path)}: NAME=value lines)"
        )
    if result.skipped:
        lines += ["", "Not imported:"]
        lines += [f"  '{skip.original}' in {skip.source.label}: {skip.reason}" for skip in result.skipped]
    if result.upstreams:
        lines += ["", "Then point each agent at mcpx instead of these servers:"]
        by_source: dict[Source, list[str]] = {}
        for upstream in result.upstreams:
            by_source.setdefault(upstream.source, []).append(upstream.original)
        shim = shim_command()
        for source, names in by_source.items():
            has_mcpx = source in result.has_mcpx
            lines += ["  " + line for line in replacement(source, names, shim, has_mcpx=has_mcpx)]
        if not written:
            lines += ["", f"Run again with --write to append this to {config_path}, then: mcpxctl reload"]
    return ["# " + line if line else "#" for line in lines]


def existing_upstreams(config_path: Path) -> dict[str, str]:
    """url (or `command_key`) → name of the upstreams already configured (empty when the file is missing or
    unreadable)."""
    try:
        document = tomllib.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return {}
    proxy = document.get("proxy")
    upstreams = proxy.get("upstream") if isinstance(proxy, dict) else None
    if not isinstance(upstreams, list):
        return {}
    existing: dict[str, str] = {}
    for item in upstreams:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            continue
        command, args = item.get("command"), item.get("args", [])
        if isinstance(command, str) and isinstance(args, list):
            existing[command_key(command, [str(arg) for arg in args])] = item["name"]
        else:
            existing[str(item.get("url"))] = item["name"]
    return existing


def combined(config_path: Path, addition: str) -> tuple[str, str]:
    """(current text, text with `addition` appended)."""
    try:
        current = config_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        current = ""
    separator = "" if not current or current.endswith("\n\n") else ("\n" if current.endswith("\n") else "\n\n")
    return current, current + separator + addition


def validate(config_path: Path, text: str) -> list[str]:
    """Problems the config loader finds in `text` as the content of `config_path` (none: valid)."""
    from mcpx.config import parse_config
    from mcpx.errors import ConfigError

    try:
        parse_config(text, config_path)
    except ConfigError as exc:
        return exc.problems
    return []


def write(config_path: Path, text: str) -> None:
    """Replace the config with `text` atomically, keeping its mode (0600 for a new file)."""
    config_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        mode = config_path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o600
    atomic_write(config_path, text, mode)


def run(choice: str | None, config_path: Path, *, write_it: bool) -> int:
    try:
        entries, sources = read_sources(choice)
    except ImportFailed as exc:
        print(f"mcpxctl: {exc}", file=sys.stderr)
        return 1
    if not sources:
        where = choice or "any of: " + ", ".join(CLIENTS)
        print(f"# found no MCP configuration of {where} in the usual places (give a file with --from FILE)")
        return 0 if choice is None else 1
    result = convert(entries, existing_upstreams(config_path), sources)
    addition = render_toml(result)
    if not result.upstreams:
        print("# nothing to import: no MCP servers that mcpx does not already have")
        print("\n".join(report(result, config_path, written=False)))
        return 0
    header = f"# --- imported by mcpxctl import from {', '.join(dict.fromkeys(s.label for s in sources))} ---\n"
    current, proposed = combined(config_path, header + addition)
    problems = validate(config_path, proposed)
    print(header + addition, end="")
    if problems:
        print("#", file=sys.stderr)
        what = "the config would be invalid" if current.strip() else "the result is invalid"
        print(f"mcpxctl: {what}; {config_path} is unchanged:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        print("\n".join(report(result, config_path, written=False)))
        return 1
    if write_it:
        write(config_path, proposed)
    print("\n".join(report(result, config_path, written=write_it)))
    if write_it:
        count = len(result.upstreams)
        print(f"# wrote {count} upstream{'s' if count != 1 else ''} to {config_path}; apply with: mcpxctl reload")
    return 0
