"""load_config: the documented example loads as written; every kind of mistake is a ConfigError naming where."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mcpx.config import BearerEnvAuth, BearerFileAuth, Config, NoAuth, StaticHeaderAuth, load_config
from mcpx.config.model import AUTH_TYPES, OAuthAuth
from mcpx.errors import ConfigError
from mcpx.paths import MAX_CONFIG_BYTES
from tests.support.configs import config_problems, write_config_file

SEED_EXAMPLE = """\
[[proxy.upstream]]
name    = "jira"
url     = "https://example.com/jira/mcp/"
auth    = { type = "bearer_env", env = "ECI_TOKEN" }
headers = { "X-Tenant" = "acme" }          # optional, sent on every request
include_tools = ["get*", "search*"]        # optional globs, case-insensitive
exclude_tools = ["*delete*"]               # optional; a tool must match include (if given) and no exclude
timeout = 60                               # optional, seconds per call
"""

JIRA = '[[proxy.upstream]]\nname = "jira"\nurl = "https://example.com/jira/mcp/"\n'


def _only_problem(tmp_path: Path, text: str) -> str:
    path = write_config_file(tmp_path, text)
    problems = config_problems(path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}: "), problems
    return problems[0]


def test_the_seed_example_loads_as_written(tmp_path: Path) -> None:
    path = write_config_file(tmp_path, SEED_EXAMPLE)
    config = load_config(path)
    assert config.source == path
    (jira,) = config.upstreams
    assert jira.name == "jira"
    assert jira.url == "https://example.com/jira/mcp/"
    assert jira.auth == BearerEnvAuth(type="bearer_env", env="ECI_TOKEN")
    assert jira.headers == {"X-Tenant": "acme"}
    assert jira.include_tools == ("get*", "search*")
    assert jira.exclude_tools == ("*delete*",)
    assert jira.timeout == 60.0
    assert jira.namespace is True
    assert jira.origin == "https://example.com"


def test_optional_upstream_fields_have_their_defaults(tmp_path: Path) -> None:
    (jira,) = load_config(write_config_file(tmp_path, JIRA)).upstreams
    assert jira.auth == NoAuth()
    assert jira.headers == {}
    assert jira.include_tools is None
    assert jira.exclude_tools == ()
    assert jira.timeout == 60.0
    assert jira.namespace is True


def test_an_empty_file_is_an_empty_config(tmp_path: Path) -> None:
    path = write_config_file(tmp_path, "")
    config = load_config(path)
    assert config.upstreams == ()
    assert config.daemon == Config().daemon
    assert config.source == path


def test_every_auth_type_and_the_daemon_table_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    text = f"""
[daemon]
socket = "{tmp_path}/s.sock"
state_dir = "{tmp_path}/state"
log_level = "debug"
max_message_bytes = 2048

[[proxy.upstream]]
name = "a.b-c_1"
url = "http://127.0.0.1:8080/mcp"
namespace = false

[[proxy.upstream]]
name = "file"
url = "https://example.com/mcp"
auth = {{ type = "bearer_file", path = "~/token" }}

