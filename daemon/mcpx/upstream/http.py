"""MCP client session over streamable HTTP, handshake era (protocol 2025-11-25 `basic/transports`).

One `HttpSession` per configured upstream, shared by every agent. Each request is its own POST, answered by one
JSON body or by an SSE stream that ends with the response, so responses can never reach the wrong caller.
What it handles: `Mcp-Session-Id` and `MCP-Protocol-Version`, re-initialize and retry once when the server
forgot the session (404), re-read the credential and retry once on 401, the per-call deadline (with
`notifications/cancelled` sent upstream, since over HTTP a disconnect is not a cancellation), DELETE on close.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from mcpx import jsonrpc
from mcpx.auth.credentials import CredentialProvider, expand_env
from mcpx.auth.oauth.metadata import Challenge, parse_bearer_challenge
from mcpx.config.model import UpstreamConfig
from mcpx.errors import (
    CredentialRejected,
    FrameTooLarge,
    InvalidRequest,
    McpxError,
    ParseError,
    SessionExpired,
    UpstreamHTTPError,
    UpstreamProtocolError,
    UpstreamRpcError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from mcpx.framing.sse import SSEDecoder
from mcpx.jsonrpc import Message
from mcpx.log import get_logger
from mcpx.redact import any_registered, redact
from mcpx.upstream.h1 import BodyTooLarge, ConnectError, HttpClient, HttpClientError, Response, Target
from mcpx.upstream.peer import (
    ClientSide,
    ServerRequests,
    accept_initialize,
    adopt_hello,
    initialize_params,
    route_incoming,
)

_log = get_logger("mcpx.upstream")

_T = TypeVar("_T")


class _Unauthorized(Exception):
    """HTTP 401 from the upstream; internal to the retry logic."""

    def __init__(self, sent: dict[str, str], challenge: Challenge) -> None:
        super().__init__("HTTP 401")
        self.sent = sent
        self.challenge = challenge


class HttpSession:
    """The MCP session mcpx holds with one streamable-HTTP upstream."""

    def __init__(
        self,
        config: UpstreamConfig,
        http: HttpClient,
        credentials: CredentialProvider,
        *,
        max_message_bytes: int,
        client: ClientSide,
    ) -> None:
        self.name = config.name
        self._config = config
        self._http = http
        self._target = Target.parse(config.http_url)
        self._credentials = credentials
        self._max_message_bytes = max_message_bytes
        self._client = client
        self._server_requests = ServerRequests(config.name, self._post_expecting_accepted, config.timeout)
        self._ids = itertools.count(1)
        self._session_id: str | None = None
        self._static_headers: dict[str, str] | None = None
        self._generation = 0
        self._init_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        self.protocol_version: str | None = None
        self.server_info: dict[str, Any] = {}
        self.capabilities: dict[str, Any] = {}
        self.instructions: str | None = None

    # --- lifecycle -----------------------------------------------------------------------------------------------

    async def connect(self) -> None:
        """(Re-)run the initialize handshake. Raises an `UpstreamError` subclass on failure."""
        async with self._init_lock:
            await self._credentials.prepare()
            await self._with_auth_retry(self._initialize)

    async def close(self) -> None:
        """End the session: DELETE it on the server (best effort, bounded) and stop background sends."""
        for task in list(self._background):
            task.cancel()
        self._server_requests.close()
        session_id, self._session_id = self._session_id, None
        if session_id is None:
            return
        try:
            async with asyncio.timeout(2.0):
                headers = self._headers()
                headers["Mcp-Session-Id"] = session_id
                (await self._http.request("DELETE", self._target, headers)).release()
        except (TimeoutError, HttpClientError, McpxError) as exc:  # e.g. NeedsLogin: no credential left
            _log.debug("session delete failed", upstream=self.name, error=str(exc))

    # --- requests ------------------------------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        params: dict[str, Any] | None,
        *,
        timeout: float,
        on_related: ClientSide | None = None,
        forward_raw: bool = False,
    ) -> Any:
        """Send one request and return its `result` (a `jsonrpc.RawJson` where `forward_raw` allows and the
        upstream's bytes can be forwarded untouched).

        Raises:
            UpstreamRpcError: the upstream answered with a JSON-RPC error.
            UpstreamError: any other failure (unreachable, timeout, HTTP error, garbage, credential rejected).
        """
        request_id = next(self._ids)
        try:
            async with asyncio.timeout(timeout):
                return await self._request_with_recovery(request_id, method, params, on_related, forward_raw)
        except TimeoutError:
            self._cancel_upstream(request_id, "timed out")
            raise UpstreamTimeout(self.name, f"no answer to {method} within {timeout:g} s") from None
        except asyncio.CancelledError:
            self._cancel_upstream(request_id, "cancelled by the client")
            raise

    async def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        body = jsonrpc.dumps(jsonrpc.notification(method, params))
        await self._post_expecting_accepted(body)

    async def _request_with_recovery(
        self,
        request_id: int,
        method: str,
        params: dict[str, Any] | None,
        on_related: ClientSide | None,
        forward_raw: bool,
    ) -> Any:
        body = jsonrpc.dumps(jsonrpc.request(request_id, method, params))
        expired_once = False
        while True:
            generation = self._generation
            try:
                exchange = functools.partial(self._exchange, request_id, body, on_related, forward_raw=forward_raw)
                return await self._with_auth_retry(exchange)
            except SessionExpired:
                if expired_once:
                    raise
                expired_once = True
                _log.info("upstream session expired, re-initializing", upstream=self.name)
                await self._reinitialize(generation)

    async def _reinitialize(self, seen_generation: int) -> None:
        async with self._init_lock:
            if self._generation != seen_generation:
                return  # another caller already re-initialized
            self._session_id = None
            await self._with_auth_retry(self._initialize)

    async def _with_auth_retry(self, attempt: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        # At most one renewal and one replay per request (TOK-3): a 401 after that is final.
        try:
            return await attempt()
        except _Unauthorized as unauthorized:
            if not await self._credentials.renew(unauthorized.sent, unauthorized.challenge):
                raise self._rejected() from None
            _log.info("credential changed after a 401, retrying once", upstream=self.name)
        try:
            return await attempt()
        except _Unauthorized:
            raise self._rejected() from None

    def _forbidden(self, response: Response) -> None:
        challenge = parse_bearer_challenge(response.headers.get("www-authenticate"))
        if challenge.error == "insufficient_scope":
            step_up = self._credentials.insufficient_scope(challenge)
            if step_up is not None:
                raise step_up

    def _rejected(self) -> CredentialRejected:
        return CredentialRejected(self.name, f"the credential was rejected (HTTP 401): {self._credentials.fix_hint()}")

    @property
    def asked_roots(self) -> bool:
        return self._server_requests.asked_roots

    async def _initialize(self) -> None:
        request_id = next(self._ids)
        body = jsonrpc.dumps(jsonrpc.request(request_id, "initialize", initialize_params()))
        self._session_id = None
        adopt_hello(self, accept_initialize(self.name, await self._exchange(request_id, body, None, initializing=True)))
        self._generation += 1
        await self._post_expecting_accepted(jsonrpc.dumps(jsonrpc.notification("notifications/initialized")))

    # --- one HTTP exchange ---------------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        if self._static_headers is None:
            # The daemon's environment does not change while it runs: expand `${VAR}` once.
            self._static_headers = {
                name: expand_env(value, upstream=self.name, what=f"the {name} header")
                for name, value in self._config.headers.items()
            }
        headers = {**self._static_headers, **self._credentials.headers()}
        headers["Accept"] = "application/json, text/event-stream"
        headers["Content-Type"] = "application/json"
        if self._session_id is not None:
            headers["Mcp-Session-Id"] = self._session_id
        if self.protocol_version is not None:
            headers["MCP-Protocol-Version"] = self.protocol_version
        return headers

    async def _exchange(
        self,
        request_id: int,
        body: bytes,
        on_related: ClientSide | None,
        *,
        initializing: bool = False,
        forward_raw: bool = False,
    ) -> Any:
        sent_session = self._session_id
        headers = self._headers()
        try:
            response = await self._http.request("POST", self._target, headers, body)
        except HttpClientError as exc:
            raise UpstreamUnavailable(self.name, _describe_connection_error(exc)) from None
        # The connection goes back to the pool when this returns, unless an SSE stream is handed to a drainer.
        handed_off = False
        try:
            if response.status == 401:
                raise _Unauthorized(headers, parse_bearer_challenge(response.headers.get("www-authenticate")))
            if response.status == 403:
                self._forbidden(response)
            if response.status == 404 and sent_session is not None:
                raise SessionExpired(self.name, "the upstream no longer knows our session")
            if response.status != 200:
                raise await self._http_error(response)
            if initializing:
                session_id = response.headers.get("mcp-session-id")
                if session_id is not None and not _visible_ascii(session_id):
                    raise UpstreamProtocolError(self.name, "invalid Mcp-Session-Id")
                self._session_id = session_id
            content_type = response.content_type
            if content_type == "application/json":
                return self._response_result(await response.read(self._max_message_bytes), request_id, forward_raw)
            if content_type == "text/event-stream":
                result = await self._read_stream(response, request_id, on_related, forward_raw)
                if not response.at_eof:
                    handed_off = True
                    self._spawn(lambda: self._drain(response))
                return result
            raise UpstreamProtocolError(self.name, f"unexpected response content type {content_type!r}")
        except BodyTooLarge as exc:
            raise UpstreamProtocolError(self.name, str(exc)) from None
        except HttpClientError as exc:
            raise UpstreamUnavailable(self.name, _describe_connection_error(exc)) from None
        finally:
            if not handed_off:
                response.release()

    def _response_result(self, raw: bytes, request_id: int, forward_raw: bool) -> Any:
        """The result of the response `raw`: as the upstream's own bytes when it is forwarded untouched."""
        spliced = _spliced(raw, request_id) if forward_raw else None
        return spliced if spliced is not None else self._result_of(self._parse(raw), request_id)

    async def _read_stream(
        self, response: Response, request_id: int, on_related: ClientSide | None, forward_raw: bool
    ) -> Any:
        decoder = SSEDecoder(self._max_message_bytes)
        try:
            async for chunk in response.chunks():
                for event in decoder.feed(chunk):
                    if event.event != "message" or not event.data:
                        continue
                    data = event.data.encode()
                    if forward_raw and (spliced := _spliced(data, request_id)) is not None:
                        return spliced
                    message = self._parse(data)
                    if "method" not in message:
                        if message.get("id") == request_id:
                            return self._result_of(message, request_id)
                        _log.debug("ignoring unrelated response on stream", upstream=self.name)
                    else:
                        # On a request's own stream, the server's messages belong to that request (SEP-2260).
                        route_incoming(
                            message, related=on_related, default=self._client, requests=self._server_requests
                        )
        except FrameTooLarge as exc:
            raise UpstreamProtocolError(self.name, f"SSE event too large: {exc}") from None
        raise UpstreamProtocolError(self.name, "the SSE stream ended before the response")

    async def _drain(self, response: Response) -> None:
        """Read what follows the response on an SSE stream (normally just its end), so that the keep-alive
        connection returns to the pool instead of being closed; the caller already has its result."""
        try:
            async with asyncio.timeout(5.0):
                async for _ in response.chunks():
                    pass
        finally:
            response.release()

    def _result_of(self, message: Message, request_id: int) -> Any:
        if message.get("id") != request_id:
            raise UpstreamProtocolError(self.name, "response id does not match the request")
        if "error" in message:
            error = message["error"]
            if not isinstance(error, dict):
                raise UpstreamProtocolError(self.name, "malformed JSON-RPC error")
            raise UpstreamRpcError(self.name, error)
        if "result" not in message:
            raise UpstreamProtocolError(self.name, "response has neither result nor error")
        return message["result"]

    def _parse(self, raw: bytes) -> Message:
        try:
            return jsonrpc.validate_message(jsonrpc.loads(raw))
        except (ParseError, InvalidRequest) as exc:
            raise UpstreamProtocolError(self.name, f"not a JSON-RPC message: {exc}") from None

    async def _http_error(self, response: Response) -> UpstreamHTTPError:
        detail = ""
        try:
            async with asyncio.timeout(2.0):
                text = (await response.read_prefix(2048)).decode("utf-8", "replace")
            message = jsonrpc.loads(text).get("error", {}).get("message") if text.startswith("{") else None
            detail = f": {message}" if isinstance(message, str) else ""
        except (TimeoutError, HttpClientError, ParseError, AttributeError):
            pass
        reason = f"HTTP {response.status} {response.reason or ''}".rstrip() + redact(detail)[:300]
        return UpstreamHTTPError(self.name, response.status, reason)

    async def _post_expecting_accepted(self, body: bytes) -> None:
        try:
            response = await self._http.request("POST", self._target, self._headers(), body)
            try:
                if response.status == 401:
                    raise self._rejected()
                if response.status not in (200, 202, 204):
                    raise await self._http_error(response)
            finally:
                response.release()
        except HttpClientError as exc:
            raise UpstreamUnavailable(self.name, _describe_connection_error(exc)) from None

    # --- background sends ----------------------------------------------------------------------------------------

    def _cancel_upstream(self, request_id: int, reason: str) -> None:
        if self._session_id is not None:
            params = {"requestId": request_id, "reason": reason}
            self._spawn(lambda: self.notify("notifications/cancelled", params))

    def _spawn(self, send: Callable[[], Coroutine[Any, Any, None]]) -> None:
        # A factory, not a coroutine: a task cancelled before it starts must not leave a never-awaited coroutine.
        async def guarded() -> None:
            try:
                async with asyncio.timeout(5.0):
                    await send()
            except (TimeoutError, HttpClientError, McpxError) as exc:
                _log.debug("background send failed", upstream=self.name, error=str(exc))

        task = asyncio.get_running_loop().create_task(guarded())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _spliced(raw: bytes, request_id: int) -> jsonrpc.RawJson | None:
    return jsonrpc.spliced_result(raw, request_id, secrets_registered=any_registered())


def _visible_ascii(value: str) -> bool:
    return bool(value) and all(0x21 <= ord(char) <= 0x7E for char in value)


def _describe_connection_error(exc: HttpClientError) -> str:
    if isinstance(exc, ConnectError):
        return f"cannot connect: {exc}"
    return str(exc)
