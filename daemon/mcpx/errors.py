"""Every error mcpx raises, split by who is to blame, and their one mapping to the wire.

    McpxError
    ├── AgentError            the agent sent something wrong        → JSON-RPC error to that agent
    │   ├── ParseError, InvalidRequest, MethodNotFound, InvalidParams
    │   ├── UnsupportedProtocolVersion  a 2026-07-28 request names a version mcpx does not speak
    │   └── InputRefused    the agent refused a 2026-07-28 upstream's request for input: the call ends with it
    ├── UpstreamError         an upstream failed or misbehaved       → tool error (tools/call) or JSON-RPC error
    │   ├── UpstreamUnavailable, UpstreamTimeout, UpstreamProtocolError, UpstreamHTTPError
    │   ├── UpstreamInterrupted the request's fate is unknown (not sent twice): the upstream itself is not broken
    │   ├── SessionExpired      the upstream forgot our session (404): re-initialized and retried, never shown
    │   ├── CredentialRejected  the upstream refused our credential (fix the env var / file named in the message)
    │   └── UpstreamRpcError    the upstream answered with a JSON-RPC error: forwarded unchanged
    ├── ConfigError           the configuration is wrong             → mcpxd exits / reload refused
    └── NeedsLogin            the user must log in to an upstream    → tool error naming the command to run

`FrameTooLarge` is raised by the sans-I/O framers, which do not know which side they parse; the I/O layer
re-types it by blame (as h11 does with local/remote protocol errors).

`jsonrpc_error` and `tool_error_result` are the only places an exception becomes wire data; both run the text
through the secret redactor, so a token echoed by an upstream never reaches an agent.
"""

from __future__ import annotations

from typing import Any

from mcpx.redact import redact

# JSON-RPC 2.0 / MCP error codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
UNSUPPORTED_PROTOCOL_VERSION = -32022  # (protocol 2026-07-28 `basic/versioning`)
# mcpx's own server-defined codes (JSON-RPC reserves -32000..-32099 for implementations).
UPSTREAM_FAILED = -32001
CONFIG_INVALID = -32002


class McpxError(Exception):
    """Base of every error mcpx raises on purpose."""


