"""What the HTTP transports of one upstream share (streamable HTTP of both eras in `http.py` and `stateless.py`,
legacy HTTP+SSE in `legacy_sse.py`): the upstream's URL, the headers every request carries (configured ones,
`${VAR}` expanded once, plus the credential's), the 401 rule (renew the credential once, replay once), the 403
step-up, readable HTTP errors, the answer a POST's response carries, reading one server-sent-event stream through
the bounded decoder, what one message of a response (JSON or an event of its stream) says, and when to reopen a
stream.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Final, NamedTuple, TypeVar

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
    UpstreamError,
    UpstreamHTTPError,
    UpstreamInterrupted,
    UpstreamProtocolError,
    UpstreamRpcError,
    UpstreamUnavailable,
)
from mcpx.framing.sse import SSEDecoder, SSEEvent
from mcpx.jsonrpc import Message
from mcpx.log import get_logger
from mcpx.redact import any_registered, redact
from mcpx.upstream.h1 import (
    BodyTooLarge,
    ClosedBeforeAnswer,
    ConnectError,
    HttpClient,
    HttpClientError,
    Response,
    Target,
)

_log = get_logger("mcpx.upstream")

_T = TypeVar("_T")

# The longest `retry:` a server may ask mcpx to wait before reconnecting a stream (milliseconds).
MAX_RETRY_MS = 60_000

# Reopening a stream the server closed without saying when (`retry`): first wait, doubling on each failure up to
# the cap (seconds).
STREAM_RETRY_INITIAL: Final = 1.0
STREAM_RETRY_MAX: Final = 30.0

# How long the rest of a request's SSE stream may take to end after its answer, read without a task (seconds).
STREAM_END_WAIT: Final = 5.0


class Listen(enum.Enum):
    """How one attempt at a long-lived stream of server messages (a GET stream, a `subscriptions/listen`) ended."""

    STOP = "stop"  # the server offers none (405, a permanent error): do not reopen
    RECEIVED = "received"  # the stream delivered something, then ended: reopen after `retry`
    FAILED = "failed"  # nothing came through: reopen after a growing backoff


def reconnect_delay(retry_ms: int | None, failures: int) -> float:
    """Seconds to wait before reopening a stream. After one that brought something: the server's `retry` (else
    STREAM_RETRY_INITIAL). After `failures` attempts in a row that brought nothing: at least that much, and at least
    STREAM_RETRY_INITIAL (a `retry: 0` must not make a loop), doubled for each, capped at STREAM_RETRY_MAX."""
    retry = retry_ms / 1000 if retry_ms is not None else None
    if failures == 0:
        return retry if retry is not None else STREAM_RETRY_INITIAL
    base = max(retry or 0.0, STREAM_RETRY_INITIAL)
    return float(min(base * 2 ** (failures - 1), max(base, STREAM_RETRY_MAX)))


class Unauthorized(Exception):
    """HTTP 401 from the upstream; internal to the retry logic (`HttpPeer.with_auth_retry`)."""

    def __init__(self, sent: dict[str, str], challenge: Challenge) -> None:
        super().__init__("HTTP 401")
        self.sent = sent
        self.challenge = challenge


class HttpPeer:
    """One upstream reached over HTTP: its URL, credential and configured headers, and the rules for their use."""

    def __init__(self, config: UpstreamConfig, http: HttpClient, credentials: CredentialProvider) -> None:
        self.name = config.name
        self.config = config
        self.http = http
        self.url = config.http_url
        self.target = Target.parse(config.http_url)
        self.credentials = credentials
        self._static_headers: dict[str, str] | None = None

    def headers(self) -> dict[str, str]:
        """A fresh dict of the headers every request to this upstream carries (configured, then credential)."""
        if self._static_headers is None:
            # The daemon's environment does not change while it runs: expand `${VAR}` once. A value kept out of the
            # config in a variable is taken for a secret (`mcpxctl import` puts secret-looking headers there).
            self._static_headers = {
                name: expand_env(value, upstream=self.name, what=f"the {name} header", secret="${" in value)
                for name, value in self.config.headers.items()
            }
        return {**self._static_headers, **self.credentials.headers()}

    async def with_auth_retry(self, attempt: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        """Run `attempt`; when it raises `Unauthorized`, renew the credential and run it once more.

        At most one renewal and one replay per request (TOK-3): a 401 after that is final (`CredentialRejected`).
        """
        try:
            return await attempt()
        except Unauthorized as unauthorized:
            if not await self.credentials.renew(unauthorized.sent, unauthorized.challenge):
                raise self.rejected() from None
            _log.info("credential changed after a 401, retrying once", upstream=self.name)
        try:
            return await attempt()
        except Unauthorized:
            raise self.rejected() from None

    async def get(self, headers: dict[str, str]) -> Response:
        """GET the URL (an SSE stream) with `headers`; a 401 or a step-up 403 raises as on every request. The
        caller checks the rest of the status and releases the response."""
        try:
            response = await self.http.request("GET", self.target, headers)
        except HttpClientError as exc:
            raise connection_failure(self.name, exc) from None
        try:
            self.check_auth(headers, response)
        except BaseException:
            response.release()
            raise
        return response

    async def answer(
        self,
        response: Response,
        sent: dict[str, str],
        request_id: int,
        read_stream: Callable[[Response], Coroutine[Any, Any, Any]],
        *,
        max_bytes: int,
        forward_raw: bool,
        session_sent: bool = False,
        on_head: Callable[[Response], None] | None = None,
    ) -> Any:
        """The result a POST's response carries (`basic/transports/streamable-http`, both eras). The status first: a
        401 or a step-up 403 as `check_auth` says; with `session_sent`, a 404 means the server forgot the session
        (`SessionExpired`); anything else but 200 is an `UpstreamHTTPError`. Then `on_head` may read or refuse the
        head, and the result comes from a JSON body or from the SSE stream that `read_stream` reads up to it.

        The response is released on the way out; a stream that goes on after its answer is released at its end
        instead, without a task. An unfinished stream closes its connection: for a call cancelled or timed out, that
        is the cancellation."""
        handed_off = False
        try:
            self.check_auth(sent, response)
            if response.status == 404 and session_sent:
                raise SessionExpired(self.name, "the upstream no longer knows our session")
            if response.status != 200:
                raise await self.http_error(response)
            if on_head is not None:
                on_head(response)
            content_type = response.content_type
            if content_type == "application/json":
                return response_result(self.name, await response.read(max_bytes), request_id, forward_raw)
            if content_type == "text/event-stream":
                result = await read_stream(response)
                if not response.at_eof:
                    handed_off = True
                    response.release_at_end(STREAM_END_WAIT)
                return result
            raise UpstreamProtocolError(self.name, f"unexpected response content type {content_type!r}")
        except BodyTooLarge as too_large:
            raise UpstreamProtocolError(self.name, str(too_large)) from None
        except HttpClientError as exc:
            raise connection_failure(self.name, exc) from None
        finally:
            if not handed_off:
                response.release()

    def check_auth(self, sent: dict[str, str], response: Response) -> None:
        """Raise what a 401 (`Unauthorized`, for `with_auth_retry`) or a step-up 403 means; else nothing."""
        if response.status == 401:
            raise self.unauthorized(sent, response)
        if response.status == 403:
            self.forbidden(response)

    async def renewed_after_401(self, sent: dict[str, str], response: Response) -> bool:
        """A background stream met a 401: whether the credential could be renewed (then reopen it; else the next
        call reports the rejected credential)."""
        try:
            return await self.credentials.renew(sent, self.unauthorized(sent, response).challenge)
        except (McpxError, TimeoutError) as exc:
            _log.debug("stream: credential not renewed", upstream=self.name, error=str(exc))
            return False

    async def read_stream(
        self,
        response: Response,
        sent: dict[str, str],
        stream: EventStream,
        *,
        kind: str,
        on_message: Callable[[Message], bool],
        refused: Callable[[int], Listen | None] | None = None,
    ) -> Listen:
        """Read one attempt at a long-lived stream of server messages (`kind`: "GET" or "listen") to its end, and say
        how it ended: `refused` first judges a status the transport knows more of, a 401 renews the credential, a
        passing refusal (408, 409, 425, 429, 5xx) and a stream that brought nothing are failures (backoff), any
        other answer that is not an event stream is final. `on_message` takes each JSON-RPC message (what is not one
        is logged and skipped), True when it ends the stream. Releases the response."""
        chunks_before = stream.chunks
        try:
            status = response.status
            verdict = refused(status) if refused is not None else None
            if verdict is not None:
                return verdict
            if status == 401:
                # Renewed: try again (a new 401 backs off); else the next call reports the rejected credential.
                return Listen.FAILED if await self.renewed_after_401(sent, response) else Listen.STOP
            if status in (408, 409, 425, 429) or status >= 500:
                _log.debug("stream refused for now", upstream=self.name, stream=kind, status=status)
                return Listen.FAILED
            if status != 200 or response.content_type != "text/event-stream":
                _log.warning(
                    "upstream's stream is unusable; server notifications outside calls are not received",
                    upstream=self.name,
                    stream=kind,
                    status=status,
                    content_type=response.content_type,
                )
                return Listen.STOP
            async for event in stream.events(response):
                if event.event != "message" or not event.data:
                    continue
                try:
                    message = parse_message(self.name, event_data(event))
                except UpstreamProtocolError as exc:
                    _log.warning("upstream sent something that is not JSON-RPC", upstream=self.name, error=exc.reason)
                    continue
                if on_message(message):
                    break
            _log.debug("stream ended", upstream=self.name, stream=kind)
        except FrameTooLarge as exc:
            _log.warning("stream dropped: event too large", upstream=self.name, stream=kind, error=str(exc))
        except HttpClientError as exc:
            _log.debug("stream broke", upstream=self.name, stream=kind, error=str(exc))
        finally:
            response.release()
        # A stream that brought something (even a comment or a priming event) is reopened after the server's
        # `retry`; one that ended empty counts as a failure, so a server that closes at once is not hammered.
        return Listen.RECEIVED if stream.chunks > chunks_before else Listen.FAILED

    def unauthorized(self, sent: dict[str, str], response: Response) -> Unauthorized:
        return Unauthorized(sent, parse_bearer_challenge(response.headers.get("www-authenticate")))

    def forbidden(self, response: Response) -> None:
        """A 403: raise the credential's step-up error when the server asks for more scopes."""
        challenge = parse_bearer_challenge(response.headers.get("www-authenticate"))
        if challenge.error == "insufficient_scope":
            step_up = self.credentials.insufficient_scope(challenge)
            if step_up is not None:
                raise step_up

    def rejected(self) -> CredentialRejected:
        return CredentialRejected(self.name, f"the credential was rejected (HTTP 401): {self.credentials.fix_hint()}")

    async def http_error(self, response: Response) -> UpstreamHTTPError:
        """The error for an HTTP status mcpx cannot use, with the JSON-RPC error of the body if any (its message in
        the reason, its code kept: a 2026-07-28 server's refusal of `initialize` is told apart by it)."""
        detail = ""
        code: int | None = None
        try:
            async with asyncio.timeout(2.0):
                text = (await response.read_prefix(2048)).decode("utf-8", "replace")
            error = jsonrpc.loads(text).get("error") if text.startswith("{") else None
            if isinstance(error, dict):
                message, code = error.get("message"), error.get("code")
                detail = f": {message}" if isinstance(message, str) else ""
                code = code if type(code) is int else None
        except (TimeoutError, HttpClientError, ParseError, AttributeError):
            pass
        reason = f"HTTP {response.status} {response.reason or ''}".rstrip() + redact(detail)[:300]
        return UpstreamHTTPError(self.name, response.status, reason, rpc_code=code)


