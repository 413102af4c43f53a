"""The device authorization grant (RFC 8628): `mcpxctl login NAME --device` through the real daemon against the
fixture authorization server (approval and denial go through its verification URI over HTTP, as a browser on
another device would), the credential's flow in-process (polling, slow_down, timeouts, one flow per upstream),
and the sans-I/O checks of flow.py. Poll intervals are the fixture's, made tiny; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mcpx.auth.oauth import flow as flow_module
from mcpx.auth.oauth.credential import LoginError, OAuthContext, OAuthCredential
from mcpx.auth.oauth.flow import (
    DEVICE_CODE_GRANT,
    AuthorizationFailed,
    device_grant_supported,
    next_device_interval,
    parse_device_authorization,
)
from mcpx.auth.oauth.metadata import Challenge, DiscoveryError, validate_server_metadata
from mcpx.config.model import OAuthAuth, UpstreamConfig
from tests.support.daemon import Sandbox, agent, mcpxctl, running_daemon, start_mcpxctl
from tests.support.oauth import oauth_config, oauth_credential, protected
from tests.support.oauth_server import AuthServer, ProtectedUpstream, follow_authorization
from tests.support.results import text_of

FAST: dict[str, Any] = {"device_grant": True, "device_poll_interval": 0.05}


# ---- through mcpxd and mcpxctl


@dataclass
class DeviceLogin:
    process: asyncio.subprocess.Process
    printed: str
    verification_uri: str = ""
    user_code: str = ""
    verification_uri_complete: str = ""

    async def result(self) -> tuple[int, str, str]:
        async with asyncio.timeout(30):
            stdout, stderr = await self.process.communicate()
        assert self.process.returncode is not None
        return self.process.returncode, stdout.decode(), self.printed + stderr.decode()


async def start_device_login(sandbox: Sandbox, *extra: str) -> DeviceLogin:
    """`mcpxctl login protected --device`, read until it waits for the approval (or ends)."""
    process = await start_mcpxctl(sandbox, "login", "protected", "--device", *extra)
    assert process.stderr is not None
    printed = ""
    async with asyncio.timeout(20):
        while "Waiting for the approval" not in printed:
            line = (await process.stderr.readline()).decode()
            if not line:
                return DeviceLogin(process, printed)
            printed += line
    match = re.search(
        r"open this address on any device:\n\n  (\S+)\n\nand enter the code:\n\n  (\S+)\n\n"
        r"or open this address, which carries the code:\n\n  (\S+)\n",
        printed,
    )
    assert match, printed
    return DeviceLogin(process, printed, *match.groups())


async def browse(url: str, **form: str) -> str:
    """The user's browser on another device: GET the address (or POST the code typed into it)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        request = http.post(url, data=form) if form else http.get(url)
        async with request as response:
            assert response.status == 200, await response.text()
            return await response.text()


async def test_device_login_end_to_end(sandbox: Sandbox) -> None:
    async with protected(**FAST) as (auth, upstream):
        oauth_config(sandbox, upstream)
        del sandbox.env["BROWSER"]  # nothing may be opened on this machine
        async with running_daemon(sandbox), agent(sandbox) as client:
            login = await start_device_login(sandbox)
            assert login.user_code == auth.device_user_codes[-1]
            assert login.verification_uri == auth.endpoint("device")
            assert login.verification_uri_complete == f"{auth.endpoint('device')}?user_code={login.user_code}"
            assert "the code expires in 10m 0s" in login.printed
            assert await browse(login.verification_uri_complete) == "approved"
            code, stdout, stderr = await login.result()
            assert code == 0, stderr
            assert "logged in to protected: ready" in stdout
            assert text_of(await client.call_tool("protected__echo", {"text": "d"})) == "protected:d"

            # What mcpx asked for: the RFC 8707 resource and the challenged scope, with a registration made for the
            # device grant (no redirect URI); then it polled the token endpoint with the device code grant.
            (request,) = auth.device_authorization_requests
            assert request["resource"] == upstream.url and request["scope"] == "mcp:read"
            (registration,) = auth.registrations
            assert registration["grant_types"] == [DEVICE_CODE_GRANT, "refresh_token"]
            assert registration["redirect_uris"] == []
            assert request["client_id"] == next(iter(auth.clients))
            assert auth.token_requests[-1] == DEVICE_CODE_GRANT
            assert not auth.authorization_requests

            # The login is stored like any other, and refreshed with the client it was made with.
            _, status_json, _ = await mcpxctl(sandbox, "status", "--json")
            (oauth,) = [u["oauth"] for u in json.loads(status_json)["upstreams"] if u["name"] == "protected"]
            assert oauth["logged_in"] and oauth["storage"] == "file" and oauth["scopes"] == "mcp:read"
            auth.expire_access_tokens()
            assert text_of(await client.call_tool("protected__echo", {"text": "e"})) == "protected:e"
            assert auth.refresh_count == 1 and auth.invalid_grant_count == 0
        # The device code (a bearer credential until it is used) never reaches the log.
        log = sandbox.log.read_text()
        assert auth._devices and not any(device_code in log for device_code in auth._devices)


