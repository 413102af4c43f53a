"""Sans-I/O rules of MCP authorization discovery (2026-07-28 `basic/authorization`): challenges, well-known URLs,
and the checks every fetched document must pass before it is used.

- Protected resource metadata (RFC 9728): from the 401's `resource_metadata`, else the path-inserted then the
  root well-known URL; its `resource` must be the MCP server's canonical URI, or, for the document at the root
  well-known URL, the server's origin (RFC 9728 §3.3: the identifier the well-known URL was built from).
- Authorization server metadata: RFC 8414 then OpenID discovery, in the spec's order; its `issuer` must equal
  the issuer the URL was built from; PKCE `S256` must be advertised (the spec: clients MUST refuse otherwise).
- Every URL taken from a document is https, or http to a loopback address (SEC-7, SEC-12), and plain printable
  ASCII: it may be printed for the user or opened in a browser.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

# RFC 9110 §11.2 auth-param: token "=" ( token / quoted-string )
_AUTH_PARAM = re.compile(r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


class DiscoveryError(Exception):
    """A discovery document is missing, malformed or fails a required check; the message says which."""


@dataclass(frozen=True, slots=True)
class Challenge:
    """What a `WWW-Authenticate: Bearer …` header said."""

    resource_metadata: str | None = None
    scope: tuple[str, ...] = ()
    error: str | None = None


def parse_bearer_challenge(header: str | None) -> Challenge:
    """The Bearer challenge's parameters; an absent or non-Bearer header gives an empty `Challenge`."""
    if not header:
        return Challenge()
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return Challenge()
    params: dict[str, str] = {}
    for match in _AUTH_PARAM.finditer(rest):
        quoted, token = match.group(2), match.group(3)
        value = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else token
        params.setdefault(match.group(1).lower(), value)
    return Challenge(
        resource_metadata=params.get("resource_metadata") or None,
        scope=tuple(params.get("scope", "").split()),
        error=params.get("error") or None,
    )


def canonical_resource(url: str) -> str:
    """The MCP server's canonical URI (RFC 8707 as profiled by MCP): lower-case scheme and host, no fragment,
    no trailing slash."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), path, parts.query, ""))


def origin_of(url: str) -> str:
    """`scheme://host[:port]` of a URL, lower-cased: the resource identifier the root well-known URL stands for."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), "", "", ""))


def is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: object, what: str) -> str:
    """A URL mcpx takes from a document or a server, and may print or open: https, or http to loopback only; no
    credentials, no fragment; and plain printable ASCII (RFC 3986 characters only), so that what a terminal shows
    is exactly the address (no control characters such as C1 `\x9b`, no bidi overrides, no look-alike letters)."""
    if not isinstance(url, str) or not url:
        raise DiscoveryError(f"{what} is missing")
    if not all("!" <= char <= "~" for char in url):
        raise DiscoveryError(f"{what} is not a plain ASCII URL: it contains spaces, control or non-ASCII characters")
    if "\\" in url:  # browsers read it as "/" (WHATWG URL), urlsplit does not: the host would differ
        raise DiscoveryError(f"{what} contains a backslash")
    try:
        parts = urlsplit(url)
        hostname, _ = parts.hostname, parts.port
    except ValueError:  # an unclosed or misplaced "[", a port that is not a number
        raise DiscoveryError(f"{what} is not a valid URL") from None
    if parts.scheme == "https" or (parts.scheme == "http" and is_loopback(hostname)):
        if not hostname:
            raise DiscoveryError(f"{what} has no host")
        if parts.username is not None or parts.password is not None or parts.fragment:
            raise DiscoveryError(f"{what} must not carry credentials or a fragment")
        return url
    raise DiscoveryError(f"{what} must be https (or http to a loopback address): refused {parts.scheme or '?'}: URL")


def protected_resource_urls(server_url: str) -> list[str]:
    """Where to look for the protected resource metadata when the challenge gives no URL: path-inserted, then
    root (2026-07-28 `authorization-server-discovery`)."""
    parts = urlsplit(server_url)
    root = urlunsplit((parts.scheme, parts.netloc, "/.well-known/oauth-protected-resource", "", ""))
    path = parts.path.rstrip("/")
    return [root + path, root] if path else [root]


def authorization_server_urls(issuer: str) -> list[str]:
    """Where to look for the authorization server's metadata, in the spec's order (RFC 8414, then OpenID)."""
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")

    def at(well_known_path: str) -> str:
        return urlunsplit((parts.scheme, parts.netloc, well_known_path, "", ""))

    if path:
        return [
            at(f"/.well-known/oauth-authorization-server{path}"),
            at(f"/.well-known/openid-configuration{path}"),
            at(f"{path}/.well-known/openid-configuration"),
        ]
    return [at("/.well-known/oauth-authorization-server"), at("/.well-known/openid-configuration")]