def connection_failure(upstream: str, exc: HttpClientError) -> UpstreamError:
    """The error a failed HTTP exchange with `upstream` is reported as."""
    if isinstance(exc, ClosedBeforeAnswer):
        return UpstreamInterrupted(upstream, f"{exc}; it was not sent again, since it may or may not have run")
    return UpstreamUnavailable(upstream, describe_connection_error(exc))


def describe_connection_error(exc: HttpClientError) -> str:
    if isinstance(exc, ConnectError):
        return f"cannot connect: {exc}"
    return str(exc)


class EventStream:
    """One `text/event-stream` body read event by event, remembering what a reconnection needs: the last event id
    and the server's `retry` (both also set by events without data, such as SSE priming events).

    Raises `FrameTooLarge` for an event beyond `max_event` bytes and `HttpClientError` when the connection fails.
    """

    def __init__(self, max_event: int) -> None:
        self._decoder = SSEDecoder(max_event)
        self.last_event_id: str | None = None
        self.retry_ms: int | None = None
        self.chunks = 0  # body chunks read so far, over every response read

    async def events(self, response: Response) -> AsyncIterator[SSEEvent]:
        """The events of `response`: the stream's first body, or one that resumes it (the decoder carries on with
        the last event id and `retry`, not with what the previous body left unfinished)."""
        decoder = self._decoder
        decoder.restart()
        async for chunk in response.chunks():
            self.chunks += 1
            events = decoder.feed(chunk)
            # Updated by every event that ends, with data or not (a priming event carries only an id and a retry).
            if decoder.last_event_id is not None:
                self.last_event_id = decoder.last_event_id
            if decoder.retry is not None:
                self.retry_ms = min(decoder.retry, MAX_RETRY_MS)
            for event in events:
                yield event


