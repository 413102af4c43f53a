"""Where OAuth fetches may connect (SEC-7, daemon/mcpx/auth/oauth/egress.py): the address classifier, the resolver
with scripted name lookups, and the OAuth HTTP client against a loopback server that counts its connections."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from mcpx.auth.oauth import egress, endpoints
from mcpx.auth.oauth.credential import LoginError, OAuthContext
from mcpx.auth.oauth.egress import EgressRefused, EgressResolver, Reach, classify
from mcpx.auth.oauth.endpoints import EndpointUnreachable
from mcpx.auth.oauth.metadata import Challenge, DiscoveryError, canonical_resource, check_url
from tests.support.oauth import credential_for, protected
from tests.support.scripted_http import RawRequest, ScriptedHttp

PUBLIC_UPSTREAM = "https://mcp.example/mcp"
PRIVATE_UPSTREAM = "https://jira.corp/mcp"
LOOPBACK_UPSTREAM = "https://dev.box/mcp"


class Lookups(AbstractResolver):
    """Name lookups as a test scripts them: each name's addresses (or the error its lookup raises); a name in
    `rebound` answers its addresses there from the second lookup on. Every lookup is recorded in `calls`."""

    def __init__(self, answers: dict[str, list[str] | OSError], rebound: dict[str, list[str]] | None = None) -> None:
        self.answers = {
            "mcp.example": ["93.184.216.34"],
            "jira.corp": ["10.1.1.1"],
            "dev.box": ["127.0.0.1"],
            **answers,
        }
        self.rebound = rebound or {}
        self.calls: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        name = host.rstrip(".")
        self.calls.append(name)
        answer = self.answers.get(name)
        if name in self.rebound and self.calls.count(name) > 1:
            answer = self.rebound[name]
        if answer is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if isinstance(answer, OSError):
            raise answer
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in answer
        ]

    async def close(self) -> None:
        pass


# --- the classifier ----------------------------------------------------------------------------------------------

NEVER = [
    ("169.254.169.254", "a link-local address"),
    ("169.254.0.1", "a link-local address"),
    ("169.254.255.255", "a link-local address"),
    ("fe80::1", "a link-local address"),
    ("fe80::1%eth0", "a link-local address"),
    ("fd00:ec2::254", "the AWS IPv6 instance metadata address"),
    ("::ffff:169.254.169.254", "a link-local address"),
    ("::ffff:a9fe:a9fe", "a link-local address"),
    ("64:ff9b::a9fe:a9fe", "a link-local address"),  # NAT64 of 169.254.169.254
    ("0.0.0.0", "an unspecified address"),
    ("0.1.2.3", "an unspecified address"),
    ("::", "an unspecified address"),
    ("::ffff:0.0.0.0", "an unspecified address"),
    ("224.0.0.1", "a multicast address"),
    ("ff02::1", "a multicast address"),
    ("255.255.255.255", "the broadcast address"),
    ("240.0.0.1", "a reserved address"),
    ("fec0::1", "a reserved address"),
    ("::1.2.3.4", "a reserved address"),  # IPv4-compatible (deprecated)
]


@pytest.mark.parametrize(("address", "description"), NEVER)
def test_addresses_never_allowed(address: str, description: str) -> None:
    assert classify(address) == (Reach.NEVER, description)


@pytest.mark.parametrize(
    ("address", "reach"),
    [
        ("127.0.0.1", Reach.LOOPBACK),
        ("127.255.255.254", Reach.LOOPBACK),
        ("::1", Reach.LOOPBACK),
        ("::ffff:127.0.0.1", Reach.LOOPBACK),
        ("10.0.0.1", Reach.PRIVATE),
        ("172.16.0.1", Reach.PRIVATE),
        ("172.31.255.254", Reach.PRIVATE),
        ("192.168.1.1", Reach.PRIVATE),
        ("100.64.0.1", Reach.PRIVATE),  # CGNAT (Tailscale)
        ("fc00::1", Reach.PRIVATE),
        ("fd7a:115c:a1e0::1", Reach.PRIVATE),
        ("::ffff:10.0.0.1", Reach.PRIVATE),
        ("8.8.8.8", Reach.PUBLIC),
        ("172.32.0.1", Reach.PUBLIC),
        ("2606:4700:4700::1111", Reach.PUBLIC),
        ("::ffff:8.8.8.8", Reach.PUBLIC),
        ("64:ff9b::808:808", Reach.PUBLIC),  # NAT64 of 8.8.8.8 (IPv6-only networks with DNS64)
    ],
)
def test_address_kinds(address: str, reach: Reach) -> None:
    assert classify(address)[0] == reach


# --- the resolver -------------------------------------------------------------------------------------------------


def guard(upstream_url: str, lookups: Lookups) -> EgressResolver:
    return EgressResolver(egress.upstream_host(upstream_url), lookups)


@pytest.mark.parametrize(
    ("upstream", "target", "allowed"),
    [
        (PUBLIC_UPSTREAM, "8.8.4.4", True),
        (PUBLIC_UPSTREAM, "10.2.2.2", False),
        (PUBLIC_UPSTREAM, "192.168.0.10", False),
        (PUBLIC_UPSTREAM, "fd12::1", False),
        (PUBLIC_UPSTREAM, "127.0.0.1", False),
        (PUBLIC_UPSTREAM, "::1", False),
        (PRIVATE_UPSTREAM, "8.8.4.4", True),
        (PRIVATE_UPSTREAM, "10.2.2.2", True),
        (PRIVATE_UPSTREAM, "100.100.1.1", True),
        (PRIVATE_UPSTREAM, "127.0.0.1", False),
        (PRIVATE_UPSTREAM, "::ffff:127.0.0.1", False),
        (LOOPBACK_UPSTREAM, "8.8.4.4", True),
        (LOOPBACK_UPSTREAM, "10.2.2.2", True),
        (LOOPBACK_UPSTREAM, "127.0.0.1", True),
        (LOOPBACK_UPSTREAM, "::1", True),
        (LOOPBACK_UPSTREAM, "169.254.169.254", False),
        (LOOPBACK_UPSTREAM, "fd00:ec2::254", False),
        ("http://127.0.0.1:8000/mcp", "127.0.0.1", True),
        ("http://[::1]:8000/mcp", "127.0.0.1", True),
        ("https://10.0.0.1/mcp", "10.2.2.2", True),
        ("https://10.0.0.1/mcp", "127.0.0.1", False),
        ("https://8.8.8.8/mcp", "10.2.2.2", False),
    ],
)
async def test_what_an_upstream_allows(upstream: str, target: str, allowed: bool) -> None:
    """Loopback only for a loopback upstream, private ranges only for a private or loopback one (SEC-7)."""
    lookups = Lookups({"sso.test": [target]})
    resolver = guard(upstream, lookups)
    if allowed:
        answers = await resolver.resolve("sso.test", 443, socket.AF_UNSPEC)
        assert [answer["host"] for answer in answers] == [target]
    else:
        with pytest.raises(EgressRefused, match=r"^refused: sso\.test resolves to "):
            await resolver.resolve("sso.test", 443, socket.AF_UNSPEC)


async def test_an_upstream_given_as_an_address_needs_no_lookup() -> None:
    lookups = Lookups({"sso.test": ["10.2.2.2"]})
    await guard("https://10.0.0.1/mcp", lookups).resolve("sso.test", 443)
    assert lookups.calls == ["sso.test"]


async def test_the_refusal_says_what_and_why() -> None:
    lookups = Lookups(
        {"sso.example": ["169.254.169.254"], "sso.corp": ["10.9.9.9"], "mapped.test": ["::ffff:a9fe:a9fe"]}
    )
    resolver = guard(LOOPBACK_UPSTREAM, lookups)
    with pytest.raises(EgressRefused) as refused:
        await resolver.resolve("sso.example", 443)
    assert str(refused.value) == "refused: sso.example resolves to 169.254.169.254, a link-local address"
    with pytest.raises(EgressRefused) as refused:
        await resolver.resolve("mapped.test", 443)
    assert (
        str(refused.value)
        == "refused: mapped.test resolves to ::ffff:a9fe:a9fe (169.254.169.254), a link-local address"
    )
    with pytest.raises(EgressRefused) as refused:
        await guard(PUBLIC_UPSTREAM, lookups).resolve("sso.corp", 443)
    assert str(refused.value) == (
        "refused: sso.corp resolves to 10.9.9.9, a private address, allowed only when the upstream's own address is "
        "private or loopback (mcp.example is public)"
    )


@pytest.mark.parametrize(
    "answer",
    [
        ["93.184.216.34", "10.0.0.1"],
        ["10.0.0.1", "93.184.216.34"],
        ["93.184.216.34", "127.0.0.1"],
        ["93.184.216.34", "169.254.169.254"],
        ["2606:4700:4700::1111", "fe80::1"],
    ],
)
async def test_one_internal_answer_refuses_the_name(answer: list[str]) -> None:
    with pytest.raises(EgressRefused):
        await guard(PUBLIC_UPSTREAM, Lookups({"mixed.test": answer})).resolve("mixed.test", 443)


async def test_a_link_local_answer_is_refused_even_for_a_loopback_upstream() -> None:
    with pytest.raises(EgressRefused, match="link-local"):
        await guard(LOOPBACK_UPSTREAM, Lookups({"mixed.test": ["127.0.0.1", "169.254.169.254"]})).resolve(
            "mixed.test", 443
        )


async def test_an_upstream_with_mixed_answers_gets_the_narrowest_rule() -> None:
    lookups = Lookups({"split.test": ["10.0.0.1", "93.184.216.34"], "sso.test": ["10.2.2.2"]})
    with pytest.raises(EgressRefused, match=r"\(split\.test is public\)"):
        await guard("https://split.test/mcp", lookups).resolve("sso.test", 443)


async def test_the_upstreams_own_name_is_looked_up_once_with_the_target() -> None:
    """A fetch from the upstream's own host takes its rule from the same answer: one lookup, not two."""
    lookups = Lookups({})
    await guard(PRIVATE_UPSTREAM, lookups).resolve("jira.corp", 443)
    assert lookups.calls == ["jira.corp"]


