"""`mcpxd`: load the config, bind the socket, run the router and serve agents until SIGTERM/SIGINT.

Runs in the foreground (systemd, launchd and `mcpx-shim` start it). SIGHUP reloads the config. Readiness is
reported with sd_notify (READY=1) once the socket is served, which is also how tests wait for it; reloads,
the watchdog and socket activation are in `notify.py` and `downstream/listener.py`.

SIGTERM and SIGINT stop gracefully: no new connections; agents are told (a `notifications/message` where the
logging capability is offered); the calls in flight get `--stop-timeout` seconds to finish, and those that do not
are answered with an error; agents attached through `mcpx-shim` are handed back to it (see
`downstream/server.py`), which reconnects them to the next mcpxd once this one has exited; upstream sessions are
closed (DELETE); exit status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import sdnotify

from mcpx import __version__, jsonrpc, paths
from mcpx.auth.oauth.credential import LoginError, OAuthCredential
from mcpx.config import Config, load_config
from mcpx.downstream.listener import (
    AlreadyRunning,
    SocketLock,
    StartupError,
    activated_socket,
    bind_socket,
    ensure_private_dir,
)
from mcpx.downstream.server import AgentConnection, AgentListener
from mcpx.errors import ConfigError, InvalidParams, LoginFailed, McpxError
from mcpx.log import configure_logging, get_logger, journal_stream
from mcpx.notify import reloading, watchdog, watchdog_interval
from mcpx.router.router import Router
from mcpx.upstream.supervisor import ManagedUpstream

_log = get_logger("mcpx.daemon")

EXIT_CONFIG = 2
EXIT_STARTUP = 3
EXIT_ALREADY_RUNNING = 4
EXIT_SERVING_FAILED = 5  # the accept loop failed: a restart may help (systemd: Restart=on-failure)

# Seconds the calls in flight get to finish at a stop. With the flush and the upstream DELETEs (2 s each, in
# parallel) it stays within the units' stop timeouts (systemd TimeoutStopSec=20, launchd ExitTimeOut=20).
STOP_TIMEOUT = 10.0


class Daemon:
    def __init__(
        self,
        config: Config,
        config_path: Path,
        socket_path: Path,
        state_dir: Path,
        inherited: socket.socket | None = None,
        *,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.socket_path = socket_path
        self.state_dir = state_dir
        self.router = Router(config, state_dir)
        self.connections: set[AgentConnection] = set()
        self.started_at = time.time()
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._reloads: set[asyncio.Task[dict[str, Any]]] = set()
        self._notifier = sdnotify.SystemdNotifier()
        self._inherited = inherited  # the socket unit's listening socket (socket activation)
        self._serving_failed = False
        self.stop_timeout = stop_timeout
        # Lifelines of the agents handed back to their shims: closed when this daemon is done (lock released).
        self._handed_over: list[socket.socket] = []

    async def run(self, lock: SocketLock) -> int:
        loop = asyncio.get_running_loop()
        sock = bind_socket(self.socket_path) if self._inherited is None else self._inherited
        # At exit the socket file is removed only if this daemon bound it (a socket unit keeps its own).
        bound = os.stat(self.socket_path) if self._inherited is None else None
        await self.router.start()
        max_bytes = self.config.daemon.max_message_bytes
        listener = AgentListener(
            sock,
            lambda peer, lifeline: AgentConnection(
                self.router, self, self.connections, max_bytes, peer=peer, lifeline=lifeline
            ),
            max_resume_bytes=4 * max_bytes,
        )
        serving = loop.create_task(listener.serve())
        serving.add_done_callback(self._serving_ended)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop_signal)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self._reload_from_signal()))
        _log.info("mcpxd serving", socket=str(self.socket_path), config=str(self.config_path), pid=os.getpid())
        self._notifier.notify(f"READY=1\nSTATUS={self._summary()}\nMAINPID={os.getpid()}")
        pinging = loop.create_task(watchdog(self._notifier, watchdog_interval()))
        try:
            await self._stop.wait()
            self._notifier.notify("STOPPING=1")
            # Stop accepting: a shim that connects from now on finds no daemon (or, under socket activation, waits
            # in the socket unit's queue for the next one).
            serving.cancel()
            listener.close()
            self._remove_socket_file(bound)
            await self._wind_down()
        finally:
            serving.cancel()
            pinging.cancel()
            listener.close()
            for connection in list(self.connections):
                connection.close()
            for unfinished in list(self._reloads):
                unfinished.cancel()
            await self.router.stop()
            self._remove_socket_file(bound)
            lock.release()
            # Only now may the shims reconnect (and start the next mcpxd, which needs the lock).
            for lifeline in self._handed_over:
                lifeline.close()
            self._handed_over.clear()
        return EXIT_SERVING_FAILED if self._serving_failed else 0

    def _stop_signal(self) -> None:
        if self._stop.is_set():
            _log.warning("already stopping: calls in flight get their time", stop_timeout_s=self.stop_timeout)
        self._stop.set()

    async def _wind_down(self) -> None:
        """Let every agent's calls finish (bounded), answer the rest, hand attached agents back to their shims."""
        connections = list(self.connections)
        _log.info("mcpxd stopping", agents=self._agent_count(), stop_timeout_s=self.stop_timeout)
        tell = "logging" in self.router.capabilities()  # MCP: log messages only from servers that offer logging
        outcomes = await asyncio.gather(
            *(
                connection.stop(self.stop_timeout, self._stop_notice(connection.attached) if tell else None)
                for connection in connections
            ),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, socket.socket):
                self._handed_over.append(outcome)
            elif isinstance(outcome, BaseException) and not isinstance(outcome, asyncio.CancelledError):
                _log.error("an agent connection failed to stop", error=repr(outcome))
        if connections:
            _log.info("agents handed back to their shims", count=len(self._handed_over), connections=len(connections))

    def _stop_notice(self, attached: bool) -> bytes:
        then = (
            "requests sent from now on are answered by the next mcpxd, which mcpx-shim reconnects this session to"
            if attached
            else "this connection then closes"
        )
        text = f"mcpxd is stopping: calls in progress get up to {self.stop_timeout:g} s to finish; {then}"
        notice = jsonrpc.notification("notifications/message", {"level": "warning", "logger": "mcpx", "data": text})
        return jsonrpc.dumps(notice)

    def _remove_socket_file(self, bound: os.stat_result | None) -> None:
        """Remove the socket file if this daemon bound it and it is still that one (a newer daemon may have replaced
        it; a socket unit keeps its own)."""
        if bound is None:
            return
        with contextlib.suppress(OSError):
            current = os.stat(self.socket_path)
            if (current.st_dev, current.st_ino) == (bound.st_dev, bound.st_ino):
                self.socket_path.unlink()

    def _serving_ended(self, serving: asyncio.Task[None]) -> None:
        """The accept loop ends only when cancelled at shutdown; anything else leaves agents unable to connect, so
        the daemon stops, unsuccessfully (the service manager restarts it; a shim starts a new one)."""
        if serving.cancelled():
            return
        error = serving.exception()
        _log.error("the agent socket is no longer served: stopping", error=repr(error) if error else "it returned")
        self._serving_failed = True
        self._stop.set()

    def _summary(self) -> str:
        ready = sum(1 for upstream in self.router.upstreams.values() if upstream.state == "ready")
        return f"{ready}/{len(self.router.upstreams)} upstreams ready, {self._agent_count()} agents"

    def _agent_count(self) -> int:
        return sum(1 for connection in self.connections if connection.session.initialized)

    # --- Control (what mcpxctl asks) -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "socket": str(self.socket_path),
            "config": str(self.config_path),
            "state_dir": str(self.state_dir),
            "log_file": str(self.state_dir / paths.LOG_FILE_NAME),
            "agents": self._agent_count(),
            "upstreams": self.router.status(),
        }

    def reload(self) -> asyncio.Task[dict[str, Any]]:
        """Re-read the config file and apply it, in a task of the daemon's own: it runs to its end even when whoever
        asked goes away (`mcpxctl reload` interrupted; await it through `asyncio.shield`), since a reload cut off
        halfway would leave changed upstreams stopped and never started. The task raises `ConfigError` (and the
        running config is kept) if the file is invalid."""
        task = asyncio.get_running_loop().create_task(self._reload())
        self._reloads.add(task)
        task.add_done_callback(self._reload_ended)
        return task

    def _reload_ended(self, task: asyncio.Task[dict[str, Any]]) -> None:
        self._reloads.discard(task)
        if task.cancelled():
            return
        error = task.exception()  # (retrieved here too: the one who asked may be gone)
        if error is not None and not isinstance(error, McpxError):
            _log.error("reload failed", error=repr(error))

    async def _reload(self) -> dict[str, Any]:
        async with self._reload_lock, reloading(self._notifier, self._summary):
            config = await asyncio.to_thread(load_config, self.config_path)
            notes = []
            if config.daemon.socket != self.config.daemon.socket or config.daemon.state_dir != (
                self.config.daemon.state_dir
            ):
                notes.append("socket and state_dir changes take effect when mcpxd restarts")
            changes = await self.router.apply(config)
            self.config = config
            _log.info("configuration reloaded", **changes)
            return {**changes, "notes": notes}

    async def _reload_from_signal(self) -> None:
        if self._stop.is_set():
            return
        try:
            await self.reload()
        except ConfigError as exc:
            _log.error("reload refused: the configuration is invalid", problems=exc.problems)

    def _oauth(self, upstream: str) -> tuple[ManagedUpstream, OAuthCredential | None]:
        managed = self.router.upstreams.get(upstream)
        if managed is None:
            raise InvalidParams(f"no upstream named {upstream!r}")
        credentials = managed.credentials
        return managed, credentials if isinstance(credentials, OAuthCredential) else None

    async def login(self, upstream: str, action: str, response: str | None, timeout: object = None) -> dict[str, Any]:
        """`mcpxctl login`: `start` gives the authorization URL (and whether the server offers the device grant),
        `device` starts a device login (RFC 8628) and gives the address to open and the code to enter there,
        `wait` returns when the login is complete and the upstream usable (or fails after `timeout` seconds;
        default 300 for a browser login, the code's lifetime for a device login), `paste` hands over where the
        browser landed (headless machines). Both kinds share `wait`: it waits for the upstream's one login in
        progress."""
        managed, credentials = self._oauth(upstream)
        if credentials is None:
            raise InvalidParams(f"upstream '{upstream}' uses {managed.config.auth.type} credentials: there is no login")
        wait_for: float | None = None  # the flow's own bound (see `OAuthCredential.wait_login`)
        if isinstance(timeout, int | float) and not isinstance(timeout, bool) and timeout > 0:
            wait_for = float(timeout)
        elif timeout is not None:
            raise InvalidParams("the login timeout must be a positive number of seconds")
        try:
            if action in ("start", "device"):
                flow = await credentials.begin_login(device=action == "device")
                if flow.device is not None:
                    device = flow.device
                    return {
                        "upstream": upstream,
                        "verification_uri": device.verification_uri,
                        "verification_uri_complete": device.verification_uri_complete,
                        "user_code": device.user_code,
                        "expires_in": max(0, math.ceil(flow.expires_at - time.monotonic())),
                        "interval": device.interval,
                    }
                assert flow.pending is not None
                return {
                    "upstream": upstream,
                    "url": flow.pending.url,
                    "redirect_uri": flow.pending.redirect_uri,
                    "device_grant": flow.offers_device_grant,
                }
            if action == "paste":
                if response is None:
                    raise InvalidParams("paste needs the response")
                credentials.finish_login(response)
                action = "wait"
            if action == "wait":
                flow_now = credentials.current_login()
                if flow_now is None:
                    raise LoginError("no login is in progress; start one with `mcpxctl login NAME`")
                await credentials.wait_login(flow_now, wait_for)
                # Connect with the new credential (this caller's job: see `wait_login`) and wait, bounded, for the
                # outcome: the state printed is the one agents meet, the tool list the new credential's.
                await managed.reconnect_now()
                return {
                    "upstream": upstream,
                    "state": managed.state.value,
                    "tools": len(managed.tools),
                    "oauth": credentials.status(),
                }
        except LoginError as exc:
            raise LoginFailed(upstream, str(exc)) from None
        raise InvalidParams(f"unknown login action {action!r}")

    async def logout(self, upstream: str) -> dict[str, Any]:
        managed, credentials = self._oauth(upstream)
        if credentials is not None:
            try:
                forgotten = await credentials.logout()
            except LoginError as exc:
                raise LoginFailed(upstream, str(exc)) from None
            await managed.reconnect_now()  # without the forgotten credential, as `login` does with a new one
            message = f"forgot the login for '{upstream}'" if forgotten else f"nothing was stored for '{upstream}'"
            return {"upstream": upstream, "forgotten": forgotten, "message": message}
        kind = managed.config.auth.type
        return {
            "upstream": upstream,
            "forgotten": False,
            "message": f"upstream '{upstream}' uses {kind} credentials: mcpx stores nothing for it",
        }


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mcpxd", description="The mcpx daemon: serves every upstream's tools.")
    parser.add_argument("--config", type=Path, help="config file (default: $MCPX_CONFIG, else XDG config)")
    parser.add_argument("--socket", type=Path, help="socket path (overrides the config and $MCPX_SOCKET)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--stop-timeout",
        type=_seconds,
        default=STOP_TIMEOUT,
        metavar="SECONDS",
        help=f"at SIGTERM/SIGINT, how long calls in progress may take to finish (default {STOP_TIMEOUT:g})",
    )
    parser.add_argument("--version", action="version", version=f"mcpxd {__version__}")
    return parser.parse_args(argv)


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError("must be between 0 and 3600 seconds")
    return value