async def test_device_login_denied(sandbox: Sandbox) -> None:
    async with protected(**FAST) as (auth, upstream):
        oauth_config(sandbox, upstream)
        async with running_daemon(sandbox):
            login = await start_device_login(sandbox)
            # The user types the code at the verification URI, and says no.
            assert await browse(login.verification_uri, user_code=login.user_code, decision="deny") == "denied"
            code, _, stderr = await login.result()
            assert code == 1
            assert "the authorization was denied at the authorization server (access_denied)" in stderr
            _, status_out, _ = await mcpxctl(sandbox, "status")
            assert "not logged in" in status_out
        assert auth.token_errors[-1] == "access_denied"


async def test_device_login_code_expires(sandbox: Sandbox) -> None:
    async with protected(**FAST, device_code_ttl=0.5) as (_auth, upstream):
        oauth_config(sandbox, upstream)
        async with running_daemon(sandbox):
            login = await start_device_login(sandbox)
            code, _, stderr = await login.result()
            assert code == 1
            # Whichever saw it first, the server (expired_token) or mcpx (expires_in), says the same.
            assert "the code expired before the login was approved" in stderr and "run the login again" in stderr


async def test_two_device_logins_at_once_share_one_flow(sandbox: Sandbox) -> None:
    async with protected(**FAST) as (auth, upstream):
        oauth_config(sandbox, upstream)
        async with running_daemon(sandbox):
            first, second = await asyncio.gather(start_device_login(sandbox), start_device_login(sandbox))
            assert first.user_code == second.user_code
            assert len(auth.device_authorization_requests) == 1
            await browse(first.verification_uri_complete)
            for login in (first, second):
                code, stdout, stderr = await login.result()
                assert code == 0 and "logged in to protected: ready" in stdout, stderr
            assert len(auth.registrations) == 1


async def test_device_login_where_the_server_has_no_device_grant(sandbox: Sandbox) -> None:
    async with protected() as (auth, upstream):
        oauth_config(sandbox, upstream)
        async with running_daemon(sandbox):
            login = await start_device_login(sandbox)
            code, _, stderr = await login.result()
            assert code == 1
            assert "does not offer the device authorization grant" in stderr
            assert "mcpxctl login protected" in stderr
        assert not auth.registrations


async def test_no_browser_login_mentions_the_device_grant_where_offered(sandbox: Sandbox) -> None:
    async with protected(device_grant=True) as (auth, upstream):
        oauth_config(sandbox, upstream)
        del sandbox.env["BROWSER"]
        async with running_daemon(sandbox):
            process = await start_mcpxctl(sandbox, "login", "protected", "--no-browser", stdin=True)
            assert process.stderr is not None and process.stdin is not None
            printed = ""
            url = ""
            async with asyncio.timeout(20):
                while "Then paste" not in printed:
                    line = (await process.stderr.readline()).decode()
                    assert line, printed
                    printed += line
                    if line.strip().startswith("http"):
                        url = line.strip()
            assert "this server also offers `mcpxctl login protected --device`" in printed
            # The paste flow itself is unchanged.
            process.stdin.write((await follow_authorization(url)).encode() + b"\n")
            await process.stdin.drain()
            async with asyncio.timeout(30):
                _, stderr = await process.communicate()
            assert process.returncode == 0, stderr.decode()
        assert not auth.device_authorization_requests


# ---- the credential's device flow, in-process