async def test_the_upstreams_rule_follows_its_current_address() -> None:
    """Looked up afresh for each new connection: the upstream's name moved from private to public (off the VPN)."""
    lookups = Lookups({"sso.corp": ["10.2.2.2"]}, rebound={"jira.corp": ["93.184.216.34"]})
    resolver = guard(PRIVATE_UPSTREAM, lookups)
    await resolver.resolve("sso.corp", 443)
    with pytest.raises(EgressRefused, match=re.escape("jira.corp is public")):
        await resolver.resolve("sso.corp", 443)


async def test_dns_failure() -> None:
    """A name that does not resolve fails as aiohttp expects of a resolver (OSError); the upstream's own name not
    resolving is an unreachable endpoint naming it."""
    with pytest.raises(socket.gaierror):
        await guard(LOOPBACK_UPSTREAM, Lookups({})).resolve("gone.test", 443)
    with pytest.raises(OSError, match="has no address"):
        await guard(LOOPBACK_UPSTREAM, Lookups({"empty.test": []})).resolve("empty.test", 443)
    lookups = Lookups({"sso.test": ["8.8.4.4"], "mcp.example": socket.gaierror(socket.EAI_AGAIN, "Temporary failure")})
    with pytest.raises(EndpointUnreachable, match=r"cannot resolve mcp\.example, the upstream's own") as failed:
        await guard(PUBLIC_UPSTREAM, lookups).resolve("sso.test", 443)
    assert not isinstance(failed.value, EgressRefused)


