"""`make bench`: mcpx's overhead against the direct floor and against mcp-remote, measured in one run.

Every target serves the same fast upstream (benchmarks/upstream.py, its own process, JSON or SSE responses):
- `direct`: the floor, a client speaking streamable HTTP straight to the upstream with the leanest client we
  have (mcpx's own HTTP/1.1 client); the targets are measured against it;
- `direct-aiohttp`: the same with aiohttp's client, the cost of a typical fast Python agent talking directly;
- `mcpx`: an agent spawning `mcpx-shim` (stdio) → mcpxd → upstream;
- `mcp-remote`: an agent spawning `mcp-remote` (stdio → streamable HTTP), installed from the npm registry;
- `null-relay`: the `direct` client through a relay that only copies bytes (benchmarks/relay.py): what one
  more process hop costs on this machine, which no out-of-process proxy can avoid.
The agents are minimal raw JSON-RPC clients (orjson), so the client's own cost does not hide the proxies'.
Targets are interleaved round by round; each figure is the median of the rounds with the min–max beside it.
Loopback only, every loop bounded; a full run takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import itertools
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import aiohttp
import orjson

from mcpx.upstream import h1

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
NPM_PREFIX = HERE / ".npm"
MCP_REMOTE_VERSION = "0.15.1"
BIG_RESULT = 8 * 1024 * 1024


# --- agents ----------------------------------------------------------------------------------------------------


class Agent:
    """What every target offers the measurements: requests with pipelining, and a pid to read RSS from."""

    pid: int | None = None

    async def request(self, method: str, params: dict[str, Any]) -> Any:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def initialize(self) -> None:
        await self.request(
            "initialize",
            {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}},
        )


class _StdioLines(asyncio.SubprocessProtocol):
    """The agent's end of a server's stdio: each line of its stdout handed on whole, as a lean agent reads it
    (a line's chunks kept as they come and joined once, not grown in one buffer and copied out again)."""

    def __init__(self, on_line: Callable[[bytes], None], on_end: Callable[[], None]) -> None:
        self._on_line = on_line
        self._on_end = on_end
        self._partial: list[bytes] = []
        self.exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd != 1:
            return
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            if self._partial:
                self._partial.append(data[start:end])
                line = b"".join(self._partial)
                self._partial.clear()
            else:
                line = data[start:end]
            self._on_line(line)
            start = end + 1
        if start < len(data):
            self._partial.append(data[start:] if start else data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd == 1:
            self._on_end()

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)


class StdioAgent(Agent):
    """An agent that spawns an MCP server command and speaks newline-delimited JSON-RPC on its stdio, one write
    per message as the SDK's stdio client does."""

    def __init__(self, transport: asyncio.SubprocessTransport, lines: _StdioLines) -> None:
        self.transport = transport
        self.lines = lines
        self.pid = transport.get_pid()
        # (uvloop's transports implement asyncio.WriteTransport without subclassing it)
        self.stdin = cast(asyncio.WriteTransport, transport.get_pipe_transport(0))
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}

    @classmethod
    async def spawn(cls, command: list[str], env: dict[str, str]) -> StdioAgent:
        agent: StdioAgent | None = None

        def on_line(line: bytes) -> None:
            assert agent is not None
            agent._answered(line)

        def on_end() -> None:
            if agent is not None:
                agent._ended()

        transport, lines = await asyncio.get_running_loop().subprocess_exec(
            lambda: _StdioLines(on_line, on_end), *command, env=env, stderr=subprocess.DEVNULL
        )
        agent = cls(transport, lines)
        return agent

    def _answered(self, line: bytes) -> None:
        message = orjson.loads(line)
        future = self._pending.pop(message.get("id"), None) if "id" in message else None
        if future is not None and not future.done():
            if "error" in message:
                future.set_exception(RuntimeError(str(message["error"])))
            else:
                future.set_result(message["result"])

    def _ended(self) -> None:
        for future in self._pending.values():
            if not future.done():  # a caller may have given up on it already
                future.set_exception(RuntimeError("the server closed its stdout"))

    async def request(self, method: str, params: dict[str, Any]) -> Any:
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        message = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
        self.stdin.write(orjson.dumps(message, option=orjson.OPT_APPEND_NEWLINE))
        return await future

    async def initialize(self) -> None:
        await super().initialize()
        self.stdin.write(b'{"jsonrpc":"2.0","method":"notifications/initialized"}\n')

    async def close(self) -> None:
        self.stdin.close()
        try:
            async with asyncio.timeout(5):
                await self.lines.exited
        except TimeoutError:
            self.transport.kill()
            await self.lines.exited
        self.transport.close()


