"""Discovery against the real test authorization server: every variant the spec names, and the refusals."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from mcpx.auth.oauth import endpoints
from mcpx.auth.oauth.flow import start_authorization
from mcpx.auth.oauth.metadata import Challenge, DiscoveryError, ServerMetadata, canonical_resource
from mcpx.cli.opener import safe_to_open
from tests.support.oauth_server import AuthServer, MetadataDocumentHost, ProtectedUpstream


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.mark.parametrize("style", ["oauth", "openid"])
@pytest.mark.parametrize("issuer_path", ["", "/tenant1"])
@pytest.mark.parametrize("prm_location", ["path", "root"])
@pytest.mark.parametrize("challenge_header", [True, False])
async def test_discovery_variants(
    http: aiohttp.ClientSession, style: str, issuer_path: str, prm_location: str, challenge_header: bool
) -> None:
    async with AuthServer(metadata_style=style, issuer_path=issuer_path) as auth:  # type: ignore[arg-type]
        upstream = ProtectedUpstream(auth, prm_location=prm_location, challenge_header=challenge_header)  # type: ignore[arg-type]
        async with upstream:
            challenge = await endpoints.probe_challenge(http, upstream.url)
            assert (challenge.resource_metadata is not None) == challenge_header
            resource, server = await endpoints.discover(http, upstream.url, canonical_resource(upstream.url), challenge)
            assert resource is not None and server.issuer == auth.issuer
            assert server.s256


async def test_issuer_mismatch_and_wrong_resource_are_refused(http: aiohttp.ClientSession) -> None:
    async with AuthServer(wrong_issuer_in_metadata=True) as auth, ProtectedUpstream(auth) as upstream:
        with pytest.raises(DiscoveryError, match="names issuer"):
            await endpoints.discover(http, upstream.url, canonical_resource(upstream.url), Challenge())
    async with (
        AuthServer() as auth,
        ProtectedUpstream(auth, prm_resource_override="https://other.example/mcp") as upstream,
    ):
        with pytest.raises(DiscoveryError, match="is for"):
            await endpoints.discover(http, upstream.url, canonical_resource(upstream.url), Challenge())


REFUSED = "(must be https|is not a plain ASCII URL|contains a backslash|is not a valid URL)"
HOSTILE_URLS = [
    "javascript:alert(1)",
    "file:///etc/passwd",
    "http://evil.example/authorize",
    "https://a/$(calc)\r\nX: y",
    "https://as.example/authorize?\x9b31m",  # a C1 control: CSI in many terminals
    "https://as.example/\u202egnp.exe",  # a bidi override: the terminal shows another address
    "https://as.example/authoriz\u0435",  # a Cyrillic e: not the address it looks like
    "https://evil.example\\.as.example/authorize",  # a browser's host is evil.example, urlsplit's another
    "https://[as.example/authorize",  # urlsplit raises ValueError
    "https://as.example:99999/authorize",  # so does .port
]


@pytest.mark.parametrize("endpoint", HOSTILE_URLS)
async def test_hostile_authorization_endpoints_never_become_a_url(http: aiohttp.ClientSession, endpoint: str) -> None:
    async with AuthServer(authorization_endpoint_override=endpoint) as auth, ProtectedUpstream(auth) as upstream:
        with pytest.raises(
            DiscoveryError, match=rf"^authorization_endpoint in the authorization server metadata {REFUSED}"
        ):
            await endpoints.discover(http, upstream.url, canonical_resource(upstream.url), Challenge())


@pytest.mark.parametrize("endpoint", HOSTILE_URLS)
def test_hostile_urls_are_neither_built_nor_opened(endpoint: str) -> None:
    """Past discovery too: the authorization URL is built from a checked endpoint only, and the opener checks what
    it is given again before it starts anything."""
    server = ServerMetadata(
        issuer="https://as.example",
        authorization_endpoint=endpoint,
        token_endpoint="https://as.example/token",
        registration_endpoint=None,
        revocation_endpoint=None,
        device_authorization_endpoint=None,
        scopes_supported=(),
        token_endpoint_auth_methods=(),
        grant_types=None,
        iss_parameter_supported=False,
        client_id_metadata_documents=False,
        s256=True,
    )
    with pytest.raises(DiscoveryError, match=rf"^authorization_endpoint {REFUSED}"):
        start_authorization(server, client_id="c", redirect_uri="http://127.0.0.1:1/callback", resource="r", scopes=())
    assert not safe_to_open(endpoint)
    assert safe_to_open("https://as.example/authorize?client_id=c&state=s%E2%80%AE")


@pytest.mark.parametrize(
    ("prm_location", "challenge_header", "accepted"),
    [("root", False, True), ("root", True, True), ("path", False, False), ("path", True, False)],
)
async def test_only_the_root_metadata_may_name_the_origin(
    http: aiohttp.ClientSession, prm_location: str, challenge_header: bool, accepted: bool
) -> None:
    """RFC 9728 §3.3: the `resource` must be the identifier the metadata URL was built from; the root well-known URL
    is built from the origin, the path-inserted one from the server's URL."""
    async with AuthServer() as auth:
        upstream = ProtectedUpstream(auth, prm_location=prm_location, challenge_header=challenge_header)  # type: ignore[arg-type]
        upstream.prm_resource_override = upstream.url.removesuffix("/mcp")  # its origin
        async with upstream:
            challenge = await endpoints.probe_challenge(http, upstream.url)
            if not accepted:
                with pytest.raises(DiscoveryError, match="is for"):
                    await endpoints.discover(http, upstream.url, canonical_resource(upstream.url), challenge)
                return
            resource, _ = await endpoints.discover(http, upstream.url, canonical_resource(upstream.url), challenge)
            assert resource is not None and resource.resource == upstream.prm_resource_override


async def test_servers_without_resource_metadata_use_their_origin(http: aiohttp.ClientSession) -> None:
    """2025-03-26 servers: the origin is the authorization server, with RFC 8414 metadata or the default endpoints."""
    async with MetadataDocumentHost() as host:
        origin = host.origin
        resource, server = await endpoints.discover(http, f"{origin}/mcp", f"{origin}/mcp", Challenge())
        assert resource is None
        assert (server.issuer, server.authorization_endpoint, server.token_endpoint) == (
            origin,
            f"{origin}/authorize",
            f"{origin}/token",
        )
        assert server.registration_endpoint == f"{origin}/register" and server.s256
        host.publish(
            "/.well-known/oauth-authorization-server",
            {"issuer": origin, "token_endpoint": f"{origin}/oauth/token", "code_challenge_methods_supported": ["S256"]},
        )
        _, server = await endpoints.discover(http, f"{origin}/mcp", f"{origin}/mcp", Challenge())
        assert (server.issuer, server.token_endpoint, server.registration_endpoint) == (
            origin,
            f"{origin}/oauth/token",
            None,
        )
