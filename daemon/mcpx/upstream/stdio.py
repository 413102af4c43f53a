"""MCP client session with a local stdio server: a child process that speaks newline-delimited JSON-RPC on its
stdin and stdout (protocol `basic/transports`, stdio).

Spawning. `command` and `args` are executed directly (no shell), in a session of their own
(`start_new_session`): signals sent to mcpxd's terminal never reach the child, and its process group is what mcpx
signals on stop, so helpers it started (npx → node) stop with it. The working directory is `cwd`, else the
user's home directory. The environment is minimal: only the variables named in `INHERITED` (and `LC_*`), taken
from mcpxd's own environment, plus the config's `env`, whose values may use `${VAR}` from mcpxd's environment. A
value whose name looks secret, that looks like a token, or that takes a secret-named variable, is registered with
the redactor, so it never reaches a log.

I/O. The child is an `asyncio.SubprocessProtocol`: stdout goes through the sans-I/O `LineFramer`, bounded by
`max_message_bytes`; an oversized line is dropped with a warning, a line that is not JSON-RPC is dropped by
`ChannelSession._received`, and the session goes on (those warnings are limited as stderr lines are, see
`ChannelSession.unreadable`). stderr is free-form logging: each line (at most `STDERR_LINE_BYTES`) is logged at
info level with the upstream's name, redacted, within a `LineBudget` (200 lines at once, then 20 a second; how
many were left out is logged). stdin is written only while less than `STDIN_HIGH_WATER` waits for it (asyncio's
flow control); a request that cannot be written within its deadline fails with an error that says so, and is never
sent.

A child that stops reading. While bytes wait for its stdin, mcpx checks whether the child reads any; when it has
read nothing for the upstream's `timeout` (the deadline of a call: a child that answers each call in time, even one
call at a time, never stops reading that long), it is hung: it is stopped (stdin closed with what it did not read
dropped, at once SIGTERM, then SIGKILL), its calls in flight fail, and the session is lost as when a child dies, so
the supervisor starts a new one. A child that reads, however slowly, or that is merely slow to answer, is not
stopped; nor is one that stops reading while what mcpx sent it still fits in the pipe (nothing waits).

Death and stop. The child has the daemon's `connect_timeout` plus the upstream's `timeout` to answer `initialize`
(it may have to start an interpreter, or download its package). When the child exits on its own (or closes its
stdout), the session is lost with the exit status and the child's last stderr line; the supervisor starts a new
child, with backoff if it keeps dying. Closing the session (shutdown, reload, the end of a per-agent session)
closes stdin, waits `STDIN_GRACE` seconds, sends SIGTERM to the process group, waits `TERM_GRACE` seconds, sends
SIGKILL, and reaps the child. Once the child has exited (on its own or so stopped), what is left of its process
group, the helpers it started, gets SIGTERM, then SIGKILL after `TERM_GRACE` seconds. The stop runs in a task of
its own, so a caller cancelled meanwhile never leaves a child half-stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, Final, cast

from mcpx.auth.credentials import expand_env
from mcpx.config.model import DaemonConfig, UpstreamConfig
from mcpx.errors import CredentialRejected, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from mcpx.framing.ndjson import LineFramer, Oversized
from mcpx.log import LineBudget, get_logger
from mcpx.redact import redact, register_secret
from mcpx.upstream.channel import ChannelSession
from mcpx.upstream.peer import ClientSide, first_of

_log = get_logger("mcpx.upstream.stdio")

DEFAULT_CONNECT_TIMEOUT: Final[float] = DaemonConfig.model_fields["connect_timeout"].default

# What a child inherits from mcpxd's environment (when set there); everything else it gets from `env`.
INHERITED: Final = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "SHELL",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "XDG_RUNTIME_DIR",
        "XDG_CONFIG_HOME",
        "XDG_CACHE_HOME",
        "XDG_DATA_HOME",
        "XDG_STATE_HOME",
    }
)
INHERITED_PREFIXES: Final = ("LC_",)

# The stop sequence (protocol: close stdin, wait, SIGTERM, wait, SIGKILL).
STDIN_GRACE: Final = 2.0
TERM_GRACE: Final = 2.0
_KILL_WAIT: Final = 5.0  # SIGKILL cannot be ignored; this only bounds a wait for the kernel
# After the child exits, its stdout may still hold its last messages (and the other way round).
_END_GRACE: Final = 1.0
# After the stop, how long the last stderr lines may take to arrive (a grandchild may hold the pipe).
_DRAIN_GRACE: Final = 0.5
_GROUP_POLL: Final = 0.05

STDERR_LINE_BYTES: Final = 8192
# What mcpx holds for a child's stdin beyond what the pipe holds: a message is written only while less than this
# waits, so at most this plus one message (bounded by the agent's `max_message_bytes`).
STDIN_HIGH_WATER: Final = 64 * 1024
# While bytes wait for a child's stdin, how often it is checked whether the child read any (at most; a short
# `timeout` is checked 8 times within it).
_STDIN_CHECK_EVERY: Final = 1.0
_LAST_LINE_CHARS: Final = 200

_NOT_READING: Final = "the server process is not reading its stdin (or too slowly)"

_SECRET_NAME = re.compile(r"auth|token|key|secret|passw|cookie|session|credential|signature|private", re.IGNORECASE)
_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _looks_like_token(value: str) -> bool:
    """A long, space-free value of letters and digits that is not a path or URL."""
    return (
        len(value) >= 16
        and not any(c.isspace() for c in value)
        and "/" not in value
        and any(c.isdigit() for c in value)
        and any(c.isalpha() for c in value)
    )


def child_environment(config: UpstreamConfig, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of `config`'s child: the inherited variables of `environ` (mcpxd's), then `env` expanded.

    Raises:
        UpstreamUnavailable: a `${VAR}` in `env` names a variable that is not set.
    """
    environ = os.environ if environ is None else environ
    env = {name: value for name, value in environ.items() if name in INHERITED or name.startswith(INHERITED_PREFIXES)}
    env.setdefault("PATH", os.defpath)
    for name, template in config.env.items():
        try:
            value = expand_env(template, upstream=config.name, what=f"env {name}", environ=environ)
        except CredentialRejected as exc:
            raise UpstreamUnavailable(config.name, exc.reason) from None
        for variable in _REFERENCE.findall(template):
            if _SECRET_NAME.search(variable):
                register_secret(environ[variable])
        if _SECRET_NAME.search(name) or _looks_like_token(value):
            register_secret(value)
        env[name] = value
    return env


