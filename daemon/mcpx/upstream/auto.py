"""The sessions that choose on connect between two ways of speaking to one URL, and keep the one that worked.

- `transport = "auto"` (`AutoSession`): streamable HTTP, falling back to legacy HTTP+SSE (protocol 2025-11-25
  `basic/transports`, backwards compatibility). The first connect POSTs `initialize` to the URL. When that fails
  with HTTP 400, 404 or 405, the URL is tried as an HTTP+SSE stream (GET, expecting an `endpoint` event), unless
  the body of the refusal is a JSON-RPC error only a 2026-07-28 server sends (2026-07-28 `basic/transports`:
  such a server is modern, not legacy).
- `protocol = "auto"` (`EraSession`): the initialize handshake, and protocol 2026-07-28 (stateless) when the
  server refuses `initialize` saying it speaks only that (`peer.asks_for_stateless`). A server of both eras keeps
  the handshake, which mcpx supports in full.

The choice is kept for this session; it is probed again only when a later reconnect over it fails (the server
may have been replaced by a newer or older one). Everything else is delegated to the chosen session.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

from mcpx.errors import CredentialRejected, NeedsLogin, UpstreamError, UpstreamHTTPError, UpstreamUnavailable
from mcpx.log import get_logger
from mcpx.upstream.peer import STATELESS_ERA_CODES, ClientSide, Settled, UpstreamSession, asks_for_stateless

_log = get_logger("mcpx.upstream")

# What a legacy HTTP+SSE server answers to a POST on its SSE URL (2025-11-25 `basic/transports`).
FALLBACK_STATUSES: Final = frozenset({400, 404, 405})


class _ChosenSession:
    """A session that delegates to `first` or `second`, whichever `_probe` chose on connect."""

    def __init__(self, name: str, first: UpstreamSession, second: UpstreamSession) -> None:
        self.name = name
        self._first = first
        self._second = second
        self._chosen: UpstreamSession | None = None

    async def _probe(self) -> None:
        """Connect one of the two and set `_chosen` to it, or raise why neither works."""
        raise NotImplementedError

    # --- what the server said, from the chosen session --------------------------------------------------------------

    @property
    def _current(self) -> UpstreamSession:
        return self._chosen if self._chosen is not None else self._first

    @property
    def protocol_version(self) -> str | None:
        return self._current.protocol_version

    @protocol_version.setter
    def protocol_version(self, value: str | None) -> None:
        self._current.protocol_version = value

    @property
    def server_info(self) -> dict[str, Any]:
        return self._current.server_info

    @server_info.setter
    def server_info(self, value: dict[str, Any]) -> None:
        self._current.server_info = value

    @property
    def capabilities(self) -> dict[str, Any]:
        return self._current.capabilities

    @capabilities.setter
    def capabilities(self, value: dict[str, Any]) -> None:
        self._current.capabilities = value

    @property
    def instructions(self) -> str | None:
        return self._current.instructions

    @instructions.setter
    def instructions(self, value: str | None) -> None:
        self._current.instructions = value

    @property
    def asked_roots(self) -> bool:
        return self._chosen is not None and self._chosen.asked_roots

    # --- lifecycle -----------------------------------------------------------------------------------------------

    async def connect(self) -> None:
        chosen = self._chosen
        if chosen is not None:
            try:
                await chosen.connect()
                return
            except (CredentialRejected, NeedsLogin):
                raise
            except UpstreamError as exc:
                _log.info("upstream's transport failed, probing again", upstream=self.name, error=exc.reason)
                await chosen.close()
                self._chosen = None
        await self._probe()

    async def close(self) -> None:
        # Both: a connect cancelled halfway may have left either one partly open (closing an unused one is free).
        await self._first.close()
        await self._second.close()

    # --- calls ---------------------------------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        params: dict[str, Any] | None,
        *,
        timeout: float,
        on_related: ClientSide | None = None,
        forward_raw: bool = False,
    ) -> Any:
        if self._chosen is None:
            raise UpstreamUnavailable(self.name, "not connected")
        return await self._chosen.request(
            method, params, timeout=timeout, on_related=on_related, forward_raw=forward_raw
        )

    def start_request(
        self,
        method: str,
        params: dict[str, Any] | None,
        *,
        timeout: float,
        on_related: ClientSide | None = None,
        forward_raw: bool = False,
        on_settled: Settled,
    ) -> asyncio.Future[Any] | None:
        if self._chosen is None:
            return None
        return self._chosen.start_request(
            method, params, timeout=timeout, on_related=on_related, forward_raw=forward_raw, on_settled=on_settled
        )

    async def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        if self._chosen is None:
            raise UpstreamUnavailable(self.name, "not connected")
        await self._chosen.notify(method, params)


class AutoSession(_ChosenSession):
    """`transport = "auto"`: streamable HTTP, else HTTP+SSE."""

    @property
    def transport(self) -> str | None:
        """The transport in use ("streamable-http" or "sse"), None before the first successful connect."""
        if self._chosen is None:
            return None
        return "sse" if self._chosen is self._second else "streamable-http"

    async def _probe(self) -> None:
        try:
            await self._first.connect()
        except UpstreamHTTPError as refused:
            if refused.status not in FALLBACK_STATUSES or refused.rpc_code in STATELESS_ERA_CODES:
                raise
            streamable_error = refused
            await self._first.close()
        else:
            self._chosen = self._first
            return
        _log.info(
            "upstream refused streamable HTTP, trying HTTP+SSE", upstream=self.name, status=streamable_error.status
        )
        try:
            await self._second.connect()
        except (CredentialRejected, NeedsLogin):
            raise
        except UpstreamError as exc:
            raise UpstreamUnavailable(
                self.name, f"streamable HTTP: {streamable_error.reason}; HTTP+SSE: {exc.reason}"
            ) from None
        self._chosen = self._second
        _log.info("upstream speaks HTTP+SSE", upstream=self.name)


class EraSession(_ChosenSession):
    """`protocol = "auto"`: the initialize handshake (`first`), else protocol 2026-07-28 (`second`)."""

    async def _probe(self) -> None:
        try:
            await self._first.connect()
        except UpstreamError as exc:
            if not asks_for_stateless(exc):
                raise
            await self._first.close()
            _log.info("upstream refused the handshake for protocol 2026-07-28, speaking that", upstream=self.name)
        else:
            self._chosen = self._first
            return
        await self._second.connect()
        self._chosen = self._second
