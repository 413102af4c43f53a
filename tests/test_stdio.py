"""StdioSession driven directly against a real SDK stdio server (tests/support/stdio_server.py) as a child
process: spawn, calls, the minimal environment, stderr, garbage on stdout, death, and the stop sequence; and the
fault of a child that stops reading its stdin, or reads it slowly (tests/support/stdio_stops_reading.py)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from mcpx.config.model import UpstreamConfig
from mcpx.errors import UpstreamError, UpstreamUnavailable
from mcpx.jsonrpc import Message
from mcpx.redact import redact
from mcpx.upstream import stdio
from mcpx.upstream.stdio import INHERITED, STDIN_HIGH_WATER, StdioSession, child_environment
from tests.support.lifecycle import wait_for_exit
from tests.support.stdio import SERVER, STOPS_READING, gone


class Client:
    """The client side of the session: collects the server's notifications, refuses its requests."""

    agent: object = None

    def __init__(self) -> None:
        self.notifications: list[Message] = []

    def notify(self, message: Message) -> None:
        self.notifications.append(message)

    async def ask(self, method: str, params: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
        return {"error": {"code": -32601, "message": f"{method} not supported here"}}


class Lost:
    """The session's `on_lost`: an event and the reason."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.reasons: list[str] = []

    def __call__(self, reason: str) -> None:
        self.reasons.append(reason)
        self.event.set()


def config(*server_args: str, name: str = "local", **fields: Any) -> UpstreamConfig:
    return UpstreamConfig(name=name, command=sys.executable, args=(SERVER, name, *server_args), **fields)


@asynccontextmanager
async def session(
    upstream: UpstreamConfig, *, max_message_bytes: int = 1 << 20, lost: Lost | None = None
) -> AsyncIterator[StdioSession]:
    opened = StdioSession(upstream, max_message_bytes=max_message_bytes, client=Client(), on_lost=lost or Lost())
    async with asyncio.timeout(30):
        await opened.connect()
    try:
        yield opened
    finally:
        async with asyncio.timeout(30):
            await opened.close()


async def call(opened: StdioSession, tool: str, **arguments: Any) -> Any:
    result = await opened.request("tools/call", {"name": tool, "arguments": arguments}, timeout=20)
    assert isinstance(result, dict)
    assert not result.get("isError"), result
    structured = result.get("structuredContent")
    if isinstance(structured, dict) and "result" in structured:
        return structured["result"]
    return result["content"][0]["text"]


@pytest.fixture
def quick_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stdio, "STDIN_GRACE", 0.5)
    monkeypatch.setattr(stdio, "TERM_GRACE", 0.5)


async def test_handshake_list_and_call_then_stdin_close_stops_it() -> None:
    with capture_logs() as logs:
        async with session(config()) as opened:
            assert opened.server_info["name"] == "local"
            tools = await opened.request("tools/list", None, timeout=20)
            assert {"echo", "crash", "env_names"} <= {tool["name"] for tool in tools["tools"]}
            assert await call(opened, "echo", text="hi") == "local:hi"
            pid = opened.pid
            assert pid is not None
    assert gone(pid)
    stopped = [event for event in logs if event["event"] == "stdio server stopped"]
    assert [(event["by"], event["status"]) for event in stopped] == [("stdin closed", "exited with status 0")]
    started = [event for event in logs if event["event"] == "stdio server started"]
    assert started[0]["pid"] == pid


async def test_the_child_gets_a_minimal_environment_plus_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MCPX_TEST_CANARY", "canary-value-that-must-not-leak")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-for-children")
    monkeypatch.setenv("LC_TIME", "C")
    monkeypatch.setenv("FROM_DAEMON", "daemon-value")
    upstream = config(env={"GREETING": "hello ${FROM_DAEMON}", "PLAIN": "1"}, cwd=tmp_path)
    async with session(upstream) as opened:
        names = set(await call(opened, "env_names"))
        assert await call(opened, "env_value", variable="GREETING") == "hello daemon-value"
        assert await call(opened, "where") == str(tmp_path)
    assert {"GREETING", "PLAIN", "LC_TIME", "PATH"} <= names
    assert "MCPX_TEST_CANARY" not in names
    assert "AWS_SECRET_ACCESS_KEY" not in names
    # Python itself may add a variable or two at start-up (e.g. LC_CTYPE coercion); nothing else arrives.
    unexpected = {name for name in names - INHERITED - {"GREETING", "PLAIN"} if not name.startswith("LC_")}
    assert unexpected == set()


def test_secret_looking_env_values_are_registered_with_the_redactor() -> None:
    environ = {"PATH": "/bin", "GITHUB_TOKEN": "ghp-from-the-daemon-environment", "WHERE": "/srv/data"}
    upstream = config(
        env={
            "API_KEY": "plain-key-value",  # a secret name
            "OPAQUE": "a1b2c3d4e5f6g7h8i9j0",  # a token's shape
            "HEADER": "Bearer ${GITHUB_TOKEN}",  # takes a secret-named variable
            "DATA_DIR": "${WHERE}/x",  # neither
        }
    )
    env = child_environment(upstream, environ)
    assert env["HEADER"] == "Bearer ghp-from-the-daemon-environment"
    assert env["DATA_DIR"] == "/srv/data/x"
    assert set(env) == {"PATH", "API_KEY", "OPAQUE", "HEADER", "DATA_DIR"}
    for secret in ("plain-key-value", "a1b2c3d4e5f6g7h8i9j0", "ghp-from-the-daemon-environment"):
        assert secret not in redact(f"x {secret} y")
    assert redact("/srv/data/x") == "/srv/data/x"


async def test_an_unset_variable_in_env_is_named() -> None:
    upstream = config(env={"TOKEN": "${MCPX_TEST_SURELY_UNSET}"})
    opened = StdioSession(upstream, max_message_bytes=1 << 20, client=Client(), on_lost=Lost())
    with pytest.raises(UpstreamUnavailable, match="MCPX_TEST_SURELY_UNSET"):
        await opened.connect()


async def test_a_missing_command_or_cwd_is_reported() -> None:
    missing = UpstreamConfig(name="nope", command="mcpx-test-no-such-command")
    opened = StdioSession(missing, max_message_bytes=1 << 20, client=Client(), on_lost=Lost())
    with pytest.raises(UpstreamUnavailable, match="cannot start 'mcpx-test-no-such-command': not found on PATH"):
        await opened.connect()
    absent = UpstreamConfig(name="nope", command="/nonexistent-mcpx-test-dir/server")
    opened = StdioSession(absent, max_message_bytes=1 << 20, client=Client(), on_lost=Lost())
    with pytest.raises(UpstreamUnavailable, match="no such file"):
        await opened.connect()
    nowhere = config(cwd=Path("/nonexistent-mcpx-test-dir"))
    opened = StdioSession(nowhere, max_message_bytes=1 << 20, client=Client(), on_lost=Lost())
    with pytest.raises(UpstreamUnavailable, match="nonexistent-mcpx-test-dir is not a directory"):
        await opened.connect()


async def test_stderr_lines_are_logged_with_the_upstream_name() -> None:
    with capture_logs() as logs:
        async with session(config()) as opened:
            await call(opened, "say", text="hello from stderr")
            await call(opened, "echo", text="x")
    lines = [event["line"] for event in logs if event["event"] == "stdio server stderr"]
    assert "local started" in lines
    assert "hello from stderr" in lines
    assert all(event["upstream"] == "local" for event in logs if event["event"] == "stdio server stderr")


async def test_a_garbage_line_and_an_oversized_line_are_skipped_and_the_session_goes_on() -> None:
    lost = Lost()
    with capture_logs() as logs:
        async with session(config(), max_message_bytes=64 * 1024, lost=lost) as opened:
            assert await call(opened, "garbage") == "after garbage"
            assert await call(opened, "garbage", size=200_000) == "after garbage"
            assert await call(opened, "echo", text="still") == "local:still"
    assert not lost.reasons
    events = [event["event"] for event in logs]
    assert "upstream sent something that is not JSON-RPC" in events
    assert "stdio server sent a message over the size limit; skipped" in events


async def test_a_flood_of_garbage_on_stdout_is_logged_within_a_budget_with_what_was_left_out() -> None:
    lines = 5000
    with capture_logs() as logs:
        async with session(config()) as opened:
            assert await call(opened, "garbage", lines=lines) == "after garbage"
            assert await call(opened, "echo", text="still") == "local:still"
    warned = [event for event in logs if event["event"] == "upstream sent something that is not JSON-RPC"]
    left_out = [event["count"] for event in logs if event["event"].endswith("left out of the log")]
    assert len(warned) < lines // 10
    assert len(warned) + sum(left_out) == lines  # each line is warned of or counted


@pytest.mark.usefixtures("quick_stop")
async def test_helpers_a_server_started_are_stopped_when_it_exits_on_stdin_close() -> None:
    async with session(config()) as opened:
        helper = await call(opened, "helper")
    await wait_for_exit(helper, 10)


@pytest.mark.usefixtures("quick_stop")
async def test_helpers_a_server_started_are_stopped_when_it_crashes() -> None:
    lost = Lost()
    async with session(config(), lost=lost) as opened:
        helper = await call(opened, "helper")
        with pytest.raises(UpstreamUnavailable):
            await opened.request("tools/call", {"name": "crash", "arguments": {"status": 1}}, timeout=20)
        await wait_for_exit(helper, 10)  # at once, not when the session is next reconnected or closed
        assert lost.reasons


async def test_a_crash_fails_the_call_in_flight_and_reports_the_loss_with_the_status() -> None:
    lost = Lost()
    async with session(config(), lost=lost) as opened:
        pid = opened.pid
        with pytest.raises(UpstreamUnavailable) as raised:
            await opened.request("tools/call", {"name": "crash", "arguments": {"status": 7}}, timeout=20)
        assert "exited with status 7" in str(raised.value)
        assert "local crashing with 7" in str(raised.value)  # the last stderr line says why
        async with asyncio.timeout(10):
            await lost.event.wait()
        assert lost.reasons == [raised.value.reason]
        with pytest.raises(UpstreamUnavailable):
            await opened.request("tools/list", None, timeout=5)
        # Connecting again starts a new child.
        async with asyncio.timeout(30):
            await opened.connect()
        assert opened.pid != pid
        assert await call(opened, "echo", text="again") == "local:again"
    assert pid is not None and gone(pid)


async def test_a_child_that_dies_during_the_handshake_fails_connect_with_its_stderr() -> None:
    upstream = UpstreamConfig(
        name="dies",
        command=sys.executable,
        args=("-c", "import sys; print('missing API key', file=sys.stderr); sys.exit(3)"),
    )
    opened = StdioSession(upstream, max_message_bytes=1 << 20, client=Client(), on_lost=Lost())
    with pytest.raises(UpstreamUnavailable) as raised:
        async with asyncio.timeout(20):
            await opened.connect()
    assert "exited with status 3" in str(raised.value)
    assert "missing API key" in str(raised.value)
    await opened.close()


@pytest.mark.usefixtures("quick_stop")
async def test_a_child_that_ignores_stdin_close_and_sigterm_is_killed() -> None:
    with capture_logs() as logs:
        async with session(config("--stubborn")) as opened:
            assert await call(opened, "echo", text="x") == "local:x"
            pid = opened.pid
    assert pid is not None and gone(pid)
    stopped = [event for event in logs if event["event"] == "stdio server stopped"]
    assert [(event["by"], event["status"]) for event in stopped] == [("SIGKILL", "was killed by SIGKILL")]


@pytest.mark.usefixtures("quick_stop")
async def test_a_close_cancelled_midway_still_stops_the_child() -> None:
    opened = StdioSession(config("--stubborn"), max_message_bytes=1 << 20, client=Client(), on_lost=Lost())
    async with asyncio.timeout(30):
        await opened.connect()
    pid = opened.pid
    assert pid is not None
    closing = asyncio.ensure_future(opened.close())
    await asyncio.sleep(0)  # let the close begin (a yield, not a wait for time)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    async with asyncio.timeout(10):
        await opened.close()  # waits for the stop already under way
    assert gone(pid)


def stops_reading(*args: str, timeout: float) -> UpstreamConfig:
    return UpstreamConfig(name="hangs", command=sys.executable, args=(STOPS_READING, *args), timeout=timeout)


def echo_params(size: int) -> dict[str, Any]:
    return {"name": "echo", "arguments": {"text": "x" * size}}


async def test_a_child_that_stops_reading_its_stdin_is_stopped_and_its_calls_fail_in_time() -> None:
    timeout = 0.5  # the upstream's: each call's deadline, and how long a stdin may take nothing while bytes wait
    size = 1 << 20  # far more than the pipe holds
    lost = Lost()
    with capture_logs() as logs:
        async with session(stops_reading(timeout=timeout), lost=lost) as opened:
            pid = opened.pid
            assert pid is not None
            frozen = await opened.request("tools/call", {"name": "freeze", "arguments": {}}, timeout=20)
            assert frozen["content"][0]["text"] == "frozen"  # and it reads nothing from now on

            loop = asyncio.get_running_loop()
            started = loop.time()
            calls = [opened.request("tools/call", echo_params(size), timeout=timeout) for _ in range(3)]
            async with asyncio.timeout(10):
                outcomes = await asyncio.gather(*calls, return_exceptions=True)
            elapsed = loop.time() - started
            assert all(isinstance(outcome, UpstreamError) for outcome in outcomes), outcomes
            assert all("stdin" in str(outcome) for outcome in outcomes), outcomes
            assert elapsed < timeout + 1.0  # at its deadline (with room for a busy machine), not later

            async with asyncio.timeout(10):
                await lost.event.wait()
            assert lost.reasons == [
                "the server process stopped reading its stdin (nothing read for 0.5 s), so it was stopped"
            ]
            await wait_for_exit(pid, 10)
            with pytest.raises(UpstreamUnavailable):
                await opened.request("tools/call", echo_params(1), timeout=5)

            # Connecting again (what the supervisor does) starts a new child, which answers.
            async with asyncio.timeout(30):
                await opened.connect()
            assert opened.pid != pid
            answer = await opened.request("tools/call", echo_params(size), timeout=20)
            assert answer["content"][0]["text"] == f"{size} from {opened.pid}"
    assert gone(pid)
    stalled = [event for event in logs if event["event"] == "stdio server stopped reading its stdin; stopping it"]
    assert [(event["log_level"], event["upstream"], event["pid"]) for event in stalled] == [("warning", "hangs", pid)]
    # Only one of the three requests was written: the others waited for a stdin that did not drain, and failed.
    assert stalled[0]["unread_bytes"] < size + STDIN_HIGH_WATER
    stopped = [event for event in logs if event["event"] == "stdio server stopped" and event["pid"] == pid]
    assert [(event["by"], event["status"]) for event in stopped] == [("SIGTERM", "was killed by SIGTERM")]


async def test_a_child_that_reads_its_stdin_slowly_is_not_stopped() -> None:
    timeout = 0.3  # how long its stdin may take nothing; it takes a little every `PAUSE` (20 ms)
    size = 1 << 20  # 64 reads of 16 KiB: well over `timeout` to read it all
    lost = Lost()
    with capture_logs() as logs:
        async with session(stops_reading("--slow", timeout=timeout), lost=lost) as opened:
            pid = opened.pid
            loop = asyncio.get_running_loop()
            started = loop.time()
            answer = await opened.request("tools/call", echo_params(size), timeout=30)
            assert loop.time() - started > timeout  # the stdin did not drain within the bound, and that is fine
            assert answer["content"][0]["text"] == f"{size} from {pid}"
            answer = await opened.request("tools/call", echo_params(3), timeout=30)
            assert answer["content"][0]["text"] == f"3 from {pid}"
            assert opened.pid == pid
    assert not lost.reasons
    assert not [event for event in logs if event["event"] == "stdio server stopped reading its stdin; stopping it"]