def event_data(event: SSEEvent) -> bytes:
    """An event's data as bytes (the decoder may hand out text or bytes)."""
    return as_bytes(event.data)


def as_bytes(data: str | bytes) -> bytes:
    return data if isinstance(data, bytes) else data.encode()


def as_text(data: str | bytes) -> str:
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else data


# --- what one response says ------------------------------------------------------------------------------------------


class Answer(NamedTuple):
    """The answer to a request found on its SSE stream: its result, or the error it makes."""

    value: Any
    error: McpxError | None

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


def parse_message(upstream: str, raw: bytes | bytearray) -> Message:
    """One JSON-RPC message the upstream sent. Raises `UpstreamProtocolError` when it is not one."""
    try:
        return jsonrpc.validate_message(jsonrpc.loads(raw))
    except (ParseError, InvalidRequest) as exc:
        raise UpstreamProtocolError(upstream, f"not a JSON-RPC message: {exc}") from None


def result_of(upstream: str, message: Message, request_id: int) -> Any:
    """The result of the response `message` to `request_id`; its JSON-RPC error raised as `UpstreamRpcError`."""
    if message.get("id") != request_id:
        raise UpstreamProtocolError(upstream, "response id does not match the request")
    if "error" in message:
        error = message["error"]
        if not isinstance(error, dict):
            raise UpstreamProtocolError(upstream, "malformed JSON-RPC error")
        raise UpstreamRpcError(upstream, error)
    if "result" not in message:
        raise UpstreamProtocolError(upstream, "response has neither result nor error")
    return message["result"]


