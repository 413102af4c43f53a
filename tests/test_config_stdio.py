"""Configuration of stdio (`command`) upstreams: the seed spelling (`[[proxy.upstream]]` with `command`), the
Claude Desktop / Claude Code / VS Code spelling (`[mcpServers.<name>]`), and the mistakes each is checked for."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcpx.config import load_config
from tests.support.configs import config_problems, write_config_file


def test_a_command_upstream_loads_with_its_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    path = write_config_file(
        tmp_path,
        """
[[proxy.upstream]]
name = "files"
command = "npx"
args = ["-y", "@modelcontextprotocol/server-filesystem", "/srv"]
env = { DEBUG = "1", API_KEY = "${FILES_KEY}" }
cwd = "~/work"
""",
    )
    (files,) = load_config(path).upstreams
    assert files.command == "npx"
    assert files.url is None
    assert files.args == ("-y", "@modelcontextprotocol/server-filesystem", "/srv")
    assert files.env == {"DEBUG": "1", "API_KEY": "${FILES_KEY}"}
    assert files.cwd == tmp_path / "work"
    assert files.shared is False  # per-agent by default
    assert files.endpoint == "npx -y @modelcontextprotocol/server-filesystem /srv"


def test_the_claude_desktop_spelling_becomes_upstreams_beside_proxy_upstream(tmp_path: Path) -> None:
    path = write_config_file(
        tmp_path,
        """
[[proxy.upstream]]
name = "jira"
url = "https://example.com/mcp"

[mcpServers.filesystem]
command = "npx"
args = ["-y", "@modelcontextprotocol/server-filesystem", "/Users/me/Desktop"]
env = { LOG = "quiet" }

[mcpServers.typed]
type = "stdio"
command = "uvx"
args = ["mcp-server-git"]
sharing = "shared"
include_tools = ["git_*"]

[mcpServers.remote]
type = "http"
url = "https://remote.example.com/mcp"
headers = { "X-Tenant" = "acme" }

[mcpServers.legacy]
type = "sse"
url = "https://legacy.example.com/sse"

[mcpServers.streamable]
type = "streamable-http"
url = "https://s.example.com/mcp"
""",
    )
    upstreams = {upstream.name: upstream for upstream in load_config(path).upstreams}
    assert list(upstreams) == ["jira", "filesystem", "typed", "remote", "legacy", "streamable"]
    filesystem = upstreams["filesystem"]
    assert filesystem.command == "npx"
    assert filesystem.args[-1] == "/Users/me/Desktop"
    assert filesystem.env == {"LOG": "quiet"}
    assert upstreams["typed"].command == "uvx"
    assert upstreams["typed"].shared is True
    assert upstreams["typed"].include_tools == ("git_*",)
    assert upstreams["remote"].url == "https://remote.example.com/mcp"
    assert upstreams["remote"].transport == "auto"
    assert upstreams["remote"].headers == {"X-Tenant": "acme"}
    assert upstreams["legacy"].transport == "sse"
    assert upstreams["streamable"].transport == "streamable-http"


def test_mistakes_in_mcp_servers_name_the_file_and_the_entry(tmp_path: Path) -> None:
    path = write_config_file(
        tmp_path,
        """
[mcpServers.both]
command = "x"
url = "https://example.com/mcp"

[mcpServers.wrongtype]
type = "stdio"
url = "https://example.com/mcp"

[mcpServers.unknowntype]
type = "websocket"
url = "wss://example.com"

[mcpServers.extra]
command = "x"
autoApprove = ["a"]

[mcpServers.badenv]
command = "x"
env = { "A=B" = "1" }
""",
    )
    problems = config_problems(path)
    assert f"{path}: mcpServers 'wrongtype': type: \"stdio\" is for servers given by `command`" in problems
    assert any(p.startswith(f"{path}: mcpServers 'unknowntype': type: must be one of") for p in problems)
    assert f"{path}: mcpServers 'extra': autoApprove: unknown key" in problems
    assert any(p.startswith(f"{path}: mcpServers 'both': give exactly one of `url`") for p in problems)
    assert any(p.startswith(f"{path}: mcpServers 'badenv': env: 'A=B' is not a valid") for p in problems)
    assert len(problems) == 5, problems


def test_an_mcp_servers_entry_that_is_not_a_table_is_named(tmp_path: Path) -> None:
    path = write_config_file(tmp_path, 'mcpServers = { files = "npx" }\n')
    assert config_problems(path) == [f"{path}: mcpServers 'files': must be a table"]


def test_a_name_used_in_both_spellings_is_reported(tmp_path: Path) -> None:
    path = write_config_file(
        tmp_path,
        '[[proxy.upstream]]\nname = "files"\ncommand = "a"\n\n[mcpServers.files]\ncommand = "b"\n',
    )
    assert config_problems(path) == [f"{path}: upstream 'files': name: used by more than one upstream"]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ('url = "https://example.com/mcp"\ncommand = "x"', "give exactly one of `url`"),
        ('command = "x"\nauth = { type = "bearer_env", env = "T" }', "`auth`: only for `url` upstreams"),
        ('command = "x"\nheaders = { "X-A" = "1" }', "`headers`: only for `url` upstreams"),
        ('command = "x"\ntransport = "sse"', "`transport`: only for `url` upstreams"),
        ('url = "https://example.com/mcp"\nargs = ["a"]', "`args`, `env` and `cwd` are for `command` upstreams"),
        ('command = "x"\ncwd = "relative/dir"', "cwd: must be an absolute path"),
        ('command = ""', "command: String should have at least 1 character"),
        ('command = "x"\nargs = ["a\\u0000b"]', "args: must not contain a NUL character"),
        ('command = "x"\nsharing = "sometimes"', "sharing: Input should be 'shared' or 'per-agent'"),
    ],
)
def test_command_upstream_mistakes_name_the_upstream(tmp_path: Path, fields: str, expected: str) -> None:
    path = write_config_file(tmp_path, f'[[proxy.upstream]]\nname = "local"\n{fields}\n')
    (problem,) = config_problems(path)
    assert problem.startswith(f"{path}: upstream 'local': "), problem
    assert expected in problem, problem