class FrameTooLarge(McpxError):
    """A framer's buffer limit was exceeded; re-typed by the caller according to which side sent it."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"message larger than the {limit}-byte limit")
        self.limit = limit


# --- the agent is to blame ---------------------------------------------------------------------------------------


class AgentError(McpxError):
    """The agent sent something wrong; it gets a JSON-RPC error and the session goes on."""

    code = INVALID_REQUEST


class ParseError(AgentError):
    code = PARSE_ERROR


class InvalidRequest(AgentError):
    code = INVALID_REQUEST


class MethodNotFound(AgentError):
    code = METHOD_NOT_FOUND


class InvalidParams(AgentError):
    code = INVALID_PARAMS


class UnsupportedProtocolVersion(AgentError):
    """A 2026-07-28 request names a protocol version mcpx does not speak; the error lists those it does."""

    code = UNSUPPORTED_PROTOCOL_VERSION

    def __init__(self, requested: str, supported: tuple[str, ...]) -> None:
        super().__init__(f"unsupported protocol version {requested!r}; supported: {', '.join(supported)}")
        self.requested = requested
        self.supported = supported


class InputRefused(AgentError):
    """The agent answered an upstream's request for input (protocol 2026-07-28 MRTR: elicitation, sampling, roots)
    with an error. That protocol has no way to hand an error back to the server, so the call that asked ends with
    the agent's own error code."""

    def __init__(self, method: str, error: object) -> None:
        code = error.get("code") if isinstance(error, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        super().__init__(f"{method} was refused: {message if isinstance(message, str) else 'error'}")
        self.code = code if type(code) is int else INTERNAL_ERROR


# --- an upstream is to blame -------------------------------------------------------------------------------------


class UpstreamError(McpxError):
    """An upstream failed or misbehaved. The message always names the upstream."""

    def __init__(self, upstream: str, reason: str) -> None:
        super().__init__(f"upstream '{upstream}': {reason}")
        self.upstream = upstream
        self.reason = reason


class UpstreamUnavailable(UpstreamError):
    """The upstream cannot be reached (down, refusing connections, or not yet connected)."""


class UpstreamInterrupted(UpstreamError):
    """The connection carrying a request closed before any answer, and the request, which must not be carried out
    twice (a tool call), was not sent again: it may or may not have run. The upstream is not taken for down."""


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer within its configured timeout."""


class UpstreamProtocolError(UpstreamError):
    """The upstream sent something that is not valid MCP over its transport."""


class UpstreamHTTPError(UpstreamError):
    """The upstream answered with an HTTP status mcpx cannot recover from; `rpc_code` is the code of the JSON-RPC
    error its body held, if it held one."""

    def __init__(self, upstream: str, status: int, reason: str, rpc_code: int | None = None) -> None:
        super().__init__(upstream, reason)
        self.status = status
        self.rpc_code = rpc_code


class SessionExpired(UpstreamError):
    """The upstream forgot our MCP session (HTTP 404); the client re-initializes and retries once."""


class CredentialRejected(UpstreamError):
    """The upstream refused the credential mcpx sent (or it could not be read); the message says what to fix."""


class UpstreamRpcError(UpstreamError):
    """The upstream answered a request with a JSON-RPC error object; it reaches the agent unchanged."""

    def __init__(self, upstream: str, error: dict[str, Any]) -> None:
        message = error.get("message")
        super().__init__(upstream, str(message) if message is not None else "error")
        self.error = error


# --- the configuration is to blame -------------------------------------------------------------------------------


class ConfigError(McpxError):
    """The configuration is invalid. `problems` lists every finding, each naming file, upstream and field."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# --- the user must act -------------------------------------------------------------------------------------------


class NeedsLogin(McpxError):
    """An upstream needs the user to log in; calls fail at once with the command that fixes it."""

    def __init__(self, upstream: str, command: str) -> None:
        super().__init__(f"upstream '{upstream}' needs a login: run `{command}`")
        self.upstream = upstream
        self.command = command


class LoginFailed(McpxError):
    """`mcpxctl login` could not complete; the message says why (never with a token or code in it)."""

    def __init__(self, upstream: str, reason: str) -> None:
        super().__init__(f"login to '{upstream}' failed: {reason}")
        self.upstream = upstream
        self.reason = reason


# --- the one mapping to the wire ---------------------------------------------------------------------------------


def jsonrpc_error(exc: McpxError) -> dict[str, Any]:
    """The JSON-RPC `error` object an agent receives for `exc`."""
    if isinstance(exc, UpstreamRpcError):
        return exc.error
    if isinstance(exc, UnsupportedProtocolVersion):
        data = {"supported": list(exc.supported), "requested": redact(exc.requested)}
        return {"code": exc.code, "message": redact(str(exc)), "data": data}
    if isinstance(exc, AgentError):
        return {"code": exc.code, "message": redact(str(exc))}
    if isinstance(exc, ConfigError):
        message = "the configuration is invalid; the running configuration is kept"
        return {"code": CONFIG_INVALID, "message": message, "data": {"problems": [redact(p) for p in exc.problems]}}
    if isinstance(exc, UpstreamError | NeedsLogin | LoginFailed):
        return {"code": UPSTREAM_FAILED, "message": redact(str(exc)), "data": {"upstream": exc.upstream}}
    return {"code": INTERNAL_ERROR, "message": redact(str(exc))}


def tool_error_result(exc: UpstreamError | NeedsLogin) -> dict[str, Any]:
    """The `CallToolResult` an agent receives when the upstream owning a tool cannot run it."""
    return {"content": [{"type": "text", "text": redact(str(exc))}], "isError": True}


def unanswered(method: str, why: str, *, code: int = METHOD_NOT_FOUND) -> dict[str, Any]:
    """The answer (`{"error": …}`) an upstream gets when its request to the client cannot be put to an agent, or the
    agent did not answer it."""
    return {"error": {"code": code, "message": redact(f"{method}: {why}")}}
