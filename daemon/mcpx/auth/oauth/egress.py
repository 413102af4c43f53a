"""Where OAuth fetches may connect (SEC-7): the resolver and request check of the OAuth HTTP client.

The URLs of OAuth fetches come from the upstream (`resource_metadata`, `authorization_servers`, the endpoints of
the authorization server's metadata), so they may point anywhere. A name is resolved once, every address of the
answer is classified with `ipaddress` (an IPv4-mapped or NAT64 address as the IPv4 address it carries), and the
whole name is refused if any one is not allowed; aiohttp's connector then connects to exactly these addresses,
with no second lookup (DNS rebinding between check and connect). IP literals, which the connector does not pass
to its resolver, are checked before the request by the session's middleware; legacy numeric forms the C library
would read as an IPv4 address (`0177.0.0.1`, `0x7f000001`, `2130706433`, `127.1`) are refused outright.

The rule depends on the upstream's own address (its configured URL: an IP literal as is, else its name looked up
afresh with each new connection, so a laptop that joins or leaves a VPN gets the rule of where it is now):

- never, whatever the upstream: link-local (169.254.0.0/16, with the cloud metadata address, and fe80::/10),
  `fd00:ec2::254` (AWS IPv6 metadata), unspecified (0.0.0.0/8, ::), multicast, broadcast and reserved addresses;
- loopback (127.0.0.0/8, ::1) only when the upstream's own address is loopback;
- private and other non-public addresses (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7, ...) only when the
  upstream's own address is private or loopback: whoever configured an internal server chose that network, but a
  public server's documents pointing inside are refused;
- public addresses always.

An upstream whose name answers with several kinds of address gets the narrowest rule of them. The user's choice of
upstream name is trusted: whoever controls its DNS already receives the upstream's traffic.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
from typing import Final
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.helpers import is_ip_address

from mcpx.auth.oauth.endpoints import EndpointUnreachable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_AWS_IPV6_METADATA: Final = ipaddress.IPv6Address("fd00:ec2::254")
_THIS_NETWORK: Final = ipaddress.IPv4Network("0.0.0.0/8")
_BROADCAST: Final = ipaddress.IPv4Address("255.255.255.255")
# RFC 6052 well-known NAT64 prefix: on an IPv6-only network with DNS64 every IPv4 name answers within it.
_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")


class Reach(enum.IntEnum):
    """What kind of address it is, in order of how far inside it is; also the rule an upstream's own address
    gives its OAuth fetches (an address is allowed when it is not `NEVER` and not beyond the upstream's)."""

    NEVER = 0
    PUBLIC = 1
    PRIVATE = 2
    LOOPBACK = 3


class EgressRefused(EndpointUnreachable):
    """An OAuth fetch was refused before any connection: its host is, or resolves to, an address the rule above
    does not allow. The message names the host, the address and why (never a path, query or secret)."""


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF)
    return None


def classify(address: str | IPAddress) -> tuple[Reach, str]:
    """The kind of `address` and its description for error messages (e.g. `a link-local address`)."""
    if isinstance(address, str):
        address = ipaddress.ip_address(address)
    address = _embedded_ipv4(address) or address
    if address == _AWS_IPV6_METADATA:
        return Reach.NEVER, "the AWS IPv6 instance metadata address"
    if address.is_unspecified or address in _THIS_NETWORK:
        return Reach.NEVER, "an unspecified address"
    if address.is_link_local:
        return Reach.NEVER, "a link-local address"
    if address.is_multicast:
        return Reach.NEVER, "a multicast address"
    if address == _BROADCAST:
        return Reach.NEVER, "the broadcast address"
    # Before the reserved check: ::1 lies in ::/8, which ipaddress counts as reserved.
    if address.is_loopback:
        return Reach.LOOPBACK, "a loopback address"
    if address.is_reserved or (isinstance(address, ipaddress.IPv6Address) and address.is_site_local):
        return Reach.NEVER, "a reserved address"
    if address.is_global:
        return Reach.PUBLIC, "a public address"
    return Reach.PRIVATE, "a private address" if address.is_private else "a non-public address"


