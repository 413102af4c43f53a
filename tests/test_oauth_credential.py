"""An OAuth upstream's credential in process (daemon/mcpx/auth/oauth/credential.py) against the fixture
authorization server: which client each request uses, revocation at logout, what is stored and adopted."""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from mcpx.auth.oauth import credential as credential_module
from mcpx.auth.oauth import store as store_module
from mcpx.auth.oauth.credential import (
    MAX_TOKEN_LIFETIME,
    LoginError,
    OAuthContext,
    OAuthCredential,
    token_lifetime,
)
from mcpx.auth.oauth.metadata import Challenge
from mcpx.config.model import OAuthClientCredentialsAuth, UpstreamConfig
from mcpx.errors import NeedsLogin, UpstreamUnavailable
from tests.support.keyrings import ControlledKeyring, hung_call_lands, installed
from tests.support.oauth import browser_login, credential_for, oauth_credential, protected, refreshed
from tests.support.oauth_server import AuthServer, follow_authorization


async def test_logout_revokes_with_the_clients_authentication(tmp_path: Path) -> None:
    """A registration the server made confidential (client_secret_basic, the method `register` assumes when the
    server sends a secret) authenticates its revocation requests like its token requests."""
    async with oauth_credential(tmp_path, registration_auth_method="client_secret_basic") as (credential, auth):
        await browser_login(credential)
        assert next(iter(auth.clients.values())).token_endpoint_auth_method == "client_secret_basic"
        assert await credential.logout()
        assert auth.revocation_requests == ["refresh_token", "access_token"]
        assert auth.families_revoked == 1
        assert not credential.logged_in


def client_of(auth: AuthServer, credential: OAuthCredential) -> str:
    """The client the credential's current access token was issued to."""
    info = auth.verify(credential.headers()["Authorization"].removeprefix("Bearer "))
    assert info is not None
    return info.client_id


async def test_a_client_id_configured_after_a_registration_is_the_client_of_every_request(tmp_path: Path) -> None:
    """The configured client comes first for logins, refreshes and logout alike: a registration stored by an
    earlier login (before the config named a client) is not used with the configured client's tokens."""
    async with protected(pre_registered={"mcpx-app": None}) as (auth, upstream):
        context = OAuthContext(tmp_path / "state", "file")
        registered = credential_for(upstream.url, context)
        # The config then names a client (a reload makes a new credential; the store keeps the registration).
        configured = credential_for(upstream.url, context, client_id="mcpx-app")
        try:
            await browser_login(registered)
            assert client_of(auth, registered).startswith("dcr-")
            await browser_login(configured)
            assert client_of(auth, configured) == "mcpx-app"
            auth.expire_access_tokens()
            assert await configured.renew(configured.headers(), Challenge())
            assert auth.refresh_count == 1 and auth.invalid_grant_count == 0
            assert client_of(auth, configured) == "mcpx-app"
            assert await configured.logout()
            assert auth.revocation_requests == ["refresh_token", "access_token"]
            assert [family.client_id for family in auth._families.values() if family.revoked] == ["mcpx-app"]
        finally:
            for credential in (registered, configured):
                await credential.close()
            await context.close()


async def test_a_machine_credential_whose_stored_token_expired_gets_a_new_one_before_use(tmp_path: Path) -> None:
    """Client credentials need no refresh token: `prepare` renews an expired stored token as it does a user's, so
    no request goes out with a token known to be dead."""
    async with protected(pre_registered={"machine": "machine-secret"}) as (auth, upstream):
        machine = OAuthClientCredentialsAuth(
            type="oauth_client_credentials", client_id="machine", client_secret="machine-secret"
        )
        config = UpstreamConfig(name="protected", url=upstream.url, auth=machine)
        context = OAuthContext(tmp_path / "state", "file")
        first, second = (OAuthCredential(config, machine, context) for _ in range(2))
        try:
            await first.prepare()
            assert first.logged_in and auth.token_requests == ["client_credentials"]
            await first.close()
            # The daemon restarts after the stored token expired.
            store = await context.store()
            record = await store.load("protected")
            assert record is not None
            record["tokens"]["expires_at"] = time.time() - 1
            await store.save("protected", record)
            await second.prepare()
            assert auth.token_requests == ["client_credentials", "client_credentials"]
            assert client_of(auth, second) == "machine"
        finally:
            await second.close()
            await context.close()


