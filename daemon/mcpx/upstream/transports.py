"""Which transport an upstream speaks, chosen from its configuration: the one place sessions are created."""

from __future__ import annotations

from collections.abc import Callable

from mcpx.auth.credentials import CredentialProvider
from mcpx.config.model import UpstreamConfig
from mcpx.upstream.h1 import HttpClient
from mcpx.upstream.http import HttpSession
from mcpx.upstream.peer import ClientSide, UpstreamSession
from mcpx.upstream.stdio import StdioSession


def open_session(
    config: UpstreamConfig,
    *,
    http: HttpClient,
    credentials: CredentialProvider,
    max_message_bytes: int,
    client: ClientSide,
    on_lost: Callable[[str], None],
) -> UpstreamSession:
    """A new, not yet connected session with the upstream `config` describes.

    `client` takes the server's messages that belong to no agent's call; `on_lost` is told when the session dies
    on its own between calls (a child process exits, a stream ends), so that it is reconnected.
    """
    if config.command is not None:
        return StdioSession(config, max_message_bytes=max_message_bytes, client=client, on_lost=on_lost)
    del on_lost  # streamable HTTP learns of failures from its requests
    return HttpSession(config, http, credentials, max_message_bytes=max_message_bytes, client=client)
