"""`mcpxctl import`: sample MCP configs of each client (Claude Desktop, Claude Code, Cursor, VS Code, Codex, a
named file) become valid mcpx upstreams, remote and local (stdio) ones; secrets become variables, never literals;
`--write` appends only a valid result and leaves the file alone otherwise."""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mcpx.cli import ctl, importer
from mcpx.config import load_config

# Literal secrets in the sample configs: none may appear in any output or written file.
SECRETS = [
    "sk-live-abcdef1234567890",
    "lin_api_0123456789abcdefXYZ",
    "cur-key-9f8e7d6c5b4a39281706",
    "ghp_literal123",
    "gh-arg-secret-value",
    "AbCdEf0123456789AbCdEf0123456789",
]


@dataclass
class Home:
    home: Path
    config: Path

    def write(self, relative: str, content: Any) -> Path:
        path = self.home / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if isinstance(content, str) else json.dumps(content, indent=2))
        return path


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Home]:
    home_dir = tmp_path / "home"
    work = tmp_path / "work"  # the current directory (VS Code's workspace .vscode/mcp.json is looked up there)
    home_dir.mkdir()
    work.mkdir()
    for name in ("MCPX_CONFIG", "XDG_CONFIG_HOME", "CODEX_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(home_dir))
    monkeypatch.chdir(work)
    yield Home(home_dir, home_dir / ".config" / "mcpx" / "config.toml")


def _import(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = ctl.main(["import", *args])
    captured = capsys.readouterr()
    for secret in SECRETS:
        assert secret not in captured.out + captured.err
    return code, captured.out, captured.err


def _upstreams(output: str) -> dict[str, dict[str, Any]]:
    """The printed output is TOML as a whole (everything else is comments)."""
    document = tomllib.loads(output)
    return {upstream["name"]: upstream for upstream in document["proxy"]["upstream"]}


def _valid(tmp_path: Path, output: str) -> None:
    path = tmp_path / "check.toml"
    path.write_text(output)
    load_config(path)


def _imported(capsys: pytest.CaptureFixture[str], tmp_path: Path, *args: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """`mcpxctl import ARGS`, which must succeed and print a valid config: (its output, its upstreams by name)."""
    code, out, err = _import(capsys, *args)
    assert code == 0, err
    _valid(tmp_path, out)
    return out, _upstreams(out)


# --- each client -------------------------------------------------------------------------------------------------


def test_claude_desktop_mcp_remote_servers_become_upstreams_and_their_secrets_variables(
    home: Home, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    home.write(
        ".config/Claude/claude_desktop_config.json",
        {
            "mcpServers": {
                "internal": {
                    "command": "npx",
                    "args": [
                        "-y",
                        "mcp-remote@0.1.29",
                        "https://internal.example.com/mcp",
                        "--header",
                        "Authorization:${AUTH_HEADER}",
                    ],
                    "env": {"AUTH_HEADER": "Bearer sk-live-abcdef1234567890"},
                },
                "tenant": {
                    "command": "npx",
                    "args": [
                        "mcp-remote",
                        "https://tenant.example.com/mcp",
                        "--header",
                        "X-Tenant: acme",
                        "--header",
                        "X-Api-Key: ${TENANT_KEY}",
                        "--ignore-tool",
                        "delete*",
                    ],
                },
                "atlassian": {"command": "npx", "args": ["-y", "mcp-remote", "https://mcp.atlassian.com/v1/sse"]},
                "old": {
                    "command": "npx",
                    "args": ["mcp-remote", "https://old.example.com/sse", "--transport", "sse-only"],
                },
                "sqlite": {"command": "uvx", "args": ["mcp-server-sqlite", "--db-path", "/tmp/x.db"]},
                "github": {
                    "command": "docker",
                    "args": ["run", "-i", "--rm", "-e", "GITHUB_PERSONAL_ACCESS_TOKEN", "ghcr.io/github/github-mcp"],
                    "env": {"GITHUB_PERSONAL_ACCESS_TOKEN": "ghp_literal123", "LOG_LEVEL": "info"},
                },
                "search": {
                    "command": "npx",
                    "args": ["-y", "search-mcp"],
                    "env": {"API_KEY": "${SEARCH_API_KEY}", "REGION": "eu"},
                    "cwd": "/srv/search",
                },
                "flagged": {"command": "gh-mcp", "args": ["--token", "gh-arg-secret-value"]},
                "shaped": {"command": "x-mcp", "args": ["AbCdEf0123456789AbCdEf0123456789"]},
                "placeholder": {"command": "node", "args": ["${HOME}/server.js"]},
            }
        },
    )

    out, upstreams = _imported(capsys, tmp_path, "--from", "claude-desktop")

    assert upstreams["internal"] == {
        "name": "internal",
        "url": "https://internal.example.com/mcp",
        "auth": {"type": "bearer_env", "env": "INTERNAL_TOKEN"},
    }
    assert upstreams["tenant"] == {
        "name": "tenant",
        "url": "https://tenant.example.com/mcp",
        "headers": {"X-Tenant": "acme", "X-Api-Key": "${TENANT_KEY}"},
        "exclude_tools": ["delete*"],
    }
    assert upstreams["atlassian"]["url"] == "https://mcp.atlassian.com/v1/sse"
    assert "# note: the URL ends in /sse: mcpx tries streamable HTTP first" in out
    assert "mcpxctl login atlassian" in out  # mcp-remote without a credential: probably an OAuth login
    assert upstreams["old"] == {"name": "old", "url": "https://old.example.com/sse", "transport": "sse"}
    # Local servers become command upstreams; secret-looking env values become variables.
    assert upstreams["sqlite"] == {
        "name": "sqlite",
        "command": "uvx",
        "args": ["mcp-server-sqlite", "--db-path", "/tmp/x.db"],
    }
    assert upstreams["github"]["command"] == "docker"
    assert upstreams["github"]["env"] == {
        "GITHUB_PERSONAL_ACCESS_TOKEN": "${GITHUB_PERSONAL_ACCESS_TOKEN}",
        "LOG_LEVEL": "info",
    }
    assert upstreams["search"]["env"] == {"API_KEY": "${SEARCH_API_KEY}", "REGION": "eu"}
    assert upstreams["search"]["cwd"] == "/srv/search"
    not_imported = _section(out, "Not imported")
    where = "in ~/.config/Claude/claude_desktop_config.json: a stdio server"
    secret_argument = "one of its arguments looks like a secret: pass it through env instead, then import again"
    assert f"'flagged' {where} (gh-mcp): {secret_argument}" in not_imported
    assert f"'shaped' {where} (x-mcp): {secret_argument}" in not_imported
    placeholder = f"'placeholder' {where} (node): its command line uses a placeholder"
    assert any(line.startswith(placeholder) for line in not_imported)
    variables = _section(out, "Environment variables mcpxd needs")
    assert any(line.startswith("INTERNAL_TOKEN ") and "bearer token of 'internal'" in line for line in variables)
    assert any(line.startswith("TENANT_KEY ") for line in variables)
    assert any(
        line.startswith("GITHUB_PERSONAL_ACCESS_TOKEN ") and "GITHUB_PERSONAL_ACCESS_TOKEN environment value" in line
        for line in variables
    )
    assert any(line.startswith("SEARCH_API_KEY ") for line in variables)
    replace = _section(out, "Then point each agent at mcpx")
    assert replace[0] == (
        '~/.config/Claude/claude_desktop_config.json: in "mcpServers", replace "internal", "tenant", "atlassian", '
        '"old", "sqlite", "github", "search" with:'
    )
    assert replace[1].startswith('"mcpx": {"command": ')


def test_claude_code_user_and_project_servers(home: Home, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    home.write(
        ".claude.json",
        {
            "numStartups": 12,
            "mcpServers": {
                "sentry": {"type": "http", "url": "https://mcp.sentry.dev/mcp"},
                "legacy": {"type": "sse", "url": "https://legacy.example.com/sse"},
                "mcpx": {"type": "stdio", "command": "mcpx-shim", "args": []},
            },
            "projects": {
                "/home/me/proj": {
                    "mcpServers": {
                        "gh": {
                            "type": "http",
                            "url": "https://api.githubcopilot.com/mcp/",
                            "headers": {"Authorization": "Bearer ${GITHUB_PAT}"},
                        },
                        "sentry": {"type": "http", "url": "https://mcp.sentry.dev/mcp"},
                    }
                }
            },
        },
    )

    out, upstreams = _imported(capsys, tmp_path, "--from", "claude-code")

    assert set(upstreams) == {"sentry", "gh", "legacy"}
    assert upstreams["gh"]["auth"] == {"type": "bearer_env", "env": "GITHUB_PAT"}
    assert upstreams["legacy"] == {"name": "legacy", "url": "https://legacy.example.com/sse", "transport": "sse"}
    assert "'sentry' in ~/.claude.json (project /home/me/proj): already in mcpx's config as 'sentry'" in out
    replace = _section(out, "Then point each agent at mcpx")
    removals = "~/.claude.json: claude mcp remove sentry -s user; claude mcp remove legacy -s user"
    assert removals in replace  # mcpx is already listed there
    assert "~/.claude.json (project /home/me/proj): in /home/me/proj: claude mcp remove gh -s local" in replace


def test_cursor_literal_keys_and_env_references(home: Home, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    home.write(
        ".cursor/mcp.json",
        {
            "mcpServers": {
                "linear": {
                    "url": "https://mcp.linear.app/mcp",
                    "headers": {"Authorization": "Bearer lin_api_0123456789abcdefXYZ"},
                },
                "search": {
                    "url": "https://search.example.com/mcp",
                    "headers": {"X-Api-Key": "cur-key-9f8e7d6c5b4a39281706", "X-Team": "${env:TEAM_ID}"},
                },
                "basic": {"url": "https://basic.example.com/mcp", "headers": {"Authorization": "Basic ghp_literal123"}},
                "off": {"url": "https://off.example.com/mcp", "disabled": True},
            }
        },
    )

    out, upstreams = _imported(capsys, tmp_path, "--from", "cursor")

    assert upstreams["linear"]["auth"] == {"type": "bearer_env", "env": "LINEAR_TOKEN"}
    assert upstreams["search"]["headers"] == {"X-Api-Key": "${SEARCH_X_API_KEY}", "X-Team": "${TEAM_ID}"}
    assert upstreams["basic"]["auth"] == {
        "type": "static_header",
        "header": "Authorization",
        "value": "${BASIC_AUTHORIZATION}",
    }
    assert "off" not in upstreams
    assert "'off' in ~/.cursor/mcp.json: disabled there" in out
    variables = _section(out, "Environment variables mcpxd needs")
    assert [line.split()[0] for line in variables[:-1]] == [
        "BASIC_AUTHORIZATION",
        "LINEAR_TOKEN",
        "SEARCH_X_API_KEY",
        "TEAM_ID",
    ]


def test_headers_mcpx_sets_itself_or_with_invalid_names_are_left_out(
    home: Home, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    headers = {"Mcp-Session-Id": "abc", "Accept": "text/plain", "Bad Header": "x", "X-Team": "blue"}
    home.write(
        ".cursor/mcp.json", {"mcpServers": {"team": {"url": "https://team.example.com/mcp", "headers": headers}}}
    )

    out, upstreams = _imported(capsys, tmp_path, "--from", "cursor")

    assert upstreams["team"]["headers"] == {"X-Team": "blue"}
    notes = [line for line in out.splitlines() if line.startswith("# note: header ")]
    assert notes == [
        f"# note: header {name!r} left out (mcpx sets it itself or it is not a valid name)"
        for name in ("Mcp-Session-Id", "Accept", "Bad Header")
    ]


def test_vscode_settings_with_comments_and_workspace_servers(
    home: Home, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    home.write(
        ".config/Code/User/settings.json",
        """{
  // editor settings
  "editor.fontSize": 13,
  "url.with.comment.chars": "http://example.com/*not a comment*/ // nor this",
  "mcp": {
    "servers": {
      /* the team's GitHub server */
      "github": {
        "type": "http",
        "url": "https://api.githubcopilot.com/mcp/",
        "headers": { "Authorization": "Bearer ${input:github_token}", },
      },
    },
  },
}
""",
    )
    Path(".vscode").mkdir()
    Path(".vscode/mcp.json").write_text(
        json.dumps(
            {
                "inputs": [{"type": "promptString", "id": "api-key", "password": True}],
                "servers": {
                    "docs": {
                        "type": "http",
                        "url": "https://docs.example.com/mcp",
                        "headers": {"X-Key": "${input:api-key}"},
                    },
                    "files": {"type": "stdio", "command": "node", "args": ["server.js"]},
                    "odd": {
                        "type": "http",
                        "url": "https://odd.example.com/mcp",
                        "headers": {"X-Dir": "${workspaceFolder}"},
                    },
                },
            }
        )
    )

    out, upstreams = _imported(capsys, tmp_path, "--from", "vscode")

    assert upstreams["github"]["auth"] == {"type": "bearer_env", "env": "GITHUB_TOKEN"}
    assert upstreams["docs"]["headers"] == {"X-Key": "${API_KEY}"}
    assert "headers" not in upstreams["odd"]
    assert "# note: header 'X-Dir' left out: it uses a placeholder mcpx cannot fill" in out
    assert upstreams["files"] == {"name": "files", "command": "node", "args": ["server.js"]}
    replace = _section(out, "Then point each agent at mcpx")
    assert replace[0] == '~/.config/Code/User/settings.json: in "servers" of "mcp", replace "github" with:'
    assert replace[1].startswith('"mcpx": {"type": "stdio", "command": ')
    # The label of the workspace file is its absolute path (it is outside HOME).
    assert replace[2] == f'{Path.cwd() / ".vscode" / "mcp.json"}: in "servers", replace "docs", "files", "odd" with:'


def test_codex_url_servers_with_token_variables_and_headers(
    home: Home, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    home.write(
        ".codex/config.toml",
        """model = "gpt-5"

[mcp_servers.figma]
url = "https://mcp.figma.com/mcp"
bearer_token_env_var = "FIGMA_TOKEN"

[mcp_servers.docs]
url = "https://docs.example.com/mcp"
http_headers = { "X-Region" = "eu" }
env_http_headers = { "X-Api-Key" = "DOCS_KEY" }

[mcp_servers.fs]
command = "npx"
args = ["-y", "@modelcontextprotocol/server-filesystem", "/home/me"]
env = { "SOME_TOKEN" = "sk-live-abcdef1234567890" }

[mcp_servers.paused]
url = "https://paused.example.com/mcp"
enabled = false
""",
    )

    out, upstreams = _imported(capsys, tmp_path, "--from", "codex")

    assert set(upstreams) == {"figma", "docs", "fs"}
    assert upstreams["figma"]["auth"] == {"type": "bearer_env", "env": "FIGMA_TOKEN"}
    assert upstreams["docs"]["headers"] == {"X-Region": "eu", "X-Api-Key": "${DOCS_KEY}"}
    assert upstreams["fs"]["env"] == {"SOME_TOKEN": "${FS_SOME_TOKEN}"}
    assert upstreams["fs"]["args"] == ["-y", "@modelcontextprotocol/server-filesystem", "/home/me"]
    assert "'paused' in ~/.codex/config.toml: disabled there" in out
    replace = _section(out, "Then point each agent at mcpx")
    assert replace == [
        "~/.codex/config.toml: replace [mcp_servers.figma], [mcp_servers.docs], [mcp_servers.fs] with:",
        "[mcp_servers.mcpx]",
        replace[2],
    ]
    assert replace[2].startswith("command = ")


def test_a_named_file_and_every_client_found_by_default(
    home: Home, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    named = tmp_path / "team-mcp.json"
    named.write_text(json.dumps({"mcpServers": {"wiki": {"url": "https://wiki.example.com/mcp"}}}))
    home.write(".cursor/mcp.json", {"mcpServers": {"a": {"url": "https://a.example.com/mcp"}}})
    home.write(".codex/config.toml", '[mcp_servers.b]\nurl = "https://b.example.com/mcp"\n')

    code, out, err = _import(capsys, "--from", str(named))
    assert code == 0, err
    assert set(_upstreams(out)) == {"wiki"}

    code, out, err = _import(capsys)
    assert code == 0, err
    assert set(_upstreams(out)) == {"a", "b"}

    code, _, err = _import(capsys, "--from", str(tmp_path / "missing.json"))
    assert code == 1
    assert err.strip() == f"mcpxctl: {tmp_path / 'missing.json'}: no such file"


# --- writing -----------------------------------------------------------------------------------------------------


def test_write_appends_a_valid_config_once_and_names_do_not_collide(
    home: Home, capsys: pytest.CaptureFixture[str]
) -> None:
    home.config.parent.mkdir(parents=True)
    home.config.write_text(
        '[daemon]\nlog_level = "debug"\n\n[[proxy.upstream]]\nname = "linear"\nurl = "https://old.example.com/mcp"\n'
    )
    home.write(
        ".cursor/mcp.json",
        {
            "mcpServers": {
                "linear": {
                    "url": "https://mcp.linear.app/mcp",
                    "headers": {"Authorization": "Bearer lin_api_0123456789abcdefXYZ"},
                }
            }
        },
    )

    code, out, err = _import(capsys, "--from", "cursor", "--write")

    assert code == 0, err
    assert f"# wrote 1 upstream to {home.config}; apply with: mcpxctl reload" in out
    text = home.config.read_text()
    assert text.startswith('[daemon]\nlog_level = "debug"\n')
    assert "lin_api_" not in text
    config = load_config(home.config)
    assert [upstream.name for upstream in config.upstreams] == ["linear", "linear-2"]
    assert config.upstreams[1].url == "https://mcp.linear.app/mcp"

    code, out, _ = _import(capsys, "--from", "cursor", "--write")
    assert code == 0
    assert "nothing to import" in out
    assert "already in mcpx's config as 'linear-2'" in out
    assert home.config.read_text() == text


def test_a_local_server_already_configured_is_not_imported_again(
    home: Home, capsys: pytest.CaptureFixture[str]
) -> None:
    home.config.parent.mkdir(parents=True)
    home.config.write_text('[[proxy.upstream]]\nname = "fs"\ncommand = "npx"\nargs = ["-y", "server-fs", "/srv"]\n')
    home.write(
        ".cursor/mcp.json",
        {
            "mcpServers": {
                "files": {"command": "npx", "args": ["-y", "server-fs", "/srv"]},
                "git": {"command": "uvx", "args": ["mcp-server-git"]},
            }
        },
    )

    code, out, err = _import(capsys, "--from", "cursor", "--write")

    assert code == 0, err
    assert "'files' in ~/.cursor/mcp.json: already in mcpx's config as 'fs'" in out
    config = load_config(home.config)
    assert [(upstream.name, upstream.command) for upstream in config.upstreams] == [("fs", "npx"), ("git", "uvx")]


def test_write_creates_a_private_config_when_there_is_none(home: Home, capsys: pytest.CaptureFixture[str]) -> None:
    home.write(".cursor/mcp.json", {"mcpServers": {"a": {"url": "https://a.example.com/mcp"}}})

    code, _, err = _import(capsys, "--from", "cursor", "--write")

    assert code == 0, err
    assert os.stat(home.config).st_mode & 0o777 == 0o600
    assert [upstream.name for upstream in load_config(home.config).upstreams] == ["a"]


def test_write_refuses_when_the_result_would_be_invalid_and_leaves_the_file_unchanged(
    home: Home, capsys: pytest.CaptureFixture[str]
) -> None:
    home.config.parent.mkdir(parents=True)
    broken = "[daemon]\nbogus = 1\n"
    home.config.write_text(broken)
    home.write(".cursor/mcp.json", {"mcpServers": {"a": {"url": "https://a.example.com/mcp"}}})

    code, _, err = _import(capsys, "--from", "cursor", "--write")

    assert code == 1
    assert f"mcpxctl: the config would be invalid; {home.config} is unchanged:" in err
    assert f"  {home.config}: daemon.bogus: unknown key" in err
    assert home.config.read_text() == broken
    assert [path.name for path in home.config.parent.iterdir()] == ["config.toml"]  # no temp file left behind


def test_nothing_found_is_not_an_error_unless_a_client_was_named(
    home: Home, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _import(capsys)[0] == 0
    code, out, _ = _import(capsys, "--from", "cursor")
    assert code == 1
    assert "found no MCP configuration of cursor" in out


# --- helpers -----------------------------------------------------------------------------------------------------


def test_jsonc_comments_and_trailing_commas_are_removed_outside_strings() -> None:
    text = '{"a": "x // y /* z */ ,}", // comment\n "b": [1, 2,], /* block */ }'
    assert json.loads(importer.strip_jsonc(text)) == {"a": "x // y /* z */ ,}", "b": [1, 2]}


def _section(output: str, title: str) -> list[str]:
    """The comment lines under `title`, without the comment marker and indentation."""
    lines = [line.removeprefix("#").strip() for line in output.splitlines()]
    start = next(index for index, line in enumerate(lines) if line.startswith(title)) + 1
    section = []
    for line in lines[start:]:
        if not line:
            break
        section.append(line)
    return section
