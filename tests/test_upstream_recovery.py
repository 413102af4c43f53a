"""Upstream failures the daemon recovers from by itself: rotated credentials, expired sessions, restarts."""

from __future__ import annotations

import asyncio
import json
import os

from tests.support.daemon import FAST_RECONNECT, Sandbox, agent, mcpxctl, running_daemon, upstream_toml
from tests.support.results import text_of
from tests.support.upstream import TokenCheck, Upstream, reserve_port, running


async def _status(sandbox: Sandbox) -> dict[str, dict[str, object]]:
    code, out, _ = await mcpxctl(sandbox, "status", "--json")
    assert code == 0
    return {upstream["name"]: upstream for upstream in json.loads(out)["upstreams"]}


async def test_rotated_bearer_file_is_reread_after_a_401_and_the_call_retried(sandbox: Sandbox) -> None:
    tokens = TokenCheck({"token-one-AAAA"})
    alpha = Upstream("alpha", json_response=True, tokens=tokens)
    token_file = sandbox.root / "alpha.token"
    token_file.write_text("token-one-AAAA\n")
    sandbox.write_config(upstream_toml("alpha", alpha.url, auth={"type": "bearer_file", "path": str(token_file)}))
    async with running(alpha), running_daemon(sandbox), agent(sandbox) as client:
        assert text_of(await client.call_tool("alpha__echo", {"text": "1"})) == "alpha:1"
        # The server rotates the token; the new one is written in place with the same size and mtime, so
        # nothing but the 401 can tell mcpx that the file must be read again.
        stat = os.stat(token_file)
        tokens.valid = {"token-two-BBBB"}
        with open(token_file, "r+") as file:
            file.write("token-two-BBBB\n")
        os.utime(token_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert os.stat(token_file).st_ino == stat.st_ino
        assert text_of(await client.call_tool("alpha__echo", {"text": "2"})) == "alpha:2"
        assert tokens.seen[-2:] == ["token-one-AAAA", "token-two-BBBB"]


async def test_rejected_credential_is_reported_with_the_file_to_fix_then_recovers(sandbox: Sandbox) -> None:
    tokens = TokenCheck({"good-token-1234"})
    alpha = Upstream("alpha", json_response=False, tokens=tokens)
    token_file = sandbox.root / "alpha.token"
    token_file.write_text("wrong-token-999\n")
    sandbox.write_config(
        FAST_RECONNECT + upstream_toml("alpha", alpha.url, auth={"type": "bearer_file", "path": str(token_file)})
    )
    async with running(alpha), running_daemon(sandbox), agent(sandbox) as client:
        failed = await client.call_tool("alpha__echo", {"text": "x"})
        assert failed.is_error
        assert str(token_file) in text_of(failed)
        assert "401" in text_of(failed)
        status = await _status(sandbox)
        assert status["alpha"]["state"] == "auth_failed"
        assert str(token_file) in str(status["alpha"]["last_error"])

        token_file.write_text("good-token-1234\n")
        assert text_of(await client.call_tool("alpha__echo", {"text": "fixed"})) == "alpha:fixed"
        assert (await _status(sandbox))["alpha"]["state"] == "ready"


async def test_missing_env_token_names_the_variable(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=True, tokens=TokenCheck({"t-123456"}))
    sandbox.write_config(upstream_toml("alpha", alpha.url, auth={"type": "bearer_env", "env": "ALPHA_TOKEN_X"}))
    async with running(alpha), running_daemon(sandbox), agent(sandbox) as client:
        failed = await client.call_tool("alpha__echo", {"text": "x"})
        assert failed.is_error
        assert "ALPHA_TOKEN_X" in text_of(failed)
        assert "alpha" in text_of(failed)


async def test_expired_upstream_session_is_reinitialized_and_the_call_retried(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=False)
    sandbox.write_config(upstream_toml("alpha", alpha.url))
    async with running(alpha), running_daemon(sandbox), agent(sandbox) as client:
        assert text_of(await client.call_tool("alpha__echo", {"text": "before"})) == "alpha:before"
        old_sessions = {r.headers.get("mcp-session-id") for r in alpha.requests} - {None}
        await alpha.restart()  # the server forgets every session: our next request gets 404
        assert text_of(await client.call_tool("alpha__echo", {"text": "after"})) == "alpha:after"
        new_sessions = {r.headers.get("mcp-session-id") for r in alpha.requests} - {None} - old_sessions
        assert len(new_sessions) == 1
        initializes = [r for r in alpha.requests if r.method == "POST" and "mcp-session-id" not in r.headers]
        assert len(initializes) == 2


async def test_upstream_going_down_fails_calls_at_once_and_comes_back(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=True)
    beta = Upstream("beta", json_response=True)
    sandbox.write_config(FAST_RECONNECT + upstream_toml("alpha", alpha.url) + upstream_toml("beta", beta.url))
    async with running(alpha, beta), running_daemon(sandbox), agent(sandbox) as client:
        assert text_of(await client.call_tool("alpha__echo", {"text": "1"})) == "alpha:1"
        await alpha.stop()
        failed = await client.call_tool("alpha__echo", {"text": "2"})
        assert failed.is_error
        assert "alpha" in text_of(failed)
        # The other upstream is unaffected, and alpha's tools stay listed while it is down.
        assert text_of(await client.call_tool("beta__echo", {"text": "3"})) == "beta:3"
        assert "alpha__echo" in {tool.name for tool in (await client.list_tools()).tools}
        await alpha.start()
        async with asyncio.timeout(10):
            await alpha.initialize_received.wait()  # the supervisor's backoff reached the restarted upstream
            # The handshake and the tool listing that follow end with the state set: each round is one status call.
            while (await _status(sandbox))["alpha"]["state"] != "ready":
                pass
        assert text_of(await client.call_tool("alpha__echo", {"text": "4"})) == "alpha:4"
        assert (await _status(sandbox))["alpha"]["state"] == "ready"


async def test_daemon_stop_deletes_upstream_sessions_and_sends_configured_headers(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=True, tokens=TokenCheck({"alpha-secret-xyz"}))
    sandbox.env["ALPHA_TOKEN"] = "alpha-secret-xyz"
    sandbox.env["TENANT"] = "acme"
    sandbox.write_config(
        upstream_toml(
            "alpha",
            alpha.url,
            auth={"type": "bearer_env", "env": "ALPHA_TOKEN"},
            headers={"X-Tenant": "${TENANT}", "X-Static": "yes"},
        )
    )
    async with running(alpha):
        async with running_daemon(sandbox) as daemon, agent(sandbox) as client:
            assert text_of(await client.call_tool("alpha__echo", {"text": "h"})) == "alpha:h"
            post = [r for r in alpha.requests if r.method == "POST"][-1]
            assert post.headers["authorization"] == "Bearer alpha-secret-xyz"
            assert post.headers["x-tenant"] == "acme"
            assert post.headers["x-static"] == "yes"
            assert post.headers["mcp-protocol-version"] == "2025-11-25"
            session_id = post.headers["mcp-session-id"]
        assert await daemon.stop() == 0
        deletes = [r for r in alpha.requests if r.method == "DELETE"]
        assert [r.headers.get("mcp-session-id") for r in deletes] == [session_id]


async def test_a_down_upstream_whose_name_holds_the_separator_is_named_in_the_error(sandbox: Sandbox) -> None:
    closed = reserve_port()  # bound, never listening: connections are refused
    url = f"http://127.0.0.1:{closed.getsockname()[1]}/mcp"
    try:
        sandbox.write_config(
            "[daemon]\nconnect_timeout = 1\n\n" + upstream_toml("my", url) + upstream_toml("my__srv", url)
        )
        async with running_daemon(sandbox), agent(sandbox) as client:
            failed = await client.call_tool("my__srv__echo", {"text": "x"})
            assert failed.is_error
            assert text_of(failed).startswith("upstream 'my__srv'"), text_of(failed)  # (not 'my', also a prefix)
    finally:
        closed.close()