def working_directory(config: UpstreamConfig) -> Path:
    """`cwd`, else the home directory. Raises `UpstreamUnavailable` when it is not a directory."""
    cwd = config.cwd if config.cwd is not None else Path.home()
    if not cwd.is_dir():
        raise UpstreamUnavailable(config.name, f"cwd {cwd} is not a directory")
    return cwd


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


class _Child(asyncio.SubprocessProtocol):
    """One child process's pipes and exit, as events the session waits on."""

    def __init__(self, session: StdioSession, max_message_bytes: int, stall_after: float) -> None:
        self._session = session
        self._stdout = LineFramer(max_message_bytes)
        self._stderr = LineFramer(STDERR_LINE_BYTES)
        self.transport: asyncio.SubprocessTransport | None = None
        self.exited = asyncio.Event()
        self.stdout_closed = asyncio.Event()
        self.stderr_closed = asyncio.Event()
        self.stdin_lost = False
        self._writable = asyncio.Event()
        self._writable.set()
        # Its stdin: how many bytes were written to it, whether (and why) it was given up as hung, and the watch of
        # a stdin that does not drain (bytes waiting, none of them read for `stall_after` seconds).
        self.written = 0
        self.hung: str | None = None
        self._stall_after = stall_after
        self._check_every = min(stall_after / 8, _STDIN_CHECK_EVERY)
        self._stdin_check: asyncio.TimerHandle | None = None
        self._taken = 0
        self._taken_at = 0.0
        self.last_stderr: str | None = None
        self._budget = LineBudget()
        # Once what was left of its process group is stopped, the group id is never signalled again: with no
        # member left it may be given to another process.
        self.group_ended = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's process transport has the interface without the class: no isinstance check.
        self.transport = cast(asyncio.SubprocessTransport, transport)

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        raw = data.encode() if isinstance(data, str) else data
        if fd == 1:
            self._messages(self._stdout.feed(raw))
        elif fd == 2:
            self._log_lines(self._stderr.feed(raw))

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd == 0:
            self.stdin_lost = True
            self._writable.set()  # a waiting write finds the pipe gone
            self.stop_watching()
        elif fd == 1:
            self._messages(self._stdout.feed(b"\n"))  # a last message without its newline
            self.stdout_closed.set()
        elif fd == 2:
            self._log_lines(self._stderr.feed(b"\n"))
            self.stderr_closed.set()

    def process_exited(self) -> None:
        self.exited.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    async def writable(self) -> None:
        """Return once a message may be written: less than the high-water mark waits (or the pipe is gone)."""
        while not self._writable.is_set():
            await self._writable.wait()  # woken with others: the first one's message may fill the buffer again

    @property
    def may_write(self) -> bool:
        return self._writable.is_set()

    def stdin(self) -> asyncio.WriteTransport | None:
        """The pipe to the child's stdin while it is open and the child not given up."""
        pipe = self.transport.get_pipe_transport(0) if self.transport is not None else None
        if pipe is None or self.stdin_lost or self.hung is not None or pipe.is_closing():
            return None
        return cast(asyncio.WriteTransport, pipe)

    def unread(self) -> int:
        """The bytes written to the child's stdin that are still in mcpx's buffer: the pipe is full."""
        pipe = self.stdin()
        return pipe.get_write_buffer_size() if pipe is not None else 0

    def wrote(self, size: int) -> None:
        """`size` bytes were written to the child's stdin; when they wait, the stdin is watched until it drains."""
        self.written += size
        if self._stdin_check is None and (unread := self.unread()):
            loop = asyncio.get_running_loop()
            self._taken, self._taken_at = self.written - unread, loop.time()
            self._stdin_check = loop.call_later(self._check_every, self._check_stdin)

    def give_up(self, reason: str) -> None:
        """The child is hung: no more writes (those waiting wake up and fail)."""
        self.hung = reason
        self.stop_watching()
        self._writable.set()

    def stop_watching(self) -> None:
        if self._stdin_check is not None:
            self._stdin_check.cancel()
            self._stdin_check = None

    def _check_stdin(self) -> None:
        # Any byte the child read since the last check is progress: a child that reads slowly is not hung.
        self._stdin_check = None
        unread = self.unread()
        if not unread:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        taken = self.written - unread
        if taken != self._taken:
            self._taken, self._taken_at = taken, now
        elif now - self._taken_at >= self._stall_after:
            self._session.stdin_stalled(self, unread)
            return
        self._stdin_check = loop.call_later(self._check_every, self._check_stdin)

    @property
    def returncode(self) -> int | None:
        return self.transport.get_returncode() if self.transport is not None else None

    def _messages(self, items: list[bytes | Oversized]) -> None:
        for item in items:
            if isinstance(item, Oversized):
                self._session.unreadable("stdio server sent a message over the size limit; skipped", limit=item.limit)
                continue
            try:
                self._session.received(self, item)
            except Exception:  # noqa: BLE001 - the top of one message's handling: the next one must still be read
                _log.exception("failed to handle a message from a stdio server", upstream=self._session.name)

    def _log_lines(self, items: list[bytes | Oversized]) -> None:
        for item in items:
            if isinstance(item, Oversized):
                line = f"<a line over {item.limit} bytes, left out>"
            else:
                line = item.decode("utf-8", "replace")
                self.last_stderr = line
            if not self._budget.take():
                continue
            if left_out := self._budget.left_out():
                _log.info("stdio server stderr lines left out", upstream=self._session.name, count=left_out)
            _log.info("stdio server stderr", upstream=self._session.name, line=line)


