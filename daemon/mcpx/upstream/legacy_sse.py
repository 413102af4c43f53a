"""MCP client session over the legacy HTTP+SSE transport (protocol 2024-11-05 `basic/transports`).

The client GETs the configured URL as a server-sent-event stream. Its first event, `endpoint`, names the URL to
POST messages to; every message of the server (responses, notifications, requests to the client) then arrives as
a `message` event on that one stream. The endpoint is resolved against the configured URL and refused unless it
has the same origin (scheme, host, port): the credential goes with every POST, and an upstream's credential is
sent only to that upstream.

Everything MCP is `ChannelSession`'s (ids, deadlines, relating server messages to calls); this module opens the
stream, reads it, and POSTs. When the stream ends or breaks the session is lost, and its supervisor reconnects
(a new stream, a new endpoint, a new handshake).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from urllib.parse import urljoin

from mcpx.auth.credentials import CredentialProvider
from mcpx.config.model import UpstreamConfig
from mcpx.errors import FrameTooLarge, UpstreamProtocolError, UpstreamTimeout, UpstreamUnavailable
from mcpx.framing.sse import SSEEvent
from mcpx.log import get_logger
from mcpx.upstream.channel import ChannelSession
from mcpx.upstream.h1 import BodyTooLarge, HttpClient, HttpClientError, Response, Target
from mcpx.upstream.httpbase import (
    EventStream,
    HttpPeer,
    as_text,
    connection_failure,
    describe_connection_error,
    event_data,
)
from mcpx.upstream.peer import ClientSide

_log = get_logger("mcpx.upstream")

# What is read of a POST's answer (normally "Accepted") so that its connection can be reused.
_ACCEPTED_BODY_LIMIT = 64 * 1024


class SseSession(ChannelSession):
    """The MCP session mcpx holds with one legacy HTTP+SSE upstream."""

    def __init__(
        self,
        config: UpstreamConfig,
        http: HttpClient,
        credentials: CredentialProvider,
        *,
        max_message_bytes: int,
        connect_timeout: float,
        client: ClientSide,
        on_lost: Callable[[str], None],
    ) -> None:
        super().__init__(config.name, timeout=config.timeout, client=client, on_lost=on_lost)
        self._peer = HttpPeer(config, http, credentials)
        self._http = http
        self._max_message_bytes = max_message_bytes
        self._connect_timeout = connect_timeout
        self._endpoint: Target | None = None
        self._stream: Response | None = None
        self._reader: asyncio.Task[None] | None = None

    # --- the channel ---------------------------------------------------------------------------------------------

    async def _start_channel(self) -> None:
        await self._peer.credentials.prepare()
        try:
            async with asyncio.timeout(self._connect_timeout):
                opened = await self._peer.with_auth_retry(self._open_stream)
        except TimeoutError:
            raise UpstreamUnavailable(
                self.name, f"no endpoint event on the SSE stream within {self._connect_timeout:g} s"
            ) from None
        response, events, endpoint, early = opened
        self._stream, self._endpoint = response, endpoint
        for raw in early:
            self._received(raw)
        self._reader = asyncio.get_running_loop().create_task(
            self._read(response, events), name=f"upstream:{self.name}:sse-stream"
        )

    async def _open_stream(self) -> tuple[Response, AsyncIterator[SSEEvent], Target, list[bytes]]:
        """GET the stream and read it up to the `endpoint` event; the response is released on any failure."""
        headers = self._peer.headers()
        headers["Accept"] = "text/event-stream"
        response = await self._peer.get(headers)
        try:
            if response.status != 200:
                raise await self._peer.http_error(response)
            if response.content_type != "text/event-stream":
                raise UpstreamProtocolError(
                    self.name, f"the URL answered {response.content_type or 'no content type'}, not an SSE stream"
                )
            events = EventStream(self._max_message_bytes).events(response)
            early: list[bytes] = []  # messages before the endpoint event (a server that is in a hurry)
            async for event in events:
                if event.event == "endpoint":
                    return response, events, self._endpoint_target(as_text(event.data)), early
                if event.event == "message" and event.data:
                    early.append(event_data(event))
            raise UpstreamProtocolError(self.name, "the SSE stream ended before its endpoint event")
        except FrameTooLarge as exc:
            response.release()
            raise UpstreamProtocolError(self.name, f"SSE event too large: {exc}") from None
        except HttpClientError as exc:
            response.release()
            raise connection_failure(self.name, exc) from None
        except BaseException:
            response.release()
            raise

    def _endpoint_target(self, data: str) -> Target:
        """The endpoint event's URL, resolved against the configured one; refused unless it has the same origin."""
        resolved = urljoin(self._peer.url, data.strip())
        try:
            target = Target.parse(resolved)
        except ValueError:
            raise UpstreamProtocolError(self.name, "the endpoint event does not name an http(s) URL") from None
        if target.origin != self._peer.target.origin:
            scheme, host, port = target.origin
            raise UpstreamProtocolError(
                self.name,
                f"the endpoint event names another origin ({scheme}://{host}:{port}); mcpx posts messages only to "
                "the scheme, host and port of the configured url",
            )
        return target

    async def _read(self, response: Response, events: AsyncIterator[SSEEvent]) -> None:
        """Deliver the stream's `message` events until it ends (task top; cancelled when the channel stops)."""
        reason = "the SSE stream ended"
        try:
            async for event in events:
                if event.event == "message" and event.data:
                    self._received(event_data(event))
                elif event.event == "endpoint":
                    _log.debug("ignoring a second endpoint event", upstream=self.name)
        except FrameTooLarge as exc:
            reason = f"SSE event too large: {exc}"
        except HttpClientError as exc:
            reason = f"the SSE stream broke: {describe_connection_error(exc)}"
        except Exception as exc:  # noqa: BLE001 - task top: a bad message must not leave the session half dead
            _log.exception("SSE stream reader failed", upstream=self.name)
            reason = f"the SSE stream reader failed: {type(exc).__name__}"
        finally:
            response.release()
        _log.info("upstream SSE stream lost", upstream=self.name, reason=reason)
        self._lost(reason)

    async def _send(self, data: bytes, *, replayable: bool = True) -> None:
        endpoint = self._endpoint
        if endpoint is None:
            raise UpstreamUnavailable(self.name, "not connected")
        try:
            async with asyncio.timeout(self._timeout):
                await self._peer.with_auth_retry(functools.partial(self._post, endpoint, data, replayable))
        except TimeoutError:
            raise UpstreamTimeout(self.name, f"a message was not accepted within {self._timeout:g} s") from None

    async def _post(self, endpoint: Target, data: bytes, replayable: bool) -> None:
        headers = self._peer.headers()
        headers["Content-Type"] = "application/json"
        try:
            response = await self._http.request("POST", endpoint, headers, data, replayable=replayable)
        except HttpClientError as exc:
            raise connection_failure(self.name, exc) from None
        try:
            self._peer.check_auth(headers, response)
            status = response.status
            if status == 404:
                # The stream's session is gone on the server; its end (or the next connect) replaces it.
                raise UpstreamUnavailable(self.name, "the server no longer knows the SSE session (HTTP 404)")
            if status not in (200, 202, 204):
                raise await self._peer.http_error(response)
            with contextlib.suppress(BodyTooLarge, HttpClientError):
                await response.read(_ACCEPTED_BODY_LIMIT)  # so that the connection can be reused
        finally:
            response.release()

    async def _stop_channel(self) -> None:
        reader, self._reader = self._reader, None
        stream, self._stream = self._stream, None
        self._endpoint = None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
            await asyncio.wait({reader}, timeout=2.0)  # it only releases its response
        if stream is not None:
            stream.release()