def reach_of(addresses: list[IPAddress]) -> Reach:
    """The rule an upstream's own addresses give: the narrowest of them (an address never allowed gives public)."""
    return max(Reach.PUBLIC, min((classify(address)[0] for address in addresses), default=Reach.PUBLIC))


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _legacy_numeric(host: str) -> bool:
    """Whether the C library reads `host` as an IPv4 address although it is not one in dotted-quad form."""
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


def _same_host(a: str, b: str) -> bool:
    return a.rstrip(".").lower() == b.rstrip(".").lower()


def upstream_host(url: str) -> str:
    """The host of an upstream's URL, which decides the rule of its OAuth fetches."""
    return (urlsplit(url).hostname or "").rstrip(".")


class EgressResolver(AbstractResolver):
    """The resolver of one upstream's OAuth client: `lookups` answers (aiohttp's resolver, or a test's), this
    decides. It owns nothing: `lookups` is closed by whoever made it."""

    def __init__(self, upstream: str, lookups: AbstractResolver) -> None:
        self._upstream = upstream
        self._lookups = lookups

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        literal = _literal(host)
        if literal is not None:
            self._check(host, literal, await self.upstream_reach())
            return [
                ResolveResult(
                    hostname=host, host=host, port=port, family=_family(literal), proto=0, flags=socket.AI_NUMERICHOST
                )
            ]
        if _legacy_numeric(host):
            raise EgressRefused(f"refused: {host} is not an IP address in canonical form")
        answers = await self._lookups.resolve(host, port, family)
        if not answers:
            raise OSError(f"{host} has no address")
        addresses = [self._address(host, answer["host"]) for answer in answers]
        reach = reach_of(addresses) if _same_host(host, self._upstream) else await self.upstream_reach()
        for address in addresses:
            self._check(host, address, reach)
        return answers

    async def close(self) -> None:
        pass

    async def upstream_reach(self) -> Reach:
        """The rule the upstream's own address gives (its name looked up now). Raises `EndpointUnreachable` when
        the name does not resolve."""
        literal = _literal(self._upstream)
        if literal is not None:
            return reach_of([literal])
        if not self._upstream:
            return Reach.PUBLIC
        try:
            answers = await self._lookups.resolve(self._upstream, 0, socket.AF_UNSPEC)
        except OSError as exc:
            raise EndpointUnreachable(
                f"cannot resolve {self._upstream}, the upstream's own host, which decides where its OAuth fetches "
                f"may connect: {exc.strerror or type(exc).__name__}"
            ) from None
        return reach_of([address for answer in answers if (address := _literal(answer["host"])) is not None])

    @staticmethod
    def _address(host: str, answer: str) -> IPAddress:
        address = _literal(answer)
        if address is None:
            raise EgressRefused(f"refused: {host} resolves to {answer!r}, which is not an IP address")
        return address

    def _check(self, host: str, address: IPAddress, reach: Reach) -> None:
        kind, description = classify(address)
        if Reach.NEVER < kind <= reach:
            return
        carried = _embedded_ipv4(address)
        shown = f"{address} ({carried})" if carried is not None else str(address)
        what = f"is {description}" if _literal(host) is not None else f"resolves to {shown}, {description}"
        if kind == Reach.NEVER:
            raise EgressRefused(f"refused: {host} {what}")
        needed = "loopback" if kind == Reach.LOOPBACK else "private or loopback"
        raise EgressRefused(
            f"refused: {host} {what}, allowed only when the upstream's own address is {needed} "
            f"({self._upstream} is {reach.name.lower()})"
        )

    async def check_request(
        self, request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        """Session middleware: a host the connector connects to without asking its resolver (an IP literal, by
        aiohttp's own test in `TCPConnector._resolve_host`) is checked here, before any connection."""
        host = request.url.raw_host
        if host is not None and is_ip_address(host):
            literal = _literal(host)
            if literal is None:
                raise EgressRefused(f"refused: {host} is not an IP address in canonical form")
            self._check(host, literal, await self.upstream_reach())
        return await handler(request)


def _family(address: IPAddress) -> int:
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET


def client_session(upstream_url: str, lookups: AbstractResolver) -> aiohttp.ClientSession:
    """The HTTP client of one upstream's OAuth fetches. No proxy from the environment (`trust_env=False`): a proxy
    would resolve the names itself, unchecked."""
    guard = EgressResolver(upstream_host(upstream_url), lookups)
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(resolver=guard),
        trust_env=False,
        middlewares=(guard.check_request,),
    )