async def test_an_answer_that_is_not_an_address_is_refused() -> None:
    with pytest.raises(EgressRefused, match="not an IP address"):
        await guard(LOOPBACK_UPSTREAM, Lookups({"odd.test": ["localhost"]})).resolve("odd.test", 443)


async def test_a_rebinding_name_is_checked_at_every_lookup() -> None:
    """A `1.1.1.1.nip.io`-style name: public at first, then 127.0.0.1; each answer is checked where it is used."""
    lookups = Lookups({"rebind.test": ["93.184.216.35"]}, rebound={"rebind.test": ["127.0.0.1"]})
    resolver = guard(PUBLIC_UPSTREAM, lookups)
    assert [answer["host"] for answer in await resolver.resolve("rebind.test", 443)] == ["93.184.216.35"]
    with pytest.raises(EgressRefused, match=re.escape("127.0.0.1, a loopback address")):
        await resolver.resolve("rebind.test", 443)


@pytest.mark.parametrize("host", ["0177.0.0.1", "0x7f000001", "2130706433", "127.1", "0x7f.1", "017700000001"])
async def test_legacy_numeric_hosts_are_refused_without_a_lookup(host: str) -> None:
    """Forms the C library reads as 127.0.0.1: refused even for a loopback upstream, and never looked up."""
    lookups = Lookups({})
    with pytest.raises(EgressRefused, match="not an IP address in canonical form"):
        await guard(LOOPBACK_UPSTREAM, lookups).resolve(host, 443)
    assert lookups.calls == []