async def test_a_login_adopted_from_the_store_after_invalid_grant_is_refreshed_ahead_of_expiry(
    tmp_path: Path,
) -> None:
    """The refresh token was refused because another process logged in again meanwhile: the stored login is
    adopted like one loaded at start, with its own proactive refresh."""
    async with protected() as (auth, upstream):
        context = OAuthContext(tmp_path / "state", "file")
        ours, other = credential_for(upstream.url, context), credential_for(upstream.url, context)
        try:
            await browser_login(ours)  # tokens for an hour: no refresh of them is due during the test
            auth.revoke_all_tokens()
            auth.access_token_ttl = 2
            await browser_login(other)  # the store now holds the other login, refreshed 0.5 s before expiry
            await other.close()
            assert await ours.renew(ours.headers(), Challenge())
            assert ours.headers() == other.headers() and auth.invalid_grant_count == 1
            refresh = refreshed(auth)
            async with asyncio.timeout(10):
                await refresh.wait()  # nobody called: the adopted login was refreshed ahead of its expiry
            assert auth.refresh_count == 1 and client_of(auth, ours)
        finally:
            await ours.close()
            await context.close()


async def test_a_stored_login_for_another_resource_is_not_adopted_after_invalid_grant(tmp_path: Path) -> None:
    async with oauth_credential(tmp_path) as (credential, auth):
        await browser_login(credential)
        auth.revoke_all_tokens()
        store = await credential._context.store()
        record = await store.load("protected")
        assert record is not None
        elsewhere = {**record, "resource": "https://elsewhere.example/mcp"}
        await store.save("protected", elsewhere | {"tokens": {"access_token": "at-x", "refresh_token": "rt-x"}})
        with pytest.raises(NeedsLogin):
            await credential.renew(credential.headers(), Challenge())
        assert not credential.logged_in


async def test_the_next_browser_login_listens_where_the_stored_registration_redirects(tmp_path: Path) -> None:
    async with oauth_credential(tmp_path) as (credential, auth):
        await browser_login(credential)
        store = await credential._context.store()
        record = await store.load("protected")
        assert record is not None and "redirect_port" not in record
        (redirect_uri,) = record["redirect_uris"]
        again = await credential.begin_login()
        assert again.pending is not None and again.pending.redirect_uri == redirect_uri
        assert not again.registered and len(auth.registrations) == 1


@pytest.mark.parametrize(
    "query", ["", "?", "?code=stray", "?error=access_denied", "?state=", "?state=stale&code=c", "?state=%C3%A9&code=c"]
)
async def test_a_stray_request_to_the_redirect_listener_does_not_end_the_login(tmp_path: Path, query: str) -> None:
    """Only an authorization response to this login (it always carries the login's `state`) is handed to it;
    anything else that reaches the loopback listener (a stale tab of an earlier login, any page that knows the
    port) is answered 400 and the login goes on."""
    async with oauth_credential(tmp_path) as (credential, _auth):
        flow = await credential.begin_login()
        assert flow.pending is not None
        async with (
            aiohttp.ClientSession() as http,
            http.get(flow.pending.redirect_uri + query, allow_redirects=False) as response,
        ):
            assert response.status == 400
        assert not flow.answer.done()
        landed = await follow_authorization(flow.pending.url)
        async with aiohttp.ClientSession() as http, http.get(landed, allow_redirects=False) as response:
            assert response.status == 200  # the browser's own request: "you can close this tab"
        await credential.wait_login(flow, timeout=20)
        assert credential.logged_in


# --- what a server's mistakes and the user's own actions must not cost ------------------------------------------


def answering_expires_in(auth: AuthServer, value: object) -> None:
    """Make every token response of `auth` carry `expires_in = value`."""
    issue = auth._issue

    def issued(family: Any, *, refresh: bool = True) -> dict[str, Any]:
        answer = issue(family, refresh=refresh)
        answer["expires_in"] = value
        return answer

    auth._issue = issued  # type: ignore[method-assign]