def _complain(*lines: str) -> None:
    """Startup errors on stderr; as errors (`<3>`) in the journal when stderr goes there."""
    prefix = "<3>" if journal_stream() else ""
    for line in lines:
        print(f"{prefix}{line}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    config_path = paths.config_path(args.config)
    try:
        config = load_config(config_path, missing_ok=not paths.config_is_explicit(args.config))
    except ConfigError as exc:
        _complain("mcpxd: the configuration is invalid:", *(f"  {problem}" for problem in exc.problems))
        return EXIT_CONFIG
    socket_path = args.socket or paths.socket_path(config.daemon.socket)
    state_dir = paths.state_dir(config.daemon.state_dir)
    try:
        inherited, socket_path = activated_socket(socket_path)  # systemd socket activation, if any
        ensure_private_dir(state_dir)
        ensure_private_dir(socket_path.parent)
        lock = SocketLock(socket_path)
        lock.acquire()
    except StartupError as exc:
        _complain(f"mcpxd: {exc}")
        return EXIT_ALREADY_RUNNING if isinstance(exc, AlreadyRunning) else EXIT_STARTUP
    configure_logging(args.log_level or config.daemon.log_level, log_file=state_dir / paths.LOG_FILE_NAME)
    daemon = Daemon(config, config_path, socket_path, state_dir, inherited, stop_timeout=args.stop_timeout)
    try:
        return _run(daemon.run(lock))
    except StartupError as exc:
        _complain(f"mcpxd: {exc}")
        return EXIT_ALREADY_RUNNING if isinstance(exc, AlreadyRunning) else EXIT_STARTUP


def _run(main_coroutine: Any) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main_coroutine)  # type: ignore[no-any-return]
    return uvloop.run(main_coroutine)  # type: ignore[no-any-return]


if __name__ == "__main__":
    sys.exit(main())
