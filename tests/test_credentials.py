"""Static credential providers: headers, re-reading after a rejection, secret-free descriptions, redaction."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from mcpx.auth.credentials import (
    MAX_TOKEN_FILE_BYTES,
    BearerFromEnv,
    BearerFromFile,
    NoCredential,
    StaticHeader,
    expand_env,
    provider_for,
)
from mcpx.config import BearerEnvAuth, BearerFileAuth, NoAuth, StaticHeaderAuth
from mcpx.config.model import UpstreamConfig
from mcpx.errors import CredentialRejected
from mcpx.redact import fingerprint, redact, scrub
from mcpx.upstream.h1 import HttpClient
from mcpx.upstream.httpbase import HttpPeer

ENV = "MCPX_TEST_CREDENTIAL_TOKEN"


def _bearer_file(path: Path) -> BearerFromFile:
    provider = provider_for("files", BearerFileAuth(type="bearer_file", path=path))
    assert isinstance(provider, BearerFromFile)
    return provider


def _replace(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".new")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def test_provider_for_picks_the_provider_of_each_auth_type(tmp_path: Path) -> None:
    assert isinstance(provider_for("u", NoAuth()), NoCredential)
    assert isinstance(provider_for("u", BearerEnvAuth(type="bearer_env", env=ENV)), BearerFromEnv)
    assert isinstance(provider_for("u", BearerFileAuth(type="bearer_file", path=tmp_path / "t")), BearerFromFile)
    static = StaticHeaderAuth(type="static_header", header="X-Key", value="v")
    assert isinstance(provider_for("u", static), StaticHeader)


def test_no_credential_sends_nothing_and_never_changes() -> None:
    provider = provider_for("u", NoAuth())
    assert provider.headers() == {}
    assert provider.reload() is False
    assert provider.describe() == "none"
    assert "auth" in provider.fix_hint()


# --- bearer_env --------------------------------------------------------------------------------------------------


def test_bearer_env_sends_the_trimmed_variable_as_a_bearer_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "  env-token-0001\n")
    provider = provider_for("jira", BearerEnvAuth(type="bearer_env", env=ENV))
    assert provider.headers() == {"Authorization": "Bearer env-token-0001"}


@pytest.mark.parametrize("value", [None, "", "   "])
def test_bearer_env_unset_or_empty_is_rejected_naming_the_variable_and_upstream(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, value)
    provider = provider_for("jira", BearerEnvAuth(type="bearer_env", env=ENV))
    with pytest.raises(CredentialRejected) as raised:
        provider.headers()
    assert raised.value.upstream == "jira"
    assert ENV in str(raised.value)
    assert provider.reload() is False
    assert provider.describe() == f"bearer_env {ENV} (unset)"
    assert ENV in provider.fix_hint()


def test_bearer_env_reload_is_true_only_when_the_token_differs_from_the_one_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENV, "env-token-first")
    provider = provider_for("jira", BearerEnvAuth(type="bearer_env", env=ENV))
    provider.headers()
    assert provider.reload() is False
    monkeypatch.setenv(ENV, "env-token-second")
    assert provider.reload() is True
    assert provider.reload() is True  # still not sent
    assert provider.headers() == {"Authorization": "Bearer env-token-second"}
    assert provider.reload() is False
    monkeypatch.delenv(ENV)
    assert provider.reload() is False


def test_bearer_env_describe_shows_a_fingerprint_never_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "env-secret-describe")
    description = provider_for("jira", BearerEnvAuth(type="bearer_env", env=ENV)).describe()
    assert "env-secret-describe" not in description
    assert description == f"bearer_env {ENV} ({fingerprint('env-secret-describe')})"


# --- bearer_file -------------------------------------------------------------------------------------------------


def test_bearer_file_sends_the_first_non_empty_line_trimmed(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("\n   \n  file-token-0001  \nsecond-line\n", encoding="utf-8")
    assert _bearer_file(path).headers() == {"Authorization": "Bearer file-token-0001"}


def test_bearer_file_accepts_crlf_and_no_trailing_newline(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_bytes(b"\r\nfile-token-crlf\r\n")
    assert _bearer_file(path).headers() == {"Authorization": "Bearer file-token-crlf"}
    path.write_bytes(b"file-token-bare")
    assert _bearer_file(path).headers() == {"Authorization": "Bearer file-token-bare"}


def test_bearer_file_rereads_the_file_when_a_new_token_is_written(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("file-token-short\n", encoding="utf-8")
    provider = _bearer_file(path)
    assert provider.headers() == {"Authorization": "Bearer file-token-short"}
    path.write_text("file-token-much-longer\n", encoding="utf-8")
    assert provider.headers() == {"Authorization": "Bearer file-token-much-longer"}


def test_bearer_file_rereads_a_same_size_token_when_the_mtime_changes(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("file-token-aaaa\n", encoding="utf-8")
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    provider = _bearer_file(path)
    assert provider.headers() == {"Authorization": "Bearer file-token-aaaa"}
    path.write_text("file-token-bbbb\n", encoding="utf-8")
    os.utime(path, ns=(2_000_000_000, 2_000_000_000))
    assert provider.headers() == {"Authorization": "Bearer file-token-bbbb"}


def test_bearer_file_rereads_a_file_atomically_replaced(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("file-token-cccc\n", encoding="utf-8")
    stamp = os.stat(path)
    provider = _bearer_file(path)
    assert provider.headers() == {"Authorization": "Bearer file-token-cccc"}
    _replace(path, "file-token-dddd\n")
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # same size and mtime: only the inode differs
    assert provider.headers() == {"Authorization": "Bearer file-token-dddd"}


def test_bearer_file_reload_is_true_only_when_the_token_differs_from_the_one_sent(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("file-token-eeee\n", encoding="utf-8")
    stamp = os.stat(path)
    provider = _bearer_file(path)
    provider.headers()
    assert provider.reload() is False
    path.write_text("\nfile-token-eeee  \n", encoding="utf-8")  # same token, different file
    assert provider.reload() is False
    path.write_text("file-token-ffff\n", encoding="utf-8")
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # reload re-reads even when the stat looks the same
    assert provider.reload() is True
    assert provider.reload() is True  # still not sent
    assert provider.headers() == {"Authorization": "Bearer file-token-ffff"}
    assert provider.reload() is False


def test_bearer_file_reload_sees_an_atomically_replaced_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("file-token-gggg\n", encoding="utf-8")
    provider = _bearer_file(path)
    provider.headers()
    _replace(path, "file-token-hhhh\n")
    assert provider.reload() is True
    assert provider.headers() == {"Authorization": "Bearer file-token-hhhh"}


def test_bearer_file_missing_is_rejected_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "absent"
    provider = _bearer_file(path)
    with pytest.raises(CredentialRejected) as raised:
        provider.headers()
    assert raised.value.upstream == "files"
    assert str(path) in str(raised.value)
    assert provider.reload() is False
    assert provider.describe() == f"bearer_file {path} (unreadable)"
    assert str(path) in provider.fix_hint()


@pytest.mark.parametrize("content", [b"", b"\n \n\t\n", b"\xff\xfe\n"], ids=["empty", "blank", "not-utf8"])
def test_bearer_file_without_a_usable_token_is_rejected_naming_the_path(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "token"
    path.write_bytes(content)
    with pytest.raises(CredentialRejected) as raised:
        _bearer_file(path).headers()
    assert str(path) in str(raised.value)


def test_bearer_file_that_becomes_unreadable_makes_reload_false(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("file-token-iiii\n", encoding="utf-8")
    provider = _bearer_file(path)
    provider.headers()
    path.unlink()
    assert provider.reload() is False
    with pytest.raises(CredentialRejected):
        provider.headers()


def test_bearer_file_describe_shows_a_fingerprint_never_the_token(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("file-secret-describe\n", encoding="utf-8")
    description = _bearer_file(path).describe()
    assert "file-secret-describe" not in description
    assert description == f"bearer_file {path} ({fingerprint('file-secret-describe')})"


async def test_bearer_file_that_is_a_fifo_is_refused_at_once_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "token"
    os.mkfifo(path)
    provider = _bearer_file(path)
    try:
        with pytest.raises(CredentialRejected) as raised:
            async with asyncio.timeout(10):
                await asyncio.to_thread(provider.headers)
    finally:
        # A reader blocked in open() (the bug) gets a writer, then end of file, so its thread can finish.
        os.close(os.open(path, os.O_RDWR | os.O_NONBLOCK))
    assert str(raised.value) == (
        f"upstream 'files': token file {path} is a FIFO: it must be a regular file (or a symlink to one)"
    )
    assert provider.reload() is False
    assert provider.describe() == f"bearer_file {path} (unreadable)"


@pytest.mark.parametrize("kind", ["a directory", "a character device"])
def test_bearer_file_that_is_not_a_regular_file_is_refused_naming_the_path(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "token"
    if kind == "a directory":
        path.mkdir()
    else:
        path.symlink_to("/dev/null")
    with pytest.raises(CredentialRejected) as raised:
        _bearer_file(path).headers()
    assert f"token file {path} is {kind}: it must be a regular file" in str(raised.value)


def test_bearer_file_larger_than_the_cap_is_refused_without_its_content(tmp_path: Path) -> None:
    path = tmp_path / "token"
    token = "file-token-at-the-cap"
    path.write_bytes(token.encode() + b"\n" * (MAX_TOKEN_FILE_BYTES - len(token)))
    provider = _bearer_file(path)
    assert provider.headers() == {"Authorization": f"Bearer {token}"}  # exactly the cap: read
    path.write_bytes(b"file-token-over-the-cap\n" + b"x" * MAX_TOKEN_FILE_BYTES)
    with pytest.raises(CredentialRejected) as raised:
        provider.headers()
    message = str(raised.value)
    assert f"token file {path} is larger than {MAX_TOKEN_FILE_BYTES} bytes" in message
    assert "file-token-over-the-cap" not in message and "xxxx" not in message
    assert provider.reload() is False


def test_bearer_file_through_a_symlink_is_read_and_reread_when_the_target_changes(tmp_path: Path) -> None:
    # As a Kubernetes secret volume does: the token file is a symlink, swapped to a new target on rotation.
    first, second = tmp_path / "first", tmp_path / "second"
    first.write_text("file-token-linked-1\n", encoding="utf-8")
    second.write_text("file-token-linked-22\n", encoding="utf-8")
    path = tmp_path / "token"
    path.symlink_to(first)
    provider = _bearer_file(path)
    assert provider.headers() == {"Authorization": "Bearer file-token-linked-1"}
    link = tmp_path / "token.new"
    link.symlink_to(second)
    os.replace(link, path)
    assert provider.headers() == {"Authorization": "Bearer file-token-linked-22"}


# --- static_header -----------------------------------------------------------------------------------------------


def test_static_header_expands_environment_references(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCPX_TEST_KEY_A", "static-part-one")
    monkeypatch.setenv("MCPX_TEST_KEY_B", "two")
    auth = StaticHeaderAuth(type="static_header", header="X-Api-Key", value="k=${MCPX_TEST_KEY_A}/${MCPX_TEST_KEY_B}")
    assert provider_for("wiki", auth).headers() == {"X-Api-Key": "k=static-part-one/two"}


def test_static_header_without_references_is_sent_as_written() -> None:
    auth = StaticHeaderAuth(type="static_header", header="X-Api-Key", value="literal $HOME ${ not-a-ref}")
    provider = provider_for("wiki", auth)
    assert provider.headers() == {"X-Api-Key": "literal $HOME ${ not-a-ref}"}
    assert provider.reload() is False
    assert "mcpxctl reload" in provider.fix_hint()


def test_static_header_with_an_unset_variable_is_rejected_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MCPX_TEST_KEY_UNSET", raising=False)
    auth = StaticHeaderAuth(type="static_header", header="X-Api-Key", value="${MCPX_TEST_KEY_UNSET}")
    provider = provider_for("wiki", auth)
    with pytest.raises(CredentialRejected) as raised:
        provider.headers()
    assert raised.value.upstream == "wiki"
    assert "MCPX_TEST_KEY_UNSET" in str(raised.value)
    assert "X-Api-Key" in str(raised.value)
    assert provider.reload() is False
    assert provider.describe() == "static_header X-Api-Key (unset)"
    assert "MCPX_TEST_KEY_UNSET" in provider.fix_hint()


def test_static_header_reload_is_true_only_when_the_value_differs_from_the_one_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MCPX_TEST_KEY_C", "static-value-1")
    provider = provider_for(
        "wiki", StaticHeaderAuth(type="static_header", header="X-Api-Key", value="${MCPX_TEST_KEY_C}")
    )
    provider.headers()
    assert provider.reload() is False
    monkeypatch.setenv("MCPX_TEST_KEY_C", "static-value-2")
    assert provider.reload() is True
    provider.headers()
    assert provider.reload() is False


def test_static_header_describe_shows_a_fingerprint_never_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCPX_TEST_KEY_D", "static-secret-describe")
    auth = StaticHeaderAuth(type="static_header", header="X-Api-Key", value="${MCPX_TEST_KEY_D}")
    description = provider_for("wiki", auth).describe()
    assert "static-secret-describe" not in description
    assert description == f"static_header X-Api-Key ({fingerprint('static-secret-describe')})"


def test_expand_env_names_the_first_unset_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCPX_TEST_SET", "x")
    monkeypatch.delenv("MCPX_TEST_NOT_SET", raising=False)
    assert expand_env("${MCPX_TEST_SET}${MCPX_TEST_SET}", upstream="u", what="it") == "xx"
    with pytest.raises(CredentialRejected, match="MCPX_TEST_NOT_SET"):
        expand_env("${MCPX_TEST_SET}-${MCPX_TEST_NOT_SET}", upstream="u", what="it")


# --- redaction ---------------------------------------------------------------------------------------------------


def test_every_secret_a_provider_reads_is_scrubbed_by_redact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "redact-env-secret")
    monkeypatch.setenv("MCPX_TEST_KEY_E", "redact-static-secret")
    path = tmp_path / "token"
    path.write_text("redact-file-secret\n", encoding="utf-8")
    providers = [
        provider_for("a", BearerEnvAuth(type="bearer_env", env=ENV)),
        provider_for("b", BearerFileAuth(type="bearer_file", path=path)),
        provider_for("c", StaticHeaderAuth(type="static_header", header="X-K", value="pre-${MCPX_TEST_KEY_E}")),
    ]
    for provider in providers:
        provider.headers()
    for secret in ("redact-env-secret", "redact-file-secret", "pre-redact-static-secret"):
        text = f"upstream said: invalid token {secret}!"
        cleaned = redact(text)
        assert secret not in cleaned
        assert fingerprint(secret) in cleaned
        assert secret.encode() not in scrub(text.encode())


def test_a_secret_is_registered_only_once_it_has_been_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "never-read-secret-xyz")
    provider_for("a", BearerEnvAuth(type="bearer_env", env=ENV))
    assert redact("never-read-secret-xyz") == "never-read-secret-xyz"


def test_fingerprints_are_stable_and_do_not_contain_the_secret() -> None:
    assert fingerprint("abcdefgh") == fingerprint("abcdefgh")
    assert fingerprint("abcdefgh") != fingerprint("abcdefgi")
    assert fingerprint("abcdefgh").startswith("sha256:")
    assert "abcdefgh" not in fingerprint("abcdefgh")


def test_a_static_header_registers_each_secret_it_is_made_of(monkeypatch: pytest.MonkeyPatch) -> None:
    """`value = "Bearer ${API_KEY}"` (what `mcpxctl import` writes): an upstream may echo the key alone."""
    key = "sk-canary-static-header-0123456789"
    monkeypatch.setenv("MCPX_TEST_API_KEY", key)
    provider = StaticHeader("up", "Authorization", "Bearer ${MCPX_TEST_API_KEY}")
    assert provider.headers() == {"Authorization": f"Bearer {key}"}
    assert key not in redact(f"the key {key} is over its quota")
    assert key.encode() not in scrub(b'{"text":"the key ' + key.encode() + b' was refused"}')


def test_configured_headers_kept_in_variables_are_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    key = "canary-header-value-abcdef0123456789"
    monkeypatch.setenv("MCPX_TEST_SERVICE_KEY", key)
    config = UpstreamConfig(
        name="up",
        url="https://mcp.example.com/mcp",
        headers={"X-Api-Key": "${MCPX_TEST_SERVICE_KEY}", "X-Team": "blue"},
    )
    peer = HttpPeer(config, HttpClient(connect_timeout=1.0), NoCredential())
    assert peer.headers() == {"X-Api-Key": key, "X-Team": "blue"}
    assert key.encode() not in scrub(b'{"text":"your key ' + key.encode() + b' was rejected"}')
    assert redact("team blue") == "team blue"  # a value written into the config is no secret of the user's