@pytest.mark.parametrize(
    ("expires_in", "lifetime"),
    [(3600, 3600.0), (1.5, 1.5), (0, None), (-60, None), (math.nan, None), (math.inf, None), (10**400, None),
     (True, None), ("3600", None), (None, None), (10**12, MAX_TOKEN_LIFETIME)],
)  # fmt: skip
def test_only_a_positive_finite_expires_in_is_a_lifetime(expires_in: object, lifetime: float | None) -> None:
    assert token_lifetime(expires_in) == lifetime


@pytest.mark.parametrize("expires_in", [0, -60, math.nan, math.inf, 10**400])
async def test_a_garbage_expires_in_means_an_unknown_expiry(tmp_path: Path, expires_in: object) -> None:
    """No refresh ahead of an expiry that cannot be known (0 or NaN once meant a refresh 20 times a second), and
    the status of the upstream still reads (NaN and infinity once broke `mcpxctl status` for every upstream)."""
    async with oauth_credential(tmp_path) as (credential, auth):
        answering_expires_in(auth, expires_in)
        await browser_login(credential)
        assert credential.logged_in
        status = credential.status()
        assert status["expires_at"] is None and status["expires_in"] is None
        assert credential._proactive is None
        assert await credential.renew(credential.headers(), Challenge())  # a 401 still gets a refresh
        assert auth.refresh_count == 1


async def refresh_held_by_the_server(
    credential: OAuthCredential, auth: AuthServer
) -> tuple[asyncio.Task[bool], asyncio.Event]:
    """After a login: a refresh under way (a 401's `renew`) whose answer the authorization server has made (the
    refresh token rotated) and holds back until the returned event is set."""
    await browser_login(credential)
    entered, release = asyncio.Event(), asyncio.Event()
    grant = auth._grant_refresh

    async def held(request: Any, form: dict[str, str]) -> dict[str, Any]:
        answer = await grant(request, form)
        entered.set()
        await release.wait()
        return answer

    auth._grant_refresh = held  # type: ignore[method-assign]
    renewing = asyncio.create_task(credential.renew(credential.headers(), Challenge()))
    async with asyncio.timeout(10):
        await entered.wait()
    return renewing, release


async def test_a_refresh_under_way_does_not_undo_a_logout(tmp_path: Path) -> None:
    async with oauth_credential(tmp_path) as (credential, auth):
        renewing, release = await refresh_held_by_the_server(credential, auth)
        logout = asyncio.create_task(credential.logout())  # its first step runs before the answer can arrive
        release.set()
        async with asyncio.timeout(10):
            assert await logout
            assert not await renewing  # nothing to retry with: logged out
        assert not credential.logged_in and credential._proactive is None
        assert await (await credential._context.store()).load("protected") is None


async def test_a_refresh_under_way_does_not_replace_a_newer_login(tmp_path: Path) -> None:
    async with oauth_credential(tmp_path) as (credential, auth):
        renewing, release = await refresh_held_by_the_server(credential, auth)
        await browser_login(credential)  # the user logs in again meanwhile
        newest = credential.headers()
        release.set()
        async with asyncio.timeout(10):
            assert await renewing  # a retry with the current (the new login's) token is worth making
        assert credential.headers() == newest
        record = await (await credential._context.store()).load("protected")
        assert record is not None and f"Bearer {record['tokens']['access_token']}" == newest["Authorization"]


async def test_resource_metadata_missing_for_a_moment_does_not_cost_the_login(tmp_path: Path) -> None:
    """A 404 while the server redeploys (or a 429, a WAF's 403) on the protected resource metadata during a refresh:
    discovery would take the upstream's own origin for the authorization server, which differs from the one the
    login came from. That is no evidence the server changed: the refresh fails for now, the login stays (TOK-5)."""
    async with protected() as (auth, upstream):
        context = OAuthContext(tmp_path / "state", "file")
        credential = credential_for(upstream.url, context)
        try:
            await browser_login(credential)
            upstream.prm_missing = True
            auth.expire_access_tokens()
            with pytest.raises(UpstreamUnavailable, match="will retry"):
                await credential.renew(credential.headers(), Challenge())
            assert credential.logged_in
            upstream.prm_missing = False  # the metadata is back
            assert await credential.renew(credential.headers(), Challenge())
            assert auth.refresh_count == 1
        finally:
            await credential.close()
            await context.close()


