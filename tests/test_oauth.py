"""OAuth upstreams end to end: a real authorization server (strict refresh-token rotation, family revocation)
in front of a real SDK MCP server that checks audience-bound tokens; the real mcpxd, mcpxctl and shim.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import stat

from tests.support.daemon import Sandbox, agent, mcpxctl, running_daemon, start_mcpxctl
from tests.support.oauth import login, oauth_config, protected, refreshed
from tests.support.oauth_server import AuthServer, follow_authorization
from tests.support.results import text_of


async def test_login_once_then_every_agent_uses_the_upstream(sandbox: Sandbox) -> None:
    async with protected() as (auth, upstream):
        oauth_config(sandbox, upstream)
        async with running_daemon(sandbox), agent(sandbox) as client:
            before = await client.call_tool("protected__echo", {"text": "hi"})
            assert before.is_error
            assert "mcpxctl login protected" in text_of(before)

            code, stdout, stderr = await login(sandbox)
            assert code == 0, stderr
            assert "logged in to protected: ready" in stdout

            tools = await client.list_tools()
            assert "protected__echo" in {tool.name for tool in tools.tools}
            assert text_of(await client.call_tool("protected__echo", {"text": "hi"})) == "protected:hi"

            # The flow mcpx ran: DCR as a native client, PKCE S256, state, the RFC 8707 resource, challenged scope.
            assert auth.registrations[0]["application_type"] == "native"
            request = auth.authorization_requests[-1]
            assert request["code_challenge_method"] == "S256"
            assert request["resource"] == upstream.url
            assert request["scope"] == "mcp:read"
            assert request["state"]

            code, status_out, _ = await mcpxctl(sandbox, "status")
            assert "protected: logged in (OAuth, file" in status_out
        # Tokens are in a private file, and nowhere in the log or status output.
        store = sandbox.state / "oauth-tokens.json"
        assert stat.S_IMODE(store.stat().st_mode) == 0o600
        secrets = _issued_tokens(auth)
        log = sandbox.log.read_text()
        for secret in secrets:
            assert secret not in log and secret not in status_out and secret not in stdout


def _issued_tokens(auth: AuthServer) -> list[str]:
    """Every access and refresh token the server issued (the canaries)."""
    issued = [token for family in auth._families.values() for token in family.tokens]
    issued += [family.current_refresh for family in auth._families.values() if family.current_refresh]
    assert issued
    return issued


async def test_headless_login_by_pasting_where_the_browser_landed(sandbox: Sandbox) -> None:
    async with protected() as (auth, upstream):
        oauth_config(sandbox, upstream)
        del sandbox.env["BROWSER"]
        async with running_daemon(sandbox):
            process = await start_mcpxctl(sandbox, "login", "protected", "--no-browser", stdin=True)
            assert process.stderr is not None and process.stdin is not None
            async with asyncio.timeout(20):
                url = ""
                while not url:
                    line = (await process.stderr.readline()).decode()
                    assert line, "mcpxctl ended before printing the URL"
                    if line.strip().startswith("http"):
                        url = line.strip()
            landed = await follow_authorization(url)  # the browser on another machine: we only read where it lands
            process.stdin.write(landed.encode() + b"\n")
            await process.stdin.drain()
            async with asyncio.timeout(30):
                stdout, stderr = await process.communicate()
            assert process.returncode == 0, stderr.decode()
            assert b"logged in to protected: ready" in stdout
            async with agent(sandbox) as client:
                assert text_of(await client.call_tool("protected__echo", {"text": "x"})) == "protected:x"
        assert auth.refresh_count == 0


async def test_expiry_is_refreshed_once_for_all_agents_and_the_login_survives_restarts(sandbox: Sandbox) -> None:
    async with protected() as (auth, upstream):
        oauth_config(sandbox, upstream)
        async with running_daemon(sandbox):
            assert (await login(sandbox))[0] == 0
        # A new daemon (an upgrade, a reboot) finds the login in the store.
        async with running_daemon(sandbox):
            async with agent(sandbox) as client:
                assert text_of(await client.call_tool("protected__echo", {"text": "a"})) == "protected:a"
            auth.expire_access_tokens()
            async with contextlib.AsyncExitStack() as stack:
                clients = [await stack.enter_async_context(agent(sandbox)) for _ in range(20)]

                async def calls(index: int) -> list[str]:
                    client = clients[index]
                    return [
                        text_of(await client.call_tool("protected__echo", {"text": f"{index}-{call}"}))
                        for call in range(10)
                    ]

                results = await asyncio.gather(*(calls(index) for index in range(20)))
            assert results == [[f"protected:{index}-{call}" for call in range(10)] for index in range(20)]
            assert auth.refresh_count == 1
            assert auth.invalid_grant_count == 0


async def test_tokens_are_refreshed_before_they_expire(sandbox: Sandbox) -> None:
    async with protected(access_token_ttl=3) as (auth, upstream):
        oauth_config(sandbox, upstream)
        async with running_daemon(sandbox):
            refresh = refreshed(auth)
            assert (await login(sandbox))[0] == 0
            async with asyncio.timeout(15):
                await refresh.wait()  # nobody called: the daemon refreshed ahead of expiry on its own
            async with agent(sandbox) as client:
                assert text_of(await client.call_tool("protected__echo", {"text": "b"})) == "protected:b"
            assert upstream.rejected_401 <= 1  # only the probe before login; the refresh came first
            assert auth.invalid_grant_count == 0


async def test_step_up_asks_for_the_union_of_scopes(sandbox: Sandbox) -> None:
    async with protected() as (auth, upstream):
        oauth_config(sandbox, upstream)
        async with running_daemon(sandbox), agent(sandbox) as client:
            assert (await login(sandbox))[0] == 0
            denied = await client.call_tool("protected__admin_reset", {})
            assert denied.is_error and "mcpxctl login protected" in text_of(denied)
            # Other tools keep working while the step-up is pending.
            assert text_of(await client.call_tool("protected__echo", {"text": "c"})) == "protected:c"
            assert (await login(sandbox))[0] == 0
            assert auth.authorization_requests[-1]["scope"].split() == ["mcp:read", "mcp:admin"]
            assert text_of(await client.call_tool("protected__admin_reset", {})) == "protected:reset"


async def test_login_returns_as_soon_as_the_upstream_is_usable(sandbox: Sandbox) -> None:
    """The login wakes the upstream once and returns when that connection attempt has ended, and a step-up login
    of a connected upstream returns at once: neither waits out `connect_timeout`."""
    async with protected() as (_auth, upstream):
        oauth_config(sandbox, upstream, daemon="connect_timeout = 120")
        async with running_daemon(sandbox), agent(sandbox) as client:
            async with asyncio.timeout(20):
                code, stdout, stderr = await login(sandbox)
            assert code == 0 and "logged in to protected: ready" in stdout, stderr
            assert (await client.call_tool("protected__admin_reset", {})).is_error
            async with asyncio.timeout(20):
                code, stdout, stderr = await login(sandbox)
            assert code == 0 and "logged in to protected: ready" in stdout, stderr
            assert text_of(await client.call_tool("protected__admin_reset", {})) == "protected:reset"


async def test_root_metadata_naming_the_origin(sandbox: Sandbox) -> None:
    """Protected resource metadata at the root well-known URL may name the server's origin (RFC 9728 §3.3); that
    is then the `resource` of the authorization and token requests, and what the tokens are bound to."""
    async with protected({"prm_location": "root", "challenge_header": False}) as (auth, upstream):
        upstream.prm_resource_override = upstream.url.removesuffix("/mcp")
        oauth_config(sandbox, upstream)
        async with running_daemon(sandbox), agent(sandbox) as client:
            code, _, stderr = await login(sandbox)
            assert code == 0, stderr
            assert auth.authorization_requests[-1]["resource"] == upstream.prm_resource_override
            assert text_of(await client.call_tool("protected__echo", {"text": "o"})) == "protected:o"


async def test_logout_revokes_and_forgets(sandbox: Sandbox) -> None:
    async with protected() as (auth, upstream):
        oauth_config(sandbox, upstream)
        async with running_daemon(sandbox), agent(sandbox) as client:
            assert (await login(sandbox))[0] == 0
            code, stdout, _ = await mcpxctl(sandbox, "logout", "protected")
            assert code == 0 and "forgot the login" in stdout
            assert auth.revocation_requests
            # The ready upstream was reconnected without the login: status says so before any call fails.
            _, status_json, _ = await mcpxctl(sandbox, "status", "--json")
            (state,) = [u["state"] for u in json.loads(status_json)["upstreams"] if u["name"] == "protected"]
            assert state == "needs_login"
            after = await client.call_tool("protected__echo", {"text": "d"})
            assert after.is_error and "mcpxctl login protected" in text_of(after)
            code, status_out, _ = await mcpxctl(sandbox, "status")
            assert "not logged in: run `mcpxctl login protected`" in status_out


async def test_a_wrong_iss_in_the_redirect_fails_the_login(sandbox: Sandbox) -> None:
    async with protected(iss_parameter="wrong") as (auth, upstream):
        oauth_config(sandbox, upstream)
        async with running_daemon(sandbox):
            code, _, stderr = await login(sandbox)
            assert code == 1
            assert "different issuer" in stderr
            assert not [grant for grant in auth.token_requests if grant == "authorization_code"]


async def test_a_server_without_s256_is_refused(sandbox: Sandbox) -> None:
    async with protected(advertise_s256=False) as (auth, upstream):
        oauth_config(sandbox, upstream)
        async with running_daemon(sandbox):
            code, _, stderr = await login(sandbox)
            assert code == 1 and "S256" in stderr
            assert not auth.authorization_requests


async def test_pre_registered_confidential_client(sandbox: Sandbox) -> None:
    async with protected(pre_registered={"mcpx-app": "app-secret-canary-0193"}, dcr=False) as (auth, upstream):
        sandbox.env["APP_SECRET"] = "app-secret-canary-0193"
        oauth_config(sandbox, upstream, client_id="mcpx-app", client_secret_env="APP_SECRET")
        async with running_daemon(sandbox), agent(sandbox) as client:
            code, _stdout, stderr = await login(sandbox)
            assert code == 0, stderr
            assert text_of(await client.call_tool("protected__whoami", {})).startswith("protected:mcpx-app:")
        assert not auth.registrations
        assert "app-secret-canary-0193" not in sandbox.log.read_text()
        assert "app-secret-canary-0193" not in (sandbox.state / "oauth-tokens.json").read_text()


async def test_the_login_timeout_reaches_the_daemon(sandbox: Sandbox) -> None:
    async with protected() as (auth, upstream):
        oauth_config(sandbox, upstream)
        sandbox.env["BROWSER"] = "true"  # a browser that never comes back
        async with running_daemon(sandbox):
            code, _, stderr = await login(sandbox, "--timeout", "1")
            assert code != 0
            assert "no answer from the browser within 1 s" in stderr  # the daemon's bound, not mcpxctl's own
            assert not [grant for grant in auth.token_requests if grant == "authorization_code"]