# --- the OAuth HTTP client ----------------------------------------------------------------------------------------

OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"


def recorder(response: bytes = OK_RESPONSE) -> ScriptedHttp:
    """A server on 127.0.0.1 that counts the connections it accepts and answers each request with `response`."""

    async def answer(_: RawRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(response)
        await writer.drain()

    return ScriptedHttp(answer)


@asynccontextmanager
async def oauth_http(tmp_path: Path, upstream_url: str, lookups: Lookups) -> AsyncIterator[aiohttp.ClientSession]:
    """The OAuth HTTP client mcpxd uses for the upstream at `upstream_url`, its lookups scripted."""
    context = OAuthContext(tmp_path / "state", "file", resolver=lookups)
    try:
        yield context.http(upstream_url)
    finally:
        await context.close()


async def fetch(http: aiohttp.ClientSession, url: str) -> int:
    async with asyncio.timeout(10), http.get(url, allow_redirects=False) as response:
        await response.read()
        return response.status


async def refused_without_connecting(
    tmp_path: Path, upstream_url: str, lookups: Lookups, host: str, *, path: str = "/", match: str | None = None
) -> None:
    """A fetch of `http://host:<port>path` by the OAuth client of `upstream_url` is refused (`match`), and the
    server listening there sees no connection."""
    async with recorder() as server:
        async with oauth_http(tmp_path, upstream_url, lookups) as http:
            with pytest.raises(EgressRefused, match=match):
                await fetch(http, f"http://{host}:{server.port}{path}")
        assert server.connections == 0


async def test_a_refused_name_makes_no_connection(tmp_path: Path) -> None:
    """A public upstream's document names a host that resolves to this machine: nothing connects to it."""
    lookups = Lookups({"sso.internal": ["127.0.0.1"]})
    await refused_without_connecting(
        tmp_path,
        PUBLIC_UPSTREAM,
        lookups,
        "sso.internal",
        path="/.well-known/oauth-authorization-server",
        match=r"sso\.internal resolves to 127\.0\.0\.1, a loopback",
    )


async def test_a_refused_ip_literal_makes_no_connection(tmp_path: Path) -> None:
    """aiohttp connects to IP literals without asking its resolver: the session's middleware checks them."""
    match = r"^refused: 127\.0\.0\.1 is a loopback address, allowed"
    await refused_without_connecting(tmp_path, PUBLIC_UPSTREAM, Lookups({}), "127.0.0.1", path="/token", match=match)


@pytest.mark.parametrize(
    "host",
    ["0.0.0.0", "[::]", "0177.0.0.1", "0x7f000001", "2130706433", "127.1", "[::ffff:127.0.0.1]", "[fe80::1%25lo]"],
)
async def test_internal_literals_are_refused_before_any_connection(tmp_path: Path, host: str) -> None:
    """Every spelling of this machine (0.0.0.0 connects to it on Linux; the legacy forms are 127.0.0.1 to the C
    library) is refused before a connection, for a private upstream; the legacy forms even for a loopback one."""
    # ::ffff:127.0.0.1 is loopback, which a loopback upstream may fetch from.
    upstreams = [PRIVATE_UPSTREAM] if host == "[::ffff:127.0.0.1]" else [PRIVATE_UPSTREAM, LOOPBACK_UPSTREAM]
    for upstream in upstreams:
        lookups = Lookups({})
        await refused_without_connecting(tmp_path, upstream, lookups, host)
        assert lookups.calls in ([], [egress.upstream_host(upstream)])


async def test_localhost_with_a_dot_is_loopback(tmp_path: Path) -> None:
    lookups = Lookups({"localhost": ["127.0.0.1", "::1"]})
    await refused_without_connecting(tmp_path, PUBLIC_UPSTREAM, lookups, "localhost.", match="a loopback address")


async def test_the_address_checked_is_the_address_connected_to(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS pinning (TOCTOU): the name is looked up once, through the guard, and connected to at that answer; its
    next answer (169.254.169.254) is never asked for, and the OS resolver is never invoked."""

    def no_os_lookup(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"the OS resolver was asked for {args[0]!r}")

    monkeypatch.setattr(socket, "getaddrinfo", no_os_lookup)
    async with recorder() as server:
        lookups = Lookups({"rebind.test": ["127.0.0.1"]}, rebound={"rebind.test": ["169.254.169.254"]})
        async with oauth_http(tmp_path, f"http://127.0.0.1:{server.port}/mcp", lookups) as http:
            assert await fetch(http, f"http://rebind.test:{server.port}/") == 200
        assert lookups.calls == ["rebind.test"]
        assert server.connections == 1


async def test_every_redirect_hop_is_checked(tmp_path: Path) -> None:
    """mcpx does not follow redirects; were one followed, its next hop goes through the same check."""
    redirect = (
        b"HTTP/1.1 302 Found\r\nLocation: http://169.254.169.254/latest/meta-data/\r\nContent-Length: 0\r\n"
        b"Connection: close\r\n\r\n"
    )
    async with recorder(redirect) as server:
        async with oauth_http(tmp_path, f"http://127.0.0.1:{server.port}/mcp", Lookups({})) as http:
            assert await fetch(http, f"http://127.0.0.1:{server.port}/prm") == 302
            with pytest.raises(EgressRefused, match=re.escape("169.254.169.254 is a link-local address")):
                async with asyncio.timeout(10), http.get(f"http://127.0.0.1:{server.port}/prm") as response:
                    await response.read()
        assert server.connections == 2


async def test_discovery_refused_is_an_unreachable_endpoint_with_the_reason(tmp_path: Path) -> None:
    """Through `endpoints`: the refusal is not wrapped into a bare exception name, and nothing connects."""
    async with recorder() as server:
        lookups = Lookups({"sso.internal": ["127.0.0.1"]})
        challenge = Challenge(
            resource_metadata=f"https://sso.internal:{server.port}/.well-known/oauth-protected-resource"
        )
        async with oauth_http(tmp_path, PUBLIC_UPSTREAM, lookups) as http:
            with pytest.raises(EndpointUnreachable, match=re.escape("refused: sso.internal resolves to 127.0.0.1")):
                await endpoints.discover(http, PUBLIC_UPSTREAM, canonical_resource(PUBLIC_UPSTREAM), challenge)
            lookups.answers["gone.test"] = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            gone = Challenge(resource_metadata="https://gone.test/.well-known/oauth-protected-resource")
            with pytest.raises(EndpointUnreachable, match=re.escape("cannot fetch https://gone.test/")) as failed:
                await endpoints.discover(http, PUBLIC_UPSTREAM, canonical_resource(PUBLIC_UPSTREAM), gone)
            assert not isinstance(failed.value, EgressRefused)
        assert server.connections == 0


def test_userinfo_in_a_document_url_is_refused() -> None:
    with pytest.raises(DiscoveryError, match="credentials"):
        check_url("https://good@evil.example/token", "token_endpoint")


# --- logins -------------------------------------------------------------------------------------------------------


async def test_a_login_whose_authorization_server_is_internal_fails_with_the_reason(tmp_path: Path) -> None:
    """A loopback upstream whose resource metadata names an authorization server at 0.0.0.0 (which would reach
    this machine): the login fails naming the host and why, and the server there sees no connection."""
    async with protected() as (_, upstream), recorder() as server:
        upstream_prm: Callable[[], dict[str, Any]] = upstream.prm

        def prm() -> dict[str, Any]:
            return {**upstream_prm(), "authorization_servers": [f"https://sso.internal:{server.port}"]}

        upstream.prm = prm  # type: ignore[method-assign]
        context = OAuthContext(tmp_path / "state", "file", resolver=Lookups({"sso.internal": ["0.0.0.0"]}))
        credential = credential_for(upstream.url, context)
        try:
            with pytest.raises(LoginError, match=r"refused: sso\.internal resolves to 0\.0\.0\.0, an unspecified"):
                await credential.begin_login()
        finally:
            await credential.close()
            await context.close()
        assert server.connections == 0