@dataclass(frozen=True, slots=True)
class ResourceMetadata:
    resource: str
    authorization_servers: tuple[str, ...]
    scopes_supported: tuple[str, ...]


def validate_resource_metadata(
    document: Any, expected_resource: str, *, source: str, at_root: bool = False
) -> ResourceMetadata:
    """The checked document. Its `resource` must name the MCP server (`expected_resource`); a document found at the
    root well-known URL (`at_root`) may name the server's origin instead, which is what that URL stands for."""
    if not isinstance(document, Mapping):
        raise DiscoveryError(f"the protected resource metadata at {source} is not a JSON object")
    resource = document.get("resource")
    accepted = {canonical_resource(expected_resource)}
    if at_root:
        accepted.add(origin_of(expected_resource))
    if not isinstance(resource, str) or canonical_resource(resource) not in accepted:
        raise DiscoveryError(
            f"the protected resource metadata at {source} is for {resource!r}, not for {expected_resource!r}"
        )
    servers = document.get("authorization_servers")
    if not isinstance(servers, list) or not servers or not all(isinstance(server, str) for server in servers):
        raise DiscoveryError(f"the protected resource metadata at {source} lists no authorization server")
    for server in servers:
        check_url(server, "an authorization server in the protected resource metadata")
    scopes = document.get("scopes_supported")
    scope_list = tuple(scope for scope in scopes if isinstance(scope, str)) if isinstance(scopes, list) else ()
    return ResourceMetadata(resource, tuple(servers), scope_list)


@dataclass(frozen=True, slots=True)
class ServerMetadata:
    """The parts of authorization server metadata mcpx uses, already checked."""

    issuer: str
    authorization_endpoint: str | None
    token_endpoint: str
    registration_endpoint: str | None
    revocation_endpoint: str | None
    device_authorization_endpoint: str | None
    scopes_supported: tuple[str, ...]
    token_endpoint_auth_methods: tuple[str, ...]
    # `grant_types_supported`, or None when the document does not say (RFC 8414's default then applies).
    grant_types: tuple[str, ...] | None
    iss_parameter_supported: bool
    client_id_metadata_documents: bool
    s256: bool


def validate_server_metadata(document: Any, expected_issuer: str, *, source: str) -> ServerMetadata:
    if not isinstance(document, Mapping):
        raise DiscoveryError(f"the authorization server metadata at {source} is not a JSON object")
    issuer = document.get("issuer")
    # RFC 8414 §3.3: the issuer must be identical to the one the well-known URL was built from.
    if issuer != expected_issuer:
        raise DiscoveryError(
            f"the authorization server metadata at {source} names issuer {issuer!r}, expected {expected_issuer!r}"
        )

    def optional_url(key: str) -> str | None:
        value = document.get(key)
        return None if value is None else check_url(value, f"{key} in the authorization server metadata")

    def strings(key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = document.get(key)
        if not isinstance(value, list):
            return default
        return tuple(item for item in value if isinstance(item, str))

    methods = strings("code_challenge_methods_supported")
    return ServerMetadata(
        issuer=issuer,
        authorization_endpoint=optional_url("authorization_endpoint"),
        token_endpoint=check_url(document.get("token_endpoint"), "token_endpoint in the authorization server metadata"),
        registration_endpoint=optional_url("registration_endpoint"),
        revocation_endpoint=optional_url("revocation_endpoint"),
        device_authorization_endpoint=optional_url("device_authorization_endpoint"),
        scopes_supported=strings("scopes_supported"),
        token_endpoint_auth_methods=strings("token_endpoint_auth_methods_supported", ("client_secret_basic",)),
        grant_types=strings("grant_types_supported") if "grant_types_supported" in document else None,
        iss_parameter_supported=document.get("authorization_response_iss_parameter_supported") is True,
        client_id_metadata_documents=document.get("client_id_metadata_document_supported") is True,
        s256="S256" in methods,
    )


def choose_scopes(
    challenge: Challenge, resource: ResourceMetadata | None, configured: tuple[str, ...] | None
) -> tuple[str, ...]:
    """Scope selection (2026-07-28 `authorization` "Scope Selection Strategy"): the configured scopes if the user
    set them, else the challenge's, else everything the resource supports, else none."""
    if configured is not None:
        return configured
    if challenge.scope:
        return challenge.scope
    return resource.scopes_supported if resource is not None else ()


def merge_scopes(*groups: tuple[str, ...]) -> tuple[str, ...]:
    """The union of scope lists, in first-seen order (step-up asks for what was granted plus what is needed)."""
    merged: dict[str, None] = {}
    for group in groups:
        merged.update(dict.fromkeys(group))
    return tuple(merged)
