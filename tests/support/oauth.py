"""mcpx's side of the OAuth tests: an authorization server with a protected upstream, a sandbox configured for it,
`mcpxctl login`, and an in-process `OAuthCredential` against the fixture servers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from mcpx.auth.oauth.credential import OAuthContext, OAuthCredential
from mcpx.config.model import OAuthAuth, UpstreamConfig
from tests.support import browser
from tests.support.daemon import Sandbox, mcpxctl, upstream_toml
from tests.support.oauth_server import AuthServer, ProtectedUpstream, follow_authorization


@asynccontextmanager
async def protected(
    upstream_options: dict[str, Any] | None = None, **auth_options: Any
) -> AsyncIterator[tuple[AuthServer, ProtectedUpstream]]:
    """An `AuthServer` (with `auth_options`) and a `ProtectedUpstream` it protects, both stopped on exit (the
    authorization server too when the upstream fails to start)."""
    async with (
        AuthServer(**auth_options) as auth,
        ProtectedUpstream(auth, **(upstream_options or {})) as upstream,
    ):
        yield auth, upstream


def oauth_config(sandbox: Sandbox, upstream: ProtectedUpstream, daemon: str = "", **auth: object) -> None:
    """The sandbox's config: `upstream` as "protected" with `oauth` auth (plus `auth`), tokens in the file store,
    and the scripted browser as `$BROWSER`."""
    sandbox.env["BROWSER"] = browser.COMMAND
    sandbox.write_config(
        f'[daemon]\ntoken_store = "file"\n{daemon}\n'
        + upstream_toml("protected", upstream.url, auth={"type": "oauth", **auth})
    )


async def login(sandbox: Sandbox, *extra: str) -> tuple[int, str, str]:
    """`mcpxctl login protected [extra…]`: exit code, stdout, stderr."""
    return await mcpxctl(sandbox, "login", "protected", *extra)


def refreshed(auth: AuthServer) -> asyncio.Event:
    """An event set when the authorization server has answered a refresh (wraps its grant handler)."""
    event = asyncio.Event()
    grant = auth._grant_refresh

    async def observed(request: Any, form: dict[str, str]) -> dict[str, Any]:
        try:
            return await grant(request, form)
        finally:
            event.set()

    auth._grant_refresh = observed  # type: ignore[method-assign]
    return event


def credential_for(url: str, context: OAuthContext, **oauth: Any) -> OAuthCredential:
    """The credential of an upstream "protected" at `url` with `oauth` auth (plus `oauth`), as mcpxd makes it."""
    config = UpstreamConfig(name="protected", url=url, auth=OAuthAuth(type="oauth", **oauth))
    assert isinstance(config.auth, OAuthAuth)
    return OAuthCredential(config, config.auth, context)


@asynccontextmanager
async def oauth_credential(
    tmp_path: Path, oauth: dict[str, Any] | None = None, **auth_options: Any
) -> AsyncIterator[tuple[OAuthCredential, AuthServer]]:
    """In process: an `OAuthCredential` (`oauth` auth options) for a `ProtectedUpstream` of an `AuthServer`
    (`auth_options`), its tokens in a file store under `tmp_path`."""
    async with protected(**auth_options) as (auth, upstream):
        context = OAuthContext(tmp_path / "state", "file")
        credential = credential_for(upstream.url, context, **(oauth or {}))
        try:
            yield credential, auth
        finally:
            await credential.close()
            await context.close()


async def browser_login(credential: OAuthCredential) -> None:
    """A browser login of `credential` in process: the browser follows the authorization URL (auto-approved) and
    the address it lands on is handed over as pasted."""
    flow = await credential.begin_login()
    assert flow.pending is not None
    credential.finish_login(await follow_authorization(flow.pending.url))
    await credential.wait_login(flow, timeout=20)