class HttpAgent(Agent):
    """A floor: the same requests sent straight to the upstream over streamable HTTP (keep-alive), by aiohttp's
    client: what a typical fast Python agent would use."""

    def __init__(self, url: str, http: aiohttp.ClientSession) -> None:
        self.url = url
        self.http = http
        self._ids = itertools.count(1)
        self.headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}

    @classmethod
    async def open(cls, url: str) -> HttpAgent:
        return cls(url, aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)))

    async def request(self, method: str, params: dict[str, Any]) -> Any:
        body = orjson.dumps({"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params})
        async with self.http.post(self.url, data=body, headers=self.headers) as response:
            raw = await response.read()
            if method == "initialize":
                self.headers["Mcp-Session-Id"] = response.headers["Mcp-Session-Id"]
                self.headers["MCP-Protocol-Version"] = "2025-11-25"
        return _result(raw, response.content_type)

    async def close(self) -> None:
        await self.http.close()


class RawHttpAgent(Agent):
    """The lowest floor: the same requests by the leanest client we have (mcpx's own HTTP/1.1 client), so that
    mcpx's figures are not flattered by a slow direct client."""

    def __init__(self, url: str) -> None:
        self.target = h1.Target.parse(url)
        self.http = h1.HttpClient(connect_timeout=10)
        self._ids = itertools.count(1)
        self.headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}

    async def request(self, method: str, params: dict[str, Any]) -> Any:
        body = orjson.dumps({"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params})
        response = await self.http.request("POST", self.target, self.headers, body)
        try:
            raw = await response.read(1 << 30)
        finally:
            response.release()
        if method == "initialize":
            self.headers["Mcp-Session-Id"] = response.headers["mcp-session-id"]
            self.headers["MCP-Protocol-Version"] = "2025-11-25"
        return _result(raw, response.content_type)

    async def close(self) -> None:
        await self.http.close()


def _result(raw: bytes | bytearray, content_type: str) -> Any:
    if content_type == "text/event-stream":
        raw = next(line[6:] for line in raw.split(b"\n") if line.startswith(b"data: "))
    return orjson.loads(raw)["result"]


# --- the targets -----------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, root: Path, quick: bool) -> None:
        self.root = root
        self.quick = quick
        self.upstream_urls: dict[str, str] = {}
        self.relay_urls: dict[str, str] = {}
        self.processes: list[subprocess.Popen[bytes]] = []
        self.mcpx_env: dict[str, str] = {}
        self.mcp_remote: list[str] | None = None
        self.launcher = BIN / "mcpx-shim"  # replaced by install-shim's launcher once the run starts

    def start_upstream(self, mode: str) -> str:
        command = [sys.executable, str(HERE / "upstream.py")] + (["--sse"] if mode == "sse" else [])
        return f"http://127.0.0.1:{self._serve_on_new_port(command)}/mcp"

    def start_relay(self, upstream_url: str) -> str:
        """A null relay in front of `upstream_url`; returns the URL that reaches the upstream through it."""
        origin = upstream_url.split("/")[2]
        command = [sys.executable, str(HERE / "relay.py"), "--upstream", origin]
        return f"http://127.0.0.1:{self._serve_on_new_port(command)}/mcp"

    def _serve_on_new_port(self, command: list[str]) -> int:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        self.processes.append(subprocess.Popen([*command, "--fd", str(sock.fileno())], pass_fds=[sock.fileno()]))
        port: int = sock.getsockname()[1]
        sock.close()
        return port

    def mcpx_environment(self, name: str, upstreams: dict[str, str]) -> dict[str, str]:
        home = self.root / name
        home.mkdir()
        config = "".join(f'[[proxy.upstream]]\nname = "{key}"\nurl = "{url}"\n\n' for key, url in upstreams.items())
        (home / "config.toml").write_text(config)
        return {
            "HOME": str(home),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "MCPX_CONFIG": str(home / "config.toml"),
            "MCPX_SOCKET": str(home / "mcpx.sock"),
            "MCPX_STATE_DIR": str(home / "state"),
        }

    async def start_daemon(self, env: dict[str, str]) -> subprocess.Popen[bytes]:
        process = subprocess.Popen([str(BIN / "mcpxd")], env=env, stdin=subprocess.DEVNULL)
        self.processes.append(process)
        await wait_until_answers(Path(env["MCPX_SOCKET"]))
        return process

    def install_mcp_remote(self) -> list[str] | None:
        entry = NPM_PREFIX / "node_modules" / "mcp-remote" / "dist" / "proxy.js"
        if not entry.exists() and shutil.which("npm"):
            subprocess.run(
                ["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(NPM_PREFIX),
                 f"mcp-remote@{MCP_REMOTE_VERSION}"],
                check=False,
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
        if not entry.exists() or not shutil.which("node"):
            print("mcp-remote could not be installed from the npm registry: it is left out of this run")
            return None
        return ["node", str(entry)]

    def mcp_remote_env(self) -> dict[str, str]:
        home = self.root / "mcp-remote-home"
        home.mkdir(exist_ok=True)
        return {"HOME": str(home), "PATH": os.environ.get("PATH", ""), "MCP_REMOTE_CONFIG_DIR": str(home)}

    async def agent(self, target: str, mode: str) -> Agent:
        if target == "direct":
            agent: Agent = RawHttpAgent(self.upstream_urls[mode])
        elif target == "null-relay":
            agent = RawHttpAgent(self.relay_urls[mode])
        elif target == "direct-aiohttp":
            agent = await HttpAgent.open(self.upstream_urls[mode])
        elif target == "mcpx":
            agent = await StdioAgent.spawn([str(BIN / "mcpx-shim")], self.mcpx_env)
        else:
            assert self.mcp_remote is not None
            agent = await StdioAgent.spawn([*self.mcp_remote, self.upstream_urls[mode]], self.mcp_remote_env())
        await agent.initialize()
        return agent

    async def shim_agent(self, env: dict[str, str]) -> Agent:
        agent = await StdioAgent.spawn([str(BIN / "mcpx-shim")], env)
        await agent.initialize()
        return agent

    def tool(self, target: str, mode: str, name: str) -> str:
        return f"{mode}__{name}" if target == "mcpx" else name

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


async def wait_until_answers(path: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_unix_connection(str(path))
            writer.close()
            return
        await asyncio.sleep(0.01)
    raise TimeoutError(f"nothing answers on {path}")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@contextlib.asynccontextmanager
async def connected(bench: Bench, target: str, mode: str) -> AsyncIterator[Agent]:
    agent = await bench.agent(target, mode)
    try:
        yield agent
    finally:
        await agent.close()


# --- measurements ----------------------------------------------------------------------------------------------


LATENCY_BLOCK = 100  # sequential calls to one target before the next target's turn


async def sequential_latency(bench: Bench, targets: list[str], mode: str, calls: int) -> dict[str, dict[str, float]]:
    """Sequential `tools/call` latency of every target, interleaved: all connected at once, taking turns in blocks
    of `LATENCY_BLOCK` calls (the order rotating each turn), so a change in the machine's load falls on all of
    them alike. Per target: p50 and p99 of all its calls; `added_us`: the median over turns of its block p50
    minus the `direct` block p50 of the same turn (a paired difference); `added_p99_us`: its p99 minus `direct`'s
    p99 over the same turns (a block of 100 calls has no p99 of its own)."""
    async with contextlib.AsyncExitStack() as stack:
        agents = {target: await stack.enter_async_context(connected(bench, target, mode)) for target in targets}
        tools = {target: bench.tool(target, mode, "echo") for target in targets}
        for target, agent in agents.items():
            for index in range(min(200, calls)):
                await agent.request("tools/call", {"name": tools[target], "arguments": {"text": f"warm{index}"}})
        samples: dict[str, list[int]] = {target: [] for target in targets}
        block_p50: dict[str, list[int]] = {target: [] for target in targets}
        for turn in range(max(1, calls // LATENCY_BLOCK)):
            order = targets[turn % len(targets) :] + targets[: turn % len(targets)]
            for target in order:
                agent, tool, block = agents[target], tools[target], []
                for index in range(LATENCY_BLOCK):
                    text = f"c{turn}.{index}"
                    started = time.perf_counter_ns()
                    result = await agent.request("tools/call", {"name": tool, "arguments": {"text": text}})
                    block.append(time.perf_counter_ns() - started)
                    assert result["content"][0]["text"] == text
                samples[target] += block
                block_p50[target].append(sorted(block)[len(block) // 2])
    figures: dict[str, dict[str, float]] = {}
    for values in samples.values():
        values.sort()
    floor_p99 = samples["direct"][int(len(samples["direct"]) * 0.99)]
    for target, values in samples.items():
        paired = [mine - floor for mine, floor in zip(block_p50[target], block_p50["direct"], strict=True)]
        figures[target] = {
            "p50_us": values[len(values) // 2] / 1000,
            "p99_us": values[int(len(values) * 0.99)] / 1000,
            "added_us": statistics.median(paired) / 1000,
            "added_p99_us": (values[int(len(values) * 0.99)] - floor_p99) / 1000,
        }
    return figures


async def pipelined(agent: Agent, tool: str, calls: int, in_flight: int, tag: str) -> int:
    """Run `calls` calls with `in_flight` outstanding; return how many came back with someone else's result."""
    semaphore = asyncio.Semaphore(in_flight)
    misrouted = 0

    async def one(index: int) -> None:
        nonlocal misrouted
        async with semaphore:
            result = await agent.request("tools/call", {"name": tool, "arguments": {"text": f"{tag}-{index}"}})
        if result["content"][0]["text"] != f"{tag}-{index}":
            misrouted += 1

    await asyncio.gather(*(one(index) for index in range(calls)))
    return misrouted


async def throughput(bench: Bench, target: str, mode: str, *, agents: int, in_flight: int, calls: int) -> float:
    opened = [await bench.agent(target, mode) for _ in range(agents)]
    tool = bench.tool(target, mode, "echo")
    try:
        await asyncio.gather(*(pipelined(agent, tool, 100, in_flight, f"w{i}") for i, agent in enumerate(opened)))
        started = time.perf_counter()
        misrouted = await asyncio.gather(
            *(pipelined(agent, tool, calls // agents, in_flight, f"a{i}") for i, agent in enumerate(opened))
        )
        elapsed = time.perf_counter() - started
    finally:
        await asyncio.gather(*(agent.close() for agent in opened))
    assert sum(misrouted) == 0, f"{target}: {sum(misrouted)} misrouted responses"
    return (calls // agents) * agents / elapsed


async def start_to_tools(bench: Bench, command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    agent = await StdioAgent.spawn(command, env)
    await agent.initialize()
    tools = await agent.request("tools/list", {})
    elapsed = time.perf_counter() - started
    assert tools["tools"], "no tools listed"
    await agent.close()
    return elapsed * 1000


async def big_result(bench: Bench, target: str, mode: str, repeats: int) -> float:
    async with connected(bench, target, mode) as agent:
        tool = bench.tool(target, mode, "blob")
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            result = await agent.request("tools/call", {"name": tool, "arguments": {"size": BIG_RESULT}})
            samples.append((time.perf_counter() - started) * 1000)
            assert len(result["content"][0]["text"]) == BIG_RESULT
    return statistics.median(samples)


# --- the run ---------------------------------------------------------------------------------------------------


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


async def run(bench: Bench, rounds: int) -> dict[str, Any]:
    targets = ["direct", "direct-aiohttp", "null-relay", "mcpx"] + (["mcp-remote"] if bench.mcp_remote else [])
    modes = ["json", "sse"]
    calls = 300 if bench.quick else 2000
    results: dict[str, Any] = {"latency": {}, "throughput": {}, "start_ms": {}, "big_result_ms": {}, "memory": {}}
    raw: dict[tuple[str, ...], list[float]] = {}

    def record(*key: str, value: float) -> None:
        raw.setdefault(key, []).append(value)

    for round_index in range(rounds):
        print(f"round {round_index + 1}/{rounds}", flush=True)
        for mode in modes:
            for target, latency in (await sequential_latency(bench, targets, mode, calls)).items():
                for figure, value in latency.items():
                    record("latency", mode, target, figure, value=value)
        for target in targets:
            total = 1000 if bench.quick else 6400
            one = await throughput(bench, target, "json", agents=1, in_flight=64, calls=total)
            record("throughput", "1x64", target, value=one)
            if target != "mcp-remote" or not bench.quick:
                many = await throughput(bench, target, "json", agents=20, in_flight=8, calls=total)
                record("throughput", "20x8", target, value=many)
            record("big_result_ms", target, value=await big_result(bench, target, "json", 2 if bench.quick else 4))
        shim = [str(BIN / "mcpx-shim")]
        launcher = [str(bench.launcher)]
        for _ in range(5 if bench.quick else 15):  # pip's console script and install-shim's launcher, in turn
            record("start_ms", "mcpx (daemon running)", value=await start_to_tools(bench, shim, bench.mcpx_env))
            value = await start_to_tools(bench, launcher, bench.mcpx_env)
            record("start_ms", "mcpx (daemon running, install-shim launcher)", value=value)
        if bench.mcp_remote:
            for _ in range(2 if bench.quick else 5):
                command = [*bench.mcp_remote, bench.upstream_urls["json"]]
                record("start_ms", "mcp-remote", value=await start_to_tools(bench, command, bench.mcp_remote_env()))

    for key, values in raw.items():
        node = results
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = summary(values)
    return results


def install_launcher(directory: Path) -> Path:
    """`mcpxctl install-shim --to <directory>/mcpx-shim`: the shim started with `python -I -S`."""
    path = directory / "mcpx-shim"
    subprocess.run([str(BIN / "mcpxctl"), "install-shim", "--to", str(path)], check=True, capture_output=True)
    return path


async def autostart(bench: Bench, repeats: int) -> dict[str, float]:
    """Spawn the shim with no daemon running: it starts mcpxd itself; time to the first tools/list."""
    samples = []
    for index in range(repeats):
        env = bench.mcpx_environment(f"autostart{index}", {"json": bench.upstream_urls["json"]})
        samples.append(await start_to_tools(bench, [str(BIN / "mcpx-shim")], env))
        status = subprocess.run([str(BIN / "mcpxctl"), "status", "--json"], env=env, capture_output=True, check=True)
        os.kill(json.loads(status.stdout)["pid"], signal.SIGTERM)
    return summary(samples)


async def memory(bench: Bench, quick: bool) -> dict[str, Any]:
    url = bench.upstream_urls["json"]
    env = bench.mcpx_environment("memory", {f"up{index:02d}": url for index in range(20)})
    daemon = await bench.start_daemon(env)
    probe = await bench.shim_agent(env)
    tools = await probe.request("tools/list", {})  # answered once every upstream's first attempt has ended
    assert len(tools["tools"]) == 400, len(tools["tools"])
    shim_rss = rss_kib(probe.pid or 0)
    await probe.close()
    idle = rss_kib(daemon.pid)
    agents = [await bench.shim_agent(env) for _ in range(100)]
    with_agents = rss_kib(daemon.pid)
    # 100 agents at once, each with calls in flight: count errors and misrouted responses.
    outcomes = await asyncio.gather(
        *(pipelined(agent, "up00__echo", 20, 4, f"m{i}") for i, agent in enumerate(agents)), return_exceptions=True
    )
    errors = sum(1 for outcome in outcomes if isinstance(outcome, BaseException))
    misrouted = sum(outcome for outcome in outcomes if isinstance(outcome, int))
    await asyncio.gather(*(agent.close() for agent in agents))
    # Growth over many calls: RSS after a warm-up, then after the long run.
    soak = 20_000 if quick else 100_000
    worker = await bench.shim_agent(env)
    await pipelined(worker, "up00__echo", 10_000, 64, "warm")
    before = rss_kib(daemon.pid)
    await pipelined(worker, "up00__echo", soak, 64, "soak")
    after = rss_kib(daemon.pid)
    await worker.close()
    return {
        "shim_rss_mib": shim_rss / 1024,
        "daemon_idle_20_upstreams_mib": idle / 1024,
        "daemon_per_agent_kib": (with_agents - idle) / 100,
        "hundred_agents": {"errors": errors, "misrouted": misrouted},
        "soak_calls": soak,
        "daemon_growth_percent": (after - before) * 100 / before,
    }


def render(results: dict[str, Any], meta: dict[str, Any]) -> str:
    def fmt(cell: dict[str, float] | None, digits: int = 0) -> str:
        if cell is None:
            return "–"
        return f"{cell['median']:.{digits}f} ({cell['min']:.{digits}f}–{cell['max']:.{digits}f})"

    lines = [
        f"mcpx benchmark, {meta['date']}, {meta['machine']}, {meta['rounds']} rounds (median, min–max)",
        "",
        "| target | p50 µs (json) | p99 µs (json) | p50 µs (sse) | p99 µs (sse) "
        "| calls/s 1×64 | calls/s 20×8 | 8 MiB result ms |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]  # fmt: skip
    for target in results["latency"]["json"]:
        latency = results["latency"]
        lines.append(
            f"| {target} | {fmt(latency['json'][target]['p50_us'])} | {fmt(latency['json'][target]['p99_us'])} "
            f"| {fmt(latency['sse'][target]['p50_us'])} | {fmt(latency['sse'][target]['p99_us'])} "
            f"| {fmt(results['throughput'].get('1x64', {}).get(target))} "
            f"| {fmt(results['throughput'].get('20x8', {}).get(target))} "
            f"| {fmt(results['big_result_ms'].get(target), 1)} |"
        )
    lines += ["", "| agent start (spawn → initialize → tools/list) | ms |", "|---|--:|"]
    for name, cell in results["start_ms"].items():
        lines.append(f"| {name} | {fmt(cell, 1)} |")
    memory = results["memory"]
    lines += [
        "",
        "| memory and load (mcpx) | value |",
        "|---|--:|",
        f"| shim RSS | {memory['shim_rss_mib']:.1f} MiB |",
        f"| daemon RSS, 20 upstreams, no agents | {memory['daemon_idle_20_upstreams_mib']:.1f} MiB |",
        f"| daemon RSS per connected agent | {memory['daemon_per_agent_kib']:.0f} KiB |",
        f"| daemon RSS growth over {memory['soak_calls']:,} calls | {memory['daemon_growth_percent']:+.1f} % |",
        f"| 100 agents at once: errors / misrouted | {memory['hundred_agents']['errors']} / "
        f"{memory['hundred_agents']['misrouted']} |",
    ]

    def added(target: str, mode: str, figure: str = "added_us") -> str:
        cell = results["latency"][mode][target][figure]
        return f"{cell['median']:.0f} µs ({cell['min']:.0f}–{cell['max']:.0f})"

    lines += [
        "",
        "Added latency p50, paired: per turn of 100 calls, the target's p50 minus the direct floor's p50 of the same",
        "turn; the median over turns, then over rounds (min–max of the rounds).",
        f"mcpx added latency p50: {added('mcpx', 'json')} json, {added('mcpx', 'sse')} sse",
        f"  (a null relay, one process hop copying bytes, adds {added('null-relay', 'json')} json, "
        f"{added('null-relay', 'sse')} sse)",
        f"  (the aiohttp floor is {added('direct-aiohttp', 'json')} json, {added('direct-aiohttp', 'sse')} sse "
        "above the direct floor)",
        "mcpx added latency p99 (its p99 minus the direct floor's, same turns): "
        f"{added('mcpx', 'json', 'added_p99_us')} json, {added('mcpx', 'sse', 'added_p99_us')} sse",
    ]
    for shape in ("1x64", "20x8"):
        ratio = results["throughput"][shape]["mcpx"]["median"] / results["throughput"][shape]["direct"]["median"]
        lines.append(f"mcpx throughput {shape}: {ratio * 100:.0f} % of the direct floor")
    big = results["big_result_ms"]["mcpx"]["median"] / results["big_result_ms"]["direct"]["median"]
    lines.append(f"mcpx 8 MiB result: {big:.2f} × the direct floor")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="mcpx-bench-", dir="/tmp"))
    bench = Bench(root, args.quick)
    try:
        bench.mcp_remote = None if args.no_mcp_remote else bench.install_mcp_remote()
        bench.upstream_urls = {"json": bench.start_upstream("json"), "sse": bench.start_upstream("sse")}
        bench.relay_urls = {mode: bench.start_relay(url) for mode, url in bench.upstream_urls.items()}
        bench.mcpx_env = bench.mcpx_environment("main", bench.upstream_urls)
        bench.launcher = install_launcher(root / "bin")
        await bench.start_daemon(bench.mcpx_env)
        for url in bench.upstream_urls.values():
            probe = await HttpAgent.open(url)
            await probe.initialize()
            await probe.close()
        started = time.monotonic()
        results = await run(bench, args.rounds)
        results["start_ms"]["mcpx (shim starts the daemon)"] = await autostart(bench, 3 if args.quick else 5)
        results["memory"] = await memory(bench, args.quick)
        meta = {
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "rounds": args.rounds,
            "seconds": round(time.monotonic() - started),
            "mcp_remote": MCP_REMOTE_VERSION if bench.mcp_remote else None,
        }
    finally:
        bench.stop()
        shutil.rmtree(root, ignore_errors=True)
    report = render(results, meta)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (out / "latest.md").write_text(report + "\n")
    print(report)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer calls, for a smoke run")
    parser.add_argument("--no-mcp-remote", action="store_true")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main_async(args))
    return uvloop.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