def spliced(raw: bytes | bytearray, request_id: int) -> jsonrpc.RawJson | None:
    return jsonrpc.spliced_result(raw, request_id, secrets_registered=any_registered())


def response_result(upstream: str, raw: bytes | bytearray, request_id: int, forward_raw: bool) -> Any:
    """The result of the response `raw`: as the upstream's own bytes when it is forwarded untouched."""
    kept = spliced(raw, request_id) if forward_raw else None
    return kept if kept is not None else result_of(upstream, parse_message(upstream, raw), request_id)


def stream_message(upstream: str, event: SSEEvent, request_id: int, forward_raw: bool) -> Answer | Message | None:
    """What one event of a request's SSE stream carries: the answer to `request_id` (its result or its error,
    raised when asked for), a message of the server's to route, or nothing of use (None)."""
    if event.event != "message" or not event.data:
        return None
    data = event_data(event)
    if forward_raw and (kept := spliced(data, request_id)) is not None:
        return Answer(kept, None)
    message = parse_message(upstream, data)
    if "method" in message:
        return message
    if message.get("id") != request_id:
        _log.debug("ignoring unrelated response on stream", upstream=upstream)
        return None
    try:
        return Answer(result_of(upstream, message, request_id), None)
    except McpxError as exc:
        return Answer(None, exc)