class StdioSession(ChannelSession):
    """One child process running a stdio MCP server, and the MCP session with it."""

    def __init__(
        self,
        config: UpstreamConfig,
        *,
        max_message_bytes: int,
        client: ClientSide,
        on_lost: Callable[[str], None],
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        super().__init__(config.name, timeout=config.timeout, client=client, on_lost=on_lost)
        self._connect_timeout = connect_timeout
        if config.command is None:
            raise ValueError(f"upstream {config.name!r} has no command")
        self._config = config
        self._command = config.command
        self._max_message_bytes = max_message_bytes
        self._child: _Child | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopping: set[asyncio.Task[None]] = set()

    @property
    def _handshake_timeout(self) -> float:
        # The child must start first (an `npx`/`uvx` one may even download its package): it has the daemon's
        # connect_timeout on top of the upstream's timeout to answer initialize.
        return self._connect_timeout + self._timeout

    @property
    def pid(self) -> int | None:
        """The running child's process id (for status and tests)."""
        transport = self._child.transport if self._child is not None else None
        return transport.get_pid() if transport is not None else None

    # --- the channel -------------------------------------------------------------------------------------------------

    async def _start_channel(self) -> None:
        env = child_environment(self._config)
        cwd = working_directory(self._config)
        loop = asyncio.get_running_loop()
        spawn = loop.create_task(self._start_child(env, cwd))
        try:
            child = await asyncio.shield(spawn)
        except asyncio.CancelledError:
            # The child may exist already: it is stopped once spawned, by a task of this session.
            spawn.add_done_callback(self._stop_orphan)
            raise
        self._child = child
        self._watch = loop.create_task(self._watch_child(child), name=f"stdio:{self.name}")
        _log.info("stdio server started", upstream=self.name, pid=self.pid, command=self._config.endpoint)

    async def _start_child(self, env: dict[str, str], cwd: Path) -> _Child:
        loop = asyncio.get_running_loop()
        try:
            _, child = await loop.subprocess_exec(
                lambda: _Child(self, self._max_message_bytes, self._timeout),
                self._command,
                *self._config.args,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        except FileNotFoundError:
            if os.sep in self._command:
                why = "no such file"
            else:  # mcpxd's PATH (a service's is short) is the child's, unless `env` sets one
                why = f"not found on PATH ({env['PATH']}): give its full path, or set PATH in `env`"
            raise UpstreamUnavailable(self.name, f"cannot start {self._command!r}: {why}") from None
        except OSError as exc:
            why = exc.strerror or type(exc).__name__
            raise UpstreamUnavailable(self.name, f"cannot start {self._command!r}: {why}") from None
        if (stdin := child.stdin()) is not None:
            stdin.set_write_buffer_limits(high=STDIN_HIGH_WATER)
        return child

    def _stop_orphan(self, spawn: asyncio.Task[_Child]) -> None:
        if not spawn.cancelled() and spawn.exception() is None:
            self._stop_in_background(spawn.result(), None)

    def received(self, child: _Child, raw: bytes) -> None:
        """One line of `child`'s stdout (called by its protocol); dropped unless it is the session's child."""
        if child is self._child:
            self._received(raw)

    async def _send(self, data: bytes, *, replayable: bool = True) -> None:
        child = self._child
        if child is not None and not child.may_write:
            # Written only once the buffer is under its high-water mark: what a child does not read waits here, not
            # in memory. A request waits at most its deadline (`request`'s), anything else the upstream's timeout.
            try:
                async with asyncio.timeout(self._timeout):
                    await child.writable()
            except TimeoutError:
                raise UpstreamTimeout(
                    self.name, f"a message could not be written within {self._timeout:g} s: {_NOT_READING}"
                ) from None
        stdin = child.stdin() if child is not None and child is self._child else None
        if child is None or stdin is None:
            hung = child.hung if child is not None else None
            raise UpstreamUnavailable(self.name, hung or "the server process is not running")
        try:
            stdin.writelines((data, b"\n"))
        except (BrokenPipeError, ConnectionResetError):
            raise UpstreamUnavailable(self.name, "the server process closed its stdin") from None
        child.wrote(len(data) + 1)

    def _output_mark(self) -> int:
        return self._child.written if self._child is not None else 0

    def _timed_out(self, method: str, timeout: float, mark: int | None) -> UpstreamError:
        child = self._child
        if mark is None:
            return UpstreamTimeout(self.name, f"{method} could not be written within {timeout:g} s: {_NOT_READING}")
        if child is not None and child.written - child.unread() < mark:
            return UpstreamTimeout(
                self.name,
                f"no answer to {method} within {timeout:g} s: the server process had not read all of it from its stdin",
            )
        return super()._timed_out(method, timeout, mark)

    def stdin_stalled(self, child: _Child, unread: int) -> None:
        """`child` read nothing of the `unread` bytes waiting for its stdin for the upstream's `timeout`: it is hung
        (one that answers each call within its deadline never stops reading that long, even one call at a time). It
        is stopped, and the session lost as when a child dies, so that the supervisor starts a new one."""
        if child is not self._child:
            return
        reason = (
            f"the server process stopped reading its stdin (nothing read for {self._timeout:g} s), so it was stopped"
        )
        _log.warning(
            "stdio server stopped reading its stdin; stopping it",
            upstream=self.name,
            pid=self.pid,
            seconds=self._timeout,
            unread_bytes=unread,
        )
        child.give_up(reason)
        watch, self._child, self._watch = self._watch, None, None
        self._stop_in_background(child, watch)
        self._lost(reason)

    async def _stop_channel(self) -> None:
        child, watch = self._child, self._watch
        self._child = self._watch = None
        if child is not None:
            self._stop_in_background(child, watch)
        if self._stopping:
            await asyncio.shield(asyncio.gather(*self._stopping, return_exceptions=True))

    def _stop_in_background(self, child: _Child, watch: asyncio.Task[None] | None) -> None:
        task = asyncio.get_running_loop().create_task(self._stop(child, watch), name=f"stdio-stop:{self.name}")
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def _stop(self, child: _Child, watch: asyncio.Task[None] | None) -> None:
        child.stop_watching()
        if watch is not None and watch is not asyncio.current_task():
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        transport = child.transport
        if transport is None:
            return
        pid = transport.get_pid()
        how = "had exited"
        try:
            if child.returncode is None:
                stdin = transport.get_pipe_transport(0)
                how = "stdin closed"
                if child.hung is None:
                    if stdin is not None:
                        stdin.close()
                    exited = await _within(child.exited.wait(), STDIN_GRACE)
                else:
                    # A hung child would see the end of its stdin only after the bytes it does not read: those are
                    # dropped, and the end is not waited for.
                    if stdin is not None:
                        cast(asyncio.WriteTransport, stdin).abort()
                    exited = False
                if not exited:
                    how = "SIGTERM"
                    _signal_group(child, signal.SIGTERM)
                    if not await _within(child.exited.wait(), TERM_GRACE):
                        how = "SIGKILL"
                        _log.warning(
                            "stdio server ignored stdin close and SIGTERM; killing it", upstream=self.name, pid=pid
                        )
                        _signal_group(child, signal.SIGKILL)
                        await _within(child.exited.wait(), _KILL_WAIT)
            helpers = await _end_group(child) if child.returncode is not None else None
            await _within(_both(child.stdout_closed, child.stderr_closed), _DRAIN_GRACE)
        finally:
            transport.close()
        code = child.returncode
        status = describe_exit(code) if code is not None else "did not exit"
        extra = {"helpers_stopped_by": helpers} if helpers is not None else {}
        _log.info("stdio server stopped", upstream=self.name, pid=pid, by=how, status=status, **extra)

    async def _watch_child(self, child: _Child) -> None:
        """Report the session lost when the child exits or closes its stdout on its own."""
        await first_of(child.exited, child.stdout_closed)
        # The other half follows at once in the common case: the last messages are read before the loss is told.
        await _within(_both(child.exited, child.stdout_closed), _END_GRACE)
        code = child.returncode
        reason = f"the server process {describe_exit(code)}" if code is not None else "the server closed its stdout"
        if child.last_stderr:
            reason += f" (its last stderr line: {redact(child.last_stderr.strip())[:_LAST_LINE_CHARS]})"
        if self._child is child:
            _log.warning("stdio server ended", upstream=self.name, pid=self.pid, reason=reason)
            self._lost(reason)
        # What the server started may outlive it; it is stopped now, not when the session is next closed or
        # reconnected (`_stop` cancels this and ends the group itself).
        if code is not None:
            await _end_group(child)


def _signal_group(child: _Child, signum: int) -> None:
    """Signal the child's process group (its own session), only while the child is not reaped: its pid, and so
    its group id, cannot have been reused by then."""
    transport = child.transport
    if transport is not None and child.returncode is None:
        _signal_members(transport.get_pid(), signum)


async def _end_group(child: _Child) -> str | None:
    """Stop what is left of `child`'s process group once the child, its leader, has exited: the helpers it
    started (SIGTERM, then SIGKILL after `TERM_GRACE`). Returns the signal that ended them, None when there were
    none (or it was done before). While the group has members its id is not given to a new process, so the group
    is still the child's."""
    if child.group_ended or child.transport is None:
        return None
    pgid = child.transport.get_pid()
    ended_by: str | None = None
    if _signal_members(pgid, signal.SIGTERM):
        ended_by = "SIGKILL"
        deadline = time.monotonic() + TERM_GRACE
        while time.monotonic() < deadline:
            # No event tells when the last member of a group is gone: asked every `_GROUP_POLL` seconds.
            await asyncio.sleep(_GROUP_POLL)
            if not _signal_members(pgid, 0):
                ended_by = "SIGTERM"
                break
        else:
            _signal_members(pgid, signal.SIGKILL)
    # (not when cancelled midway: then whoever cancelled it ends the group)
    child.group_ended = True
    return ended_by


def _signal_members(pgid: int, signum: int) -> bool:
    """Signal process group `pgid`; False when it has no member left (or none mcpx may signal)."""
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        return False
    return True


async def _within(awaitable: Coroutine[Any, Any, Any], seconds: float) -> bool:
    """Await `awaitable` at most `seconds`; True when it finished in time."""
    try:
        async with asyncio.timeout(seconds):
            await awaitable
    except TimeoutError:
        return False
    return True


async def _both(*events: asyncio.Event) -> None:
    for event in events:
        await event.wait()
