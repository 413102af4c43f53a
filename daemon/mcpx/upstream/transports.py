"""Which transport an upstream speaks, chosen from its configuration: the one place sessions are created."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Final

from mcpx.auth.credentials import CredentialProvider
from mcpx.config.model import DaemonConfig, UpstreamConfig
from mcpx.upstream.auto import AutoSession, EraSession
from mcpx.upstream.h1 import HttpClient
from mcpx.upstream.http import HttpSession
from mcpx.upstream.legacy_sse import SseSession
from mcpx.upstream.peer import ClientSide, UpstreamSession
from mcpx.upstream.stateless import StatelessSession
from mcpx.upstream.stdio import StdioSession

DEFAULT_CONNECT_TIMEOUT: Final[float] = DaemonConfig.model_fields["connect_timeout"].default


def open_session(
    config: UpstreamConfig,
    *,
    http: HttpClient,
    credentials: CredentialProvider,
    max_message_bytes: int,
    client: ClientSide,
    on_lost: Callable[[str], None],
    on_renewed: Callable[[], None] | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> UpstreamSession:
    """A new, not yet connected session with the upstream `config` describes.

    `client` takes the server's messages that belong to no agent's call; `on_lost` is told when the session dies
    on its own between calls (a child process exits, a stream ends), so that it is reconnected; `on_renewed` when
    it was replaced on its own (a streamable HTTP server forgot it, and it was initialized anew).
    `connect_timeout` bounds opening a connection-like channel (the HTTP+SSE stream up to its endpoint event).
    """
    if config.command is not None:
        return StdioSession(
            config, max_message_bytes=max_message_bytes, client=client, on_lost=on_lost, connect_timeout=connect_timeout
        )
    return _url_session(
        config,
        http=http,
        credentials=credentials,
        max_message_bytes=max_message_bytes,
        connect_timeout=connect_timeout,
        client=client,
        on_lost=on_lost,
        on_renewed=on_renewed,
    )


def _url_session(
    config: UpstreamConfig,
    *,
    http: HttpClient,
    credentials: CredentialProvider,
    max_message_bytes: int,
    connect_timeout: float,
    client: ClientSide,
    on_lost: Callable[[str], None],
    on_renewed: Callable[[], None] | None,
) -> UpstreamSession:
    """A `url` upstream's session: streamable HTTP, legacy HTTP+SSE, or the first of them that works ("auto"); over
    streamable HTTP, the handshake, protocol 2026-07-28, or the first of them that works (`protocol = "auto"`)."""

    def legacy() -> SseSession:
        return SseSession(
            config,
            http,
            credentials,
            max_message_bytes=max_message_bytes,
            connect_timeout=connect_timeout,
            client=client,
            on_lost=on_lost,
        )

    if config.transport == "sse":
        return legacy()
    # Streamable HTTP learns of failures from its requests (and its GET or listen stream), so it needs no `on_lost`.
    stateless = functools.partial(
        StatelessSession, config, http, credentials, max_message_bytes=max_message_bytes, client=client
    )
    if config.protocol == "2026-07-28":
        return stateless()  # (a server of this protocol is never legacy HTTP+SSE: no fallback)
    streamable: UpstreamSession = HttpSession(
        config, http, credentials, max_message_bytes=max_message_bytes, client=client, on_renewed=on_renewed
    )
    if config.protocol == "auto":
        streamable = EraSession(config.name, streamable, stateless())
    if config.transport == "streamable-http":
        return streamable
    return AutoSession(config.name, streamable, legacy())
