"""An OAuth upstream's credential in process (daemon/mcpx/auth/oauth/credential.py) against the fixture
authorization server: which client each request uses, revocation at logout, what is stored and adopted."""

from __future__ import annotations

from pathlib import Path

from tests.support.oauth import browser_login, oauth_credential


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