[[proxy.upstream]]
name = "static"
url = "https://example.com/mcp"
auth = {{ type = "static_header", header = "X-Api-Key", value = "${{KEY}}" }}
timeout = 0.5
"""
    config = load_config(write_config_file(tmp_path, text))
    assert config.daemon.socket == tmp_path / "s.sock"
    assert config.daemon.state_dir == tmp_path / "state"
    assert config.daemon.log_level == "debug"
    assert config.daemon.max_message_bytes == 2048
    plain, from_file, static = config.upstreams
    assert plain.auth == NoAuth()
    assert plain.namespace is False
    assert from_file.auth == BearerFileAuth(type="bearer_file", path=tmp_path / "token")
    assert static.auth == StaticHeaderAuth(type="static_header", header="X-Api-Key", value="${KEY}")
    assert static.timeout == 0.5


def test_a_missing_file_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    assert config_problems(path) == [f"{path}: no such file"]


def test_a_missing_file_with_missing_ok_is_the_empty_config(tmp_path: Path) -> None:
    config = load_config(tmp_path / "absent.toml", missing_ok=True)
    assert config == Config()
    assert config.source is None
    assert config.upstreams == ()


def test_missing_ok_does_not_hide_an_invalid_file(tmp_path: Path) -> None:
    path = write_config_file(tmp_path, "bogus = 1\n")
    with pytest.raises(ConfigError):
        load_config(path, missing_ok=True)


def test_an_unreadable_path_is_an_error_naming_it_even_with_missing_ok(tmp_path: Path) -> None:
    directory = tmp_path / "config.toml"
    directory.mkdir()
    for missing_ok in (False, True):
        with pytest.raises(ConfigError) as raised:
            load_config(directory, missing_ok=missing_ok)
        (problem,) = raised.value.problems
        assert problem.startswith(f"{directory}: cannot read"), problem


def test_a_fifo_or_an_oversized_file_is_an_error_naming_it_and_nothing_waits_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "config.toml"
    os.mkfifo(fifo)
    (tmp_path / "big").mkdir()
    big = write_config_file(tmp_path / "big", "# " + "x" * MAX_CONFIG_BYTES + "\n")
    assert config_problems(fifo) == [f"{fifo}: cannot read: not a regular file"]
    assert config_problems(big) == [f"{big}: cannot read: larger than {MAX_CONFIG_BYTES} bytes"]


def test_invalid_toml_is_an_error_naming_the_file(tmp_path: Path) -> None:
    problem = _only_problem(tmp_path, JIRA + "timeout = \n")
    assert "invalid TOML" in problem


def test_a_non_utf8_file_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(JIRA.encode() + b'headers = { "X" = "\xff\xfe" }\n')
    assert config_problems(path) == [f"{path}: not UTF-8 text"]


def test_an_unknown_top_level_key_is_named(tmp_path: Path) -> None:
    path = write_config_file(tmp_path, "bogus = 1\n" + JIRA)
    assert config_problems(path) == [f"{path}: bogus: unknown key"]


def test_an_unknown_key_in_the_daemon_table_is_named(tmp_path: Path) -> None:
    path = write_config_file(tmp_path, "[daemon]\nsokcet = '/tmp/x'\n")
    assert config_problems(path) == [f"{path}: daemon.sokcet: unknown key"]


def test_an_unknown_key_in_an_upstream_names_the_upstream_and_key(tmp_path: Path) -> None:
    path = write_config_file(tmp_path, JIRA + 'colour = "red"\n')
    assert config_problems(path) == [f"{path}: upstream 'jira': colour: unknown key"]


def test_an_unknown_key_in_auth_names_the_upstream_and_auth_field(tmp_path: Path) -> None:
    path = write_config_file(tmp_path, JIRA + 'auth = { type = "bearer_env", env = "T", file = "x" }\n')
    assert config_problems(path) == [f"{path}: upstream 'jira': auth.file: unknown key"]


def test_a_missing_name_names_the_upstream_by_position(tmp_path: Path) -> None:
    path = write_config_file(tmp_path, JIRA + '[[proxy.upstream]]\nurl = "https://example.com/mcp"\n')
    assert config_problems(path) == [f"{path}: upstream #2: name: required field is missing"]


def test_an_upstream_without_url_or_command_names_the_upstream_and_both_fields(tmp_path: Path) -> None:
    path = write_config_file(tmp_path, '[[proxy.upstream]]\nname = "jira"\n')
    expected = "give exactly one of `url` (a remote server) or `command` (a local stdio server)"
    assert config_problems(path) == [f"{path}: upstream 'jira': {expected}"]


def test_a_missing_auth_env_names_the_upstream_and_field(tmp_path: Path) -> None:
    path = write_config_file(tmp_path, JIRA + 'auth = { type = "bearer_env" }\n')
    assert config_problems(path) == [f"{path}: upstream 'jira': auth.env: required field is missing"]


def test_a_missing_bearer_file_path_names_the_upstream_and_field(tmp_path: Path) -> None:
    path = write_config_file(tmp_path, JIRA + 'auth = { type = "bearer_file" }\n')
    assert config_problems(path) == [f"{path}: upstream 'jira': auth.path: required field is missing"]


def test_an_empty_auth_env_is_rejected(tmp_path: Path) -> None:
    problem = _only_problem(tmp_path, JIRA + 'auth = { type = "bearer_env", env = "" }\n')
    assert "upstream 'jira': auth.env:" in problem


def test_a_duplicate_upstream_name_is_named(tmp_path: Path) -> None:
    path = write_config_file(tmp_path, JIRA + JIRA)
    assert config_problems(path) == [f"{path}: upstream 'jira': name: used by more than one upstream"]


def test_a_duplicate_upstream_name_is_named_with_the_other_problems_each_said_once(tmp_path: Path) -> None:
    path = write_config_file(tmp_path, JIRA + "timeout = 0\n" + JIRA + "timeout = 0\n")
    timeout, duplicate = config_problems(path)
    assert timeout.startswith(f"{path}: upstream 'jira': timeout: ")
    assert duplicate == f"{path}: upstream 'jira': name: used by more than one upstream"


@pytest.mark.parametrize("name", ["ji ra", "jira/x", "jira:1", "", "x" * 65, "é"])
def test_an_upstream_name_with_invalid_characters_is_rejected(tmp_path: Path, name: str) -> None:
    problem = _only_problem(tmp_path, f'[[proxy.upstream]]\nname = "{name}"\nurl = "https://example.com/mcp"\n')
    assert f"upstream {name!r}: name:" in problem


def test_an_unknown_auth_type_names_the_upstream_and_auth(tmp_path: Path) -> None:
    problem = _only_problem(tmp_path, JIRA + 'auth = { type = "oauth9" }\n')
    assert "upstream 'jira': auth:" in problem
    assert "oauth9" in problem


@pytest.mark.parametrize(
    "url",
    ["ftp://example.com/mcp", "example.com/mcp", "file:///etc/passwd", "https://", "unix:///run/mcp.sock", ""],
)
def test_a_url_that_is_not_http_with_a_host_is_rejected(tmp_path: Path, url: str) -> None:
    problem = _only_problem(tmp_path, f'[[proxy.upstream]]\nname = "jira"\nurl = "{url}"\n')
    assert "upstream 'jira': url: must be an http:// or https:// URL" in problem


@pytest.mark.parametrize("url", ["https://user:secret@example.com/mcp", "http://user@example.com/mcp"])
def test_a_url_carrying_credentials_is_rejected(tmp_path: Path, url: str) -> None:
    problem = _only_problem(tmp_path, f'[[proxy.upstream]]\nname = "jira"\nurl = "{url}"\n')
    assert "upstream 'jira': url: must not carry credentials" in problem


@pytest.mark.parametrize(
    "header",
    ["Accept", "content-type", "Content-Length", "Host", "Mcp-Session-Id", "MCP-Protocol-Version", "Last-Event-ID"],
)
def test_a_reserved_header_is_rejected(tmp_path: Path, header: str) -> None:
    problem = _only_problem(tmp_path, JIRA + f'headers = {{ "{header}" = "x" }}\n')
    assert "upstream 'jira': headers:" in problem
    assert header in problem


def test_a_reserved_header_as_static_header_auth_is_rejected(tmp_path: Path) -> None:
    problem = _only_problem(tmp_path, JIRA + 'auth = { type = "static_header", header = "Host", value = "x" }\n')
    assert "upstream 'jira': auth.header:" in problem


def test_an_invalid_header_name_is_rejected(tmp_path: Path) -> None:
    problem = _only_problem(tmp_path, JIRA + 'headers = { "X Tenant" = "acme" }\n')
    assert "upstream 'jira': headers:" in problem


@pytest.mark.parametrize(
    "auth",
    [
        '{ type = "bearer_env", env = "T" }',
        '{ type = "bearer_file", path = "/run/token" }',
        '{ type = "oauth" }',
        '{ type = "oauth_client_credentials", client_id = "c", client_secret = "s" }',
    ],
)
@pytest.mark.parametrize("header", ["Authorization", "authorization", "AUTHORIZATION"])
def test_an_authorization_header_together_with_bearer_auth_is_rejected(tmp_path: Path, auth: str, header: str) -> None:
    problem = _only_problem(tmp_path, JIRA + f'auth = {auth}\nheaders = {{ "{header}" = "Bearer x" }}\n')
    assert "upstream 'jira'" in problem
    assert "headers" in problem
    assert "authorization" in problem


def test_a_header_repeating_the_static_header_auth_header_is_rejected(tmp_path: Path) -> None:
    text = (
        JIRA + 'auth = { type = "static_header", header = "X-Api-Key", value = "v" }\nheaders = { "x-api-key" = "w" }\n'
    )
    problem = _only_problem(tmp_path, text)
    assert "upstream 'jira'" in problem
    assert "x-api-key" in problem


def test_an_authorization_header_without_bearer_auth_is_allowed(tmp_path: Path) -> None:
    (jira,) = load_config(
        write_config_file(tmp_path, JIRA + 'headers = { "Authorization" = "Basic eA==" }\n')
    ).upstreams
    assert jira.headers == {"Authorization": "Basic eA=="}


@pytest.mark.parametrize("timeout", ["0", "-1", "-0.5", "0.0"])
def test_a_timeout_not_above_zero_is_rejected(tmp_path: Path, timeout: str) -> None:
    problem = _only_problem(tmp_path, JIRA + f"timeout = {timeout}\n")
    assert "upstream 'jira': timeout:" in problem


def test_every_problem_in_a_file_is_reported_at_once(tmp_path: Path) -> None:
    text = (
        "bogus = true\n"
        + JIRA
        + "timeout = 0\ncolour = 1\n"
        + '[[proxy.upstream]]\nname = "wiki"\nurl = "ftp://wiki.example.com/"\n'
        + '[[proxy.upstream]]\nurl = "https://example.com/"\n'
    )
    path = write_config_file(tmp_path, text)
    problems = config_problems(path)
    assert all(problem.startswith(f"{path}: ") for problem in problems)
    assert len(problems) == 5
    joined = "\n".join(problems)
    assert f"{path}: bogus: unknown key" in problems
    assert "upstream 'jira': timeout:" in joined
    assert f"{path}: upstream 'jira': colour: unknown key" in problems
    assert "upstream 'wiki': url:" in joined
    assert f"{path}: upstream #3: name: required field is missing" in problems


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://example.com/client.json", "must be https (or http to a loopback address)"),
        ("http://example.com/client.json", "must be https (or http to a loopback address)"),
        ("https:///client.json", "has no host"),
        ("https://example.com/my client.json", "is not a plain ASCII URL"),
        ("https://example.com/client\\u0007.json", "is not a plain ASCII URL"),
        ("https://example.com/\\u202enosj.json", "is not a plain ASCII URL"),
        ("https://user@example.com/client.json", "must not carry credentials or a fragment"),
        ("https://example.com/client.json#x", "must not carry credentials or a fragment"),
        ("https://example.com/", "must have a path"),
        ("https://example.com", "must have a path"),
    ],
)
def test_a_client_metadata_url_is_checked_like_every_oauth_url(tmp_path: Path, url: str, why: str) -> None:
    problem = _only_problem(tmp_path, JIRA + f'auth = {{ type = "oauth", client_metadata_url = "{url}" }}\n')
    assert "upstream 'jira': auth" in problem and "client_metadata_url" in problem
    assert why in problem


@pytest.mark.parametrize(
    "url",
    ["https://example.com/client.json", "http://127.0.0.2:8080/client.json", "http://[::1]/c", "http://localhost/c"],
)
def test_a_client_metadata_url_may_be_https_or_loopback_http(tmp_path: Path, url: str) -> None:
    (jira,) = load_config(
        write_config_file(tmp_path, JIRA + f'auth = {{ type = "oauth", client_metadata_url = "{url}" }}\n')
    ).upstreams
    assert isinstance(jira.auth, OAuthAuth) and jira.auth.client_metadata_url == url


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        ('{ type = "oauth", client_metadata_url = "https://example.com/" }', "auth.client_metadata_url: "),
        ('{ type = "oauth_pkce", redirect_port = 0 }', "auth.redirect_port: "),
        ('{ type = "oauth", colour = 1 }', "auth.colour: unknown key"),
        ('{ type = "oauth_client_credentials", client_secret = "s" }', "auth: a client secret needs its `client_id`"),
        ('{ type = "oauth_client_credentials", client_id = "c", scopes = 1 }', "auth.scopes: "),
    ],
)
def test_problems_in_oauth_auth_are_named_without_the_type_tag(tmp_path: Path, auth: str, expected: str) -> None:
    problem = _only_problem(tmp_path, JIRA + f"auth = {auth}\n")
    assert f"upstream 'jira': {expected}" in problem


def test_every_auth_type_is_known_to_the_loader() -> None:
    expected = ["bearer_env", "bearer_file", "none", "oauth", "oauth_client_credentials", "oauth_pkce", "static_header"]
    assert sorted(AUTH_TYPES) == expected
