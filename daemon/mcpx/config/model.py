"""The validated, immutable shape of mcpx's configuration (pydantic models, `extra="forbid"`, frozen)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Final, Literal, get_args
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mcpx.auth.oauth.metadata import DiscoveryError, check_url

# Characters valid in MCP tool names (2025-11-25 server/tools "Tool names"): an upstream's name becomes the
# prefix of its tools' names, so it is held to the same alphabet.
UPSTREAM_NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 token
# Headers mcpx owns on upstream requests; configuring them would break the protocol or the auth model.
RESERVED_HEADERS = frozenset(
    {
        "accept",
        "content-type",
        "content-length",
        "host",
        "mcp-session-id",
        "mcp-protocol-version",
        "last-event-id",
        "mcp-method",
        "mcp-name",
    }
)
# Headers of this prefix mirror tool arguments (protocol 2026-07-28 `x-mcp-header`): set by mcpx per call.
RESERVED_HEADER_PREFIX = "mcp-param-"


def is_reserved_header(name: str) -> bool:
    """Whether mcpx sets the header `name` itself (a user may not configure it)."""
    lowered = name.lower()
    return lowered in RESERVED_HEADERS or lowered.startswith(RESERVED_HEADER_PREFIX)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoAuth(_Strict):
    type: Literal["none"] = "none"


class BearerEnvAuth(_Strict):
    """`Authorization: Bearer <value of the environment variable>`."""

    type: Literal["bearer_env"]
    env: Annotated[str, Field(min_length=1)]


class BearerFileAuth(_Strict):
    """`Authorization: Bearer <first non-empty line of the file>`; re-read when the file changes."""

    type: Literal["bearer_file"]
    path: Path

    @field_validator("path")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()


class StaticHeaderAuth(_Strict):
    """One header with a fixed value; `${VAR}` in the value is taken from the environment."""

    type: Literal["static_header"]
    header: Annotated[str, Field(pattern=HEADER_NAME.pattern)]
    value: str

    @field_validator("header")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if is_reserved_header(value):
            raise ValueError(f"header {value!r} is set by mcpx itself")
        return value


def _scope_list(value: object) -> object:
    """Scopes may be written as one space-separated string (as OAuth sends them) or as a list."""
    return tuple(value.split()) if isinstance(value, str) else value


def _oauth_url(value: str | None, what: str) -> str | None:
    """A URL mcpx hands to authorization servers: held to the rule of every OAuth URL (`metadata.check_url`)."""
    if value is None:
        return None
    try:
        return check_url(value, what)
    except DiscoveryError as exc:
        raise ValueError(str(exc)) from None


class _OAuthCommon(_Strict):
    client_id: Annotated[str, Field(min_length=1)] | None = None
    client_secret: Annotated[str, Field(min_length=1)] | None = None
    client_secret_env: Annotated[str, Field(min_length=1)] | None = None
    scopes: tuple[str, ...] | None = None
    # Overrides the canonical URI of the MCP server sent as the RFC 8707 `resource` parameter.
    resource: str | None = None

    _split_scopes = field_validator("scopes", mode="before")(classmethod(lambda cls, value: _scope_list(value)))

    @field_validator("resource")
    @classmethod
    def _resource_url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.fragment:
                raise ValueError("must be an absolute http(s) URL without a fragment")
        return value

    @model_validator(mode="after")
    def _one_secret_source(self) -> _OAuthCommon:
        if self.client_secret is not None and self.client_secret_env is not None:
            raise ValueError("give `client_secret` or `client_secret_env`, not both")
        if (self.client_secret or self.client_secret_env) and self.client_id is None:
            raise ValueError("a client secret needs its `client_id`")
        return self


class OAuthAuth(_OAuthCommon):
    """OAuth 2.1 authorization code + PKCE, as the MCP authorization spec requires: everything is discovered
    from the upstream; `mcpxctl login NAME` signs in once and the daemon refreshes the token."""

    # `oauth_pkce` is the seed configuration's spelling of the same thing.
    type: Literal["oauth", "oauth_pkce"]
    # A Client ID Metadata Document URL, used as the client_id where the server supports them.
    client_metadata_url: str | None = None
    redirect_port: Annotated[int, Field(ge=1, le=65535)] | None = None
    # Accepted for the seed configuration; mcpx keeps tokens in its own store (keyring or state directory).
    token_cache: Path | None = None

    @field_validator("client_metadata_url")
    @classmethod
    def _metadata_url(cls, value: str | None) -> str | None:
        checked = _oauth_url(value, "client_metadata_url")
        if checked is not None and urlsplit(checked).path in ("", "/"):
            raise ValueError("client_metadata_url must have a path")
        return checked


class OAuthClientCredentialsAuth(_OAuthCommon):
    """OAuth client credentials grant for machine access: a client secret, or a private key (private_key_jwt)."""

    type: Literal["oauth_client_credentials"]
    private_key_file: Path | None = None
    private_key_algorithm: Literal["RS256", "ES256"] = "RS256"

    @field_validator("private_key_file")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @model_validator(mode="after")
    def _has_credentials(self) -> OAuthClientCredentialsAuth:
        if self.client_id is None:
            raise ValueError("`client_id` is required")
        secrets = [self.client_secret, self.client_secret_env, self.private_key_file]
        if sum(value is not None for value in secrets) != 1:
            raise ValueError("give exactly one of `client_secret`, `client_secret_env` or `private_key_file`")
        return self


AuthConfig = Annotated[
    NoAuth | BearerEnvAuth | BearerFileAuth | StaticHeaderAuth | OAuthAuth | OAuthClientCredentialsAuth,
    Field(discriminator="type"),
]


def _auth_types() -> frozenset[str]:
    union = get_args(AuthConfig)[0]
    return frozenset(tag for model in get_args(union) for tag in get_args(model.model_fields["type"].annotation))


# Every `auth.type` (the tags of the AuthConfig union: pydantic puts them in error locations).
AUTH_TYPES: Final = _auth_types()


def _auth_header(auth: AuthConfig) -> str | None:
    """The header (lower-case) an upstream's `auth` sets: its own for static_header, Authorization for every other
    type but none."""
    if isinstance(auth, NoAuth):
        return None
    if isinstance(auth, StaticHeaderAuth):
        return auth.header.lower()
    return "authorization"


class UpstreamConfig(_Strict):
    """One MCP server (`[[proxy.upstream]]`): remote (`url`) or a local child process (`command`)."""

    name: Annotated[str, Field(pattern=UPSTREAM_NAME_PATTERN)]
    url: str | None = None
    # streamable HTTP, falling back to legacy HTTP+SSE on 400/404/405 ("auto"), or one of them only.
    transport: Literal["auto", "streamable-http", "sse"] = "auto"
    # The initialize handshake, else protocol 2026-07-28 when the server speaks only that ("auto"), or one of them.
    protocol: Literal["auto", "handshake", "2026-07-28"] = "auto"
    # A stdio server: spawned without a shell, with a minimal environment plus `env`.
    command: Annotated[str, Field(min_length=1)] | None = None
    args: tuple[str, ...] = ()
    env: dict[str, str] = Field(default_factory=dict)
    cwd: Path | None = None
    # One session for every agent, or one per agent session (default: shared for `url`, per-agent for `command`).
    sharing: Literal["shared", "per-agent"] | None = None
    auth: AuthConfig = NoAuth()
    headers: dict[str, str] = Field(default_factory=dict)
    include_tools: tuple[str, ...] | None = None
    exclude_tools: tuple[str, ...] = ()
    timeout: Annotated[float, Field(gt=0, le=86400)] = 60.0
    namespace: bool = True

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.username or parts.password:
            raise ValueError("must not carry credentials; use `auth` instead")
        return value

    @field_validator("command", "args")
    @classmethod
    def _no_nul(cls, value: str | tuple[str, ...] | None) -> str | tuple[str, ...] | None:
        items = (value,) if isinstance(value, str) else value or ()
        if any("\0" in item for item in items):
            raise ValueError("must not contain a NUL character")
        return value

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, item in value.items():
            if not name or "=" in name or "\0" in name:
                raise ValueError(f"{name!r} is not a valid environment variable name")
            if "\0" in item:
                raise ValueError(f"the value of {name} contains a NUL character")
        return value

    @field_validator("cwd")
    @classmethod
    def _absolute_cwd(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        value = value.expanduser()
        if not value.is_absolute():
            raise ValueError("must be an absolute path (`~` is expanded)")
        return value

    @field_validator("headers")
    @classmethod
    def _header_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not HEADER_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid HTTP header name")
            if is_reserved_header(name):
                raise ValueError(f"header {name!r} is set by mcpx itself")
        return value

    @model_validator(mode="after")
    def _url_or_command(self) -> UpstreamConfig:
        if (self.url is None) == (self.command is None):
            raise ValueError("give exactly one of `url` (a remote server) or `command` (a local stdio server)")
        if self.command is not None:
            remote_only = sorted({"transport", "protocol", "headers"} & self.model_fields_set)
            if not isinstance(self.auth, NoAuth):
                remote_only.append("auth")
            if remote_only:
                keys = ", ".join(f"`{key}`" for key in remote_only)
                raise ValueError(f"{keys}: only for `url` upstreams; a stdio server takes credentials from `env`")
        elif {"args", "env", "cwd"} & self.model_fields_set:
            raise ValueError("`args`, `env` and `cwd` are for `command` upstreams")
        elif self.transport == "sse" and self.protocol == "2026-07-28":
            raise ValueError('`protocol = "2026-07-28"` is spoken over streamable HTTP only, not `transport = "sse"`')
        return self

    @property
    def shared(self) -> bool:
        """Whether all agents share one session (the `sharing` policy and its default)."""
        if self.sharing is not None:
            return self.sharing == "shared"
        return self.command is None

    @property
    def http_url(self) -> str:
        """The URL of a remote upstream (asked only of `url` upstreams: OAuth and HTTP transports)."""
        if self.url is None:
            raise ValueError(f"upstream {self.name!r} is a stdio server, it has no URL")
        return self.url

    @property
    def endpoint(self) -> str:
        """The URL, or for a stdio server the command line (for status and logs)."""
        return self.url if self.url is not None else " ".join((self.command or "", *self.args))

    @model_validator(mode="after")
    def _auth_header_not_twice(self) -> UpstreamConfig:
        auth_header = _auth_header(self.auth)
        if auth_header is not None and any(name.lower() == auth_header for name in self.headers):
            raise ValueError(f"headers: {auth_header!r} is already set by `auth`")
        return self

    @property
    def origin(self) -> str:
        parts = urlsplit(self.http_url)
        return f"{parts.scheme}://{parts.netloc}"


class DaemonConfig(_Strict):
    """`[daemon]`: where mcpxd listens and how it behaves."""

    socket: Path | None = None
    state_dir: Path | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # The largest single JSON-RPC message accepted from an agent or an upstream.
    max_message_bytes: Annotated[int, Field(ge=1024, le=1 << 30)] = 64 * 1024 * 1024
    connect_timeout: Annotated[float, Field(gt=0, le=600)] = 10.0
    reconnect_initial: Annotated[float, Field(gt=0, le=3600)] = 1.0
    reconnect_max: Annotated[float, Field(gt=0, le=86400)] = 60.0
    # The most items one page of an aggregated list (tools, prompts, resources, templates) carries.
    list_page_size: Annotated[int, Field(ge=1, le=100_000)] = 1000
    # Where OAuth logins are kept: the OS keyring when one answers ("auto"), or always the private state file.
    token_store: Literal["auto", "keyring", "file"] = "auto"
    # One JSON line per tool call in <state dir>/audit.jsonl, rotated by size; arguments only when asked for.
    audit: bool = True
    audit_arguments: bool = False
    audit_max_bytes: Annotated[int, Field(ge=4096)] = 10 * 1024 * 1024
    audit_backups: Annotated[int, Field(ge=0, le=100)] = 3
    # After sending a message, poll for the next one this many microseconds before sleeping, while that pays off
    # (see mcpx.busypoll); 0 turns it off.
    busy_poll_us: Annotated[int, Field(ge=0, le=10_000)] = 500


class DuplicateUpstreamName(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(f"upstream name {name!r} is used twice")
        self.name = name


class ProxyConfig(_Strict):
    upstream: tuple[UpstreamConfig, ...] = ()

    @model_validator(mode="after")
    def _unique_names(self) -> ProxyConfig:
        seen: set[str] = set()
        for upstream in self.upstream:
            if upstream.name in seen:
                raise DuplicateUpstreamName(upstream.name)
            seen.add(upstream.name)
        return self


class Config(_Strict):
    """The whole validated configuration. `source` is the file it came from (None for the empty default)."""

    daemon: DaemonConfig = DaemonConfig()
    proxy: ProxyConfig = ProxyConfig()
    source: Path | None = None

    @property
    def upstreams(self) -> tuple[UpstreamConfig, ...]:
        return self.proxy.upstream