async def test_a_browser_login_nobody_waits_for_expires(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`mcpxctl login` interrupted after the start: the flow still ends at its lifetime (SEC-2), its state can no
    longer be redeemed and its loopback listener closes."""
    monkeypatch.setattr(credential_module, "BROWSER_LOGIN_LIFETIME", 0.5)  # ten minutes in real life
    async with oauth_credential(tmp_path) as (credential, _auth):
        flow = await credential.begin_login()
        assert flow.pending is not None and flow.result is not None
        async with asyncio.timeout(10):
            await asyncio.wait({flow.result})
        error = flow.result.exception()
        assert isinstance(error, LoginError) and "expired" in str(error)
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.ClientConnectionError):
                await http.get(flow.pending.redirect_uri + "?state=s&code=c")


async def test_a_refresh_token_rotated_while_the_keyring_hangs_survives_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The keyring took the login, then stops answering; two refreshes rotate the refresh token (the server, strict,
    refuses a rotated-out one and then revokes the whole grant). The first save hangs and is given up, the second is
    refused at once while that call hangs: both go to the file, status says so, no log line or status holds a
    token. The hung call lands late (the first rotation, already stale, into the keyring). The next daemon (a new
    context and store, the keyring answering) refreshes with the last rotated token, and its save goes back to the
    keyring."""
    monkeypatch.setattr(store_module, "KEYRING_TIMEOUT", 0.5)
    state = tmp_path / "state"
    with installed(ControlledKeyring()) as backend:
        async with protected() as (auth, upstream):
            context = OAuthContext(state, "auto")
            credential = credential_for(upstream.url, context)
            seen: list[str] = []
            try:
                await browser_login(credential)
                assert credential.status()["storage"] == "keyring"
                backend.hang()
                with capture_logs() as logs:
                    for _ in range(2):
                        tokens = credential._tokens()
                        assert tokens is not None
                        seen += [tokens["access_token"], tokens["refresh_token"]]
                        auth.expire_access_tokens()
                        assert await credential.renew(credential.headers(), Challenge())
                assert auth.refresh_count == 2
                rotated = credential._tokens()
                assert rotated is not None
                seen += [rotated["access_token"], rotated["refresh_token"]]
                status = credential.status()
                assert status["storage"] == "file"
                assert status["storage_note"] == "the OS keyring did not answer within 0.5 s"
                shown = json.dumps(status) + repr(logs)
                assert not [secret for secret in seen if secret in shown]
                assert "could not store OAuth tokens" not in repr(logs)
            finally:
                await credential.close()
                await context.close()
            # mcpxd stops; the hung call lands: the keyring holds the first rotation, whose refresh token is dead.
            await hung_call_lands(backend)
            assert json.loads(backend.entries[("mcpx", "protected")])["tokens"]["refresh_token"] == seen[3]

            context = OAuthContext(state, "auto")
            following = credential_for(upstream.url, context)
            try:
                await following.prepare()
                assert following.headers() == {"Authorization": f"Bearer {rotated['access_token']}"}
                auth.expire_access_tokens()
                assert await following.renew(following.headers(), Challenge())
                assert auth.refresh_count == 3 and auth.invalid_grant_count == 0 and auth.families_revoked == 0
                # That save went to the keyring again, and the file copy is gone.
                assert following.status()["storage"] == "keyring" and following.status()["storage_note"] is None
                current = following._tokens()
                assert current is not None
                assert json.loads(backend.entries[("mcpx", "protected")])["tokens"] == current
                assert json.loads((state / "oauth-tokens.json").read_text())["upstreams"] == {}
                # A logout removes it everywhere.
                assert await following.logout()
                assert ("mcpx", "protected") not in backend.entries
                assert json.loads((state / "oauth-tokens.json").read_text())["upstreams"] == {}
            finally:
                await following.close()
                await context.close()