async def test_slow_down_adds_its_step_to_every_later_poll(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert flow_module.SLOW_DOWN_STEP == 5.0  # RFC 8628 §3.5; made short below so the test does not wait 10 s
    monkeypatch.setattr(flow_module, "SLOW_DOWN_STEP", 0.2)
    async with oauth_credential(tmp_path, **FAST, device_slow_down=2) as (credential, auth):
        flow = await credential.begin_login(device=True)
        assert flow.device is not None
        auth.approve_device(flow.device.user_code)
        await credential.wait_login(flow, timeout=20)
        assert credential.logged_in
        first, second, third = auth.device_polls
        # interval 0.05, then 0.25 after the first slow_down, then 0.45 after the second.
        assert second - first >= 0.25
        assert third - second >= 0.45
        assert auth.token_errors == ["slow_down", "slow_down"]


async def test_the_login_timeout_ends_a_device_login(tmp_path: Path) -> None:
    async with oauth_credential(tmp_path, **FAST) as (credential, auth):
        flow = await credential.begin_login(device=True)
        with pytest.raises(LoginError, match=r"the device login was not approved within 0.3 s; run the login again"):
            await credential.wait_login(flow, timeout=0.3)
        # Ended when wait_login returns: the poller is gone, so nothing polls after this.
        assert flow.result is not None and flow.result.done() and flow.answer.done()
        polls = len(auth.device_polls)
        assert not credential.logged_in
        # The next login is a new flow with a new code.
        again = await credential.begin_login(device=True)
        assert again is not flow and len(auth.device_user_codes) == 2
        await credential.close()
        assert len(auth.device_polls) <= polls + 1  # at most the new flow's first poll, none of the old one's


async def test_one_flow_per_upstream(tmp_path: Path) -> None:
    async with oauth_credential(tmp_path, **FAST) as (credential, auth):
        # Two device logins at once: one flow, one code, both waiters succeed on one approval.
        first, second = await asyncio.gather(credential.begin_login(device=True), credential.begin_login(device=True))
        assert first is second and len(auth.device_authorization_requests) == 1
        waiters = [asyncio.create_task(credential.wait_login(first, timeout=20)) for _ in range(2)]
        assert first.device is not None
        with pytest.raises(LoginError, match=r"is a device login: enter the code .* nothing to paste"):
            credential.finish_login("http://127.0.0.1/callback?code=x")
        auth.approve_device(first.device.user_code)
        await asyncio.gather(*waiters)
        assert credential.logged_in

        # A browser login pending; a device login replaces it, and its waiter hears why.
        browser = await credential.begin_login()
        assert browser.pending is not None and browser.listener is not None
        waiting = asyncio.create_task(credential.wait_login(browser, timeout=20))
        device = await credential.begin_login(device=True)
        with pytest.raises(LoginError, match="replaced by a device login started since"):
            await waiting
        assert device is credential.current_login() and device is not browser
        # ... and the other way round.
        waiting = asyncio.create_task(credential.wait_login(device, timeout=20))
        browser = await credential.begin_login()
        with pytest.raises(LoginError, match="replaced by a browser login started since"):
            await waiting
        assert browser.pending is not None
        landed = await follow_authorization(browser.pending.url)
        credential.finish_login(landed)
        await credential.wait_login(browser, timeout=20)


async def test_an_abandoned_login_keeps_the_stored_registration(tmp_path: Path) -> None:
    """A login that registers a client of its own (here a browser login after a device login, whose client has no
    redirect URI) stores it only when it succeeds: abandoned, the stored tokens keep their client and refresh."""
    async with oauth_credential(tmp_path, **FAST) as (credential, auth):
        device = await credential.begin_login(device=True)
        assert device.device is not None
        auth.approve_device(device.device.user_code)
        await credential.wait_login(device, timeout=20)
        browser = await credential.begin_login()
        assert browser.registered and len(auth.registrations) == 2
        with pytest.raises(LoginError, match=r"no answer from the browser within 0\.1 s"):
            await credential.wait_login(browser, timeout=0.1)
        auth.expire_access_tokens()
        assert await credential.renew(credential.headers(), Challenge())
        assert auth.refresh_count == 1 and auth.invalid_grant_count == 0
        # A browser login that succeeds adopts its registration; the next one reuses it.
        browser = await credential.begin_login()
        assert browser.pending is not None
        credential.finish_login(await follow_authorization(browser.pending.url))
        await credential.wait_login(browser, timeout=20)
        assert len(auth.registrations) == 3
        again = await credential.begin_login()
        assert not again.registered and again.client == browser.client


async def test_a_verification_uri_that_is_not_https_is_refused(tmp_path: Path) -> None:
    async with oauth_credential(tmp_path, **FAST, device_verification_uri="http://evil.example/device") as (
        credential,
        auth,
    ):
        with pytest.raises(LoginError, match=r"verification_uri .* must be https \(or http to a loopback address\)"):
            await credential.begin_login(device=True)
        assert credential.current_login() is None
        assert len(auth.device_authorization_requests) == 1


async def test_a_configured_client_is_used_as_is(tmp_path: Path) -> None:
    async with AuthServer(**FAST, pre_registered={"tv": None}, dcr=False) as auth, ProtectedUpstream(auth) as upstream:
        context = OAuthContext(tmp_path / "state", "file")
        config = UpstreamConfig(name="protected", url=upstream.url, auth=OAuthAuth(type="oauth", client_id="tv"))
        assert isinstance(config.auth, OAuthAuth)
        credential = OAuthCredential(config, config.auth, context)
        try:
            flow = await credential.begin_login(device=True)
            assert flow.device is not None and flow.client.client_id == "tv"
            auth.approve_device(flow.device.user_code)
            await credential.wait_login(flow, timeout=20)
            assert credential.logged_in
        finally:
            await credential.close()
            await context.close()


# ---- sans-I/O


def test_next_device_interval() -> None:
    assert next_device_interval("authorization_pending", "", 2.0) == 2.0
    assert next_device_interval("slow_down", "", 2.0) == 7.0
    with pytest.raises(AuthorizationFailed, match="denied"):
        next_device_interval("access_denied", "", 2.0)
    with pytest.raises(AuthorizationFailed, match="expired"):
        next_device_interval("expired_token", "", 2.0)
    with pytest.raises(AuthorizationFailed, match="refused the device login: invalid_client: who are you"):
        next_device_interval("invalid_client", "who are you", 2.0)


GOOD = {
    "device_code": "dc",
    "user_code": "WDJB-MJHT",
    "verification_uri": "https://as.example/device",
    "verification_uri_complete": "https://as.example/device?user_code=WDJB-MJHT",
    "expires_in": 1800,
    "interval": 5,
}


def _parse(**changes: Any) -> Any:
    answer = {key: value for key, value in (GOOD | changes).items() if value is not None}
    return parse_device_authorization(answer, issuer="https://as.example", client_id="c", resource="r", scopes=())


def test_parse_device_authorization() -> None:
    device = _parse()
    assert (device.user_code, device.verification_uri, device.expires_in, device.interval) == (
        "WDJB-MJHT",
        "https://as.example/device",
        1800.0,
        5.0,
    )
    assert "dc" not in repr(device)
    assert _parse(interval=None).interval == 5.0  # RFC 8628 §3.2 default
    assert _parse(interval=0).interval == 5.0
    assert _parse(interval=0.001).interval == flow_module.MIN_DEVICE_INTERVAL
    assert _parse(expires_in=10**9).expires_in == flow_module.MAX_DEVICE_WAIT
    assert _parse(verification_uri_complete=None).verification_uri_complete is None
    legacy = _parse(verification_uri=None, verification_url="https://as.example/legacy")
    assert legacy.verification_uri == "https://as.example/legacy"
    assert _parse(verification_uri="http://127.0.0.1:8080/device").verification_uri == "http://127.0.0.1:8080/device"
    refused: list[dict[str, Any]] = [
        {"device_code": None},
        {"device_code": ""},
        {"user_code": None},
        {"user_code": "  "},
        {"user_code": "AB\x1b[2JCD"},  # a terminal escape in what mcpxctl prints
        {"user_code": "X" * 65},
        {"verification_uri": None},
        {"verification_uri": "http://as.example/device"},
        {"verification_uri": "javascript:alert(1)"},
        {"verification_uri": "https://user:pw@as.example/device"},
        {"verification_uri": "https://as.example/dévice"},
        {"verification_uri_complete": "http://as.example/device?user_code=WDJB-MJHT"},
        {"verification_uri_complete": "https://as.example/device?\x9b31m"},
        {"expires_in": None},
        {"expires_in": 0},
        {"expires_in": "1800"},
        {"expires_in": True},
    ]
    for changes in refused:
        with pytest.raises(DiscoveryError):
            _parse(**changes)


def test_device_grant_supported() -> None:
    base = {"issuer": "https://as.example", "token_endpoint": "https://as.example/token"}
    endpoint = {"device_authorization_endpoint": "https://as.example/device_authorization"}

    def supported(document: dict[str, Any]) -> bool:
        return device_grant_supported(validate_server_metadata(document, "https://as.example", source="test"))

    assert not supported(base)
    assert supported(base | endpoint)  # grant types not listed: the endpoint says it
    assert supported(base | endpoint | {"grant_types_supported": ["authorization_code", DEVICE_CODE_GRANT]})
    assert not supported(base | endpoint | {"grant_types_supported": ["authorization_code", "refresh_token"]})
    with pytest.raises(DiscoveryError):
        supported(base | {"device_authorization_endpoint": "http://as.example/device_authorization"})
