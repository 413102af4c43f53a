"""A focused, short measurement for work on the daemon's hot path (not a replacement for `make bench`).

Starts the benchmark upstream (JSON and SSE), one mcpxd, and measures in about a minute:
- the daemon's CPU time per sequential small `tools/call` (from /proc/<pid>/task/*/schedstat, nanoseconds of
  CPU actually used, so other load on the machine hardly moves it), and the wall-clock p50 of mcpx and of the
  `direct` floor, interleaved;
- one 8 MiB tool result, for JSON and SSE upstreams: wall-clock median of mcpx and of `direct`, their ratio,
  and the daemon's CPU milliseconds and minor page faults per result (a fresh 4 KiB page costs about 5 µs on
  the project's VM: every new 8 MiB buffer is about 10 ms).

Another tree than the installed one is measured with PYTHONPATH=<tree>/daemon:<tree>/shim (the direct floor
then uses that tree's HTTP client too, as `make bench` would).

Usage: .venv/bin/python benchmarks/focus.py [--calls N] [--rounds N] [--big N] [--only small|big]
                                            [--hold SECONDS [--mode json|sse] [--size BYTES]]
                                            (keep calling, e.g. for py-spy on the daemon)
       .venv/bin/python benchmarks/focus.py --callgrind [--calls N]
                                            (the daemon under valgrind: instructions per small call)
       .venv/bin/python benchmarks/focus.py --profile FILE [--hold SECONDS] [--mode json|sse]
                                            (the daemon under cProfile: exact calls per function)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench as b  # (benchmarks/ is not a package)

# The stdio floor: a process that answers `blob` on its stdio at once (orjson, like the upstream), so that what an
# agent's stdio read of 8 MiB costs is measured alone. A store-and-forward proxy pays the upstream leg, then this.
STDIO_FLOOR = """
import sys, orjson
for line in sys.stdin.buffer:
    message = orjson.loads(line)
    if "id" in message:
        size = ((message.get("params") or {}).get("arguments") or {}).get("size", 0)
        result = {"content": [{"type": "text", "text": "b" * size}], "isError": False} if size else {}
        sys.stdout.buffer.write(orjson.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}) + b"\\n")
        sys.stdout.buffer.flush()
"""


def set_daemon_options(config: Path, options: dict[str, object]) -> None:
    values = {key: str(value).lower() if isinstance(value, bool) else value for key, value in options.items()}
    lines = "".join(f"{key} = {value}\n" for key, value in values.items())
    config.write_text(f"[daemon]\n{lines}\n" + config.read_text())


def minor_faults(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def user_system_ticks(pid: int) -> tuple[int, int]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def cpu_ns(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread that just ended
            total += int((task / "schedstat").read_text().split()[0])
    return total


async def small(bench: b.Bench, daemon_pid: int, mode: str, calls: int) -> dict[str, float]:
    async with b.connected(bench, "mcpx", mode) as agent:
        tool = bench.tool("mcpx", mode, "echo")
        for index in range(200):
            await agent.request("tools/call", {"name": tool, "arguments": {"text": f"warm{index}"}})
        samples = []
        before, ticks = cpu_ns(daemon_pid), user_system_ticks(daemon_pid)
        for index in range(calls):
            started = time.perf_counter_ns()
            await agent.request("tools/call", {"name": tool, "arguments": {"text": f"c{index}"}})
            samples.append(time.perf_counter_ns() - started)
        used = cpu_ns(daemon_pid) - before
        user, system = (after - start for after, start in zip(user_system_ticks(daemon_pid), ticks, strict=True))
    samples.sort()
    tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
    return {
        "cpu_us": used / calls / 1000,
        "user_us": user * tick_us / calls,
        "system_us": system * tick_us / calls,
        "p50_us": samples[len(samples) // 2] / 1000,
        "p99_us": samples[len(samples) * 99 // 100] / 1000,
    }


@contextlib.asynccontextmanager
async def connected(bench: b.Bench, target: str, mode: str) -> AsyncIterator[b.Agent]:
    if target != "stdio-floor":
        async with b.connected(bench, target, mode) as agent:
            yield agent
        return
    agent = await b.StdioAgent.spawn([sys.executable, "-c", STDIO_FLOOR], {"PATH": os.environ.get("PATH", "")})
    try:
        await agent.initialize()
        yield agent
    finally:
        await agent.close()


async def big(bench: b.Bench, daemon_pid: int, target: str, mode: str, repeats: int) -> dict[str, float]:
    async with connected(bench, target, mode) as agent:
        tool = bench.tool(target, mode, "blob")
        await agent.request("tools/call", {"name": tool, "arguments": {"size": b.BIG_RESULT}})
        samples = []
        before, faults = cpu_ns(daemon_pid), minor_faults(daemon_pid)
        for _ in range(repeats):
            started = time.perf_counter()
            result = await agent.request("tools/call", {"name": tool, "arguments": {"size": b.BIG_RESULT}})
            samples.append((time.perf_counter() - started) * 1000)
            assert len(result["content"][0]["text"]) == b.BIG_RESULT
        used, faults = cpu_ns(daemon_pid) - before, minor_faults(daemon_pid) - faults
    return {
        "ms": statistics.median(samples),
        "daemon_cpu_ms": used / repeats / 1e6,
        "daemon_page_faults": faults / repeats,
        "daemon_rss_mib_after": b.rss_kib(daemon_pid) / 1024,
    }


async def callgrind_small(bench: b.Bench, pid: int, mode: str, calls: int, out: Path) -> float:
    """Instructions the daemon executes per small call (valgrind's count: exact, unmoved by other load)."""
    async with b.connected(bench, "mcpx", mode) as agent:
        tool = bench.tool("mcpx", mode, "echo")

        async def run(count: int) -> None:
            for index in range(count):
                await agent.request("tools/call", {"name": tool, "arguments": {"text": f"c{index}"}})

        await run(100)
        subprocess.run(["callgrind_control", "-i", "on", str(pid)], check=True, capture_output=True)
        await run(50)
        subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)
        await run(calls)
        subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
        subprocess.run(["callgrind_control", "-i", "off", str(pid)], check=True, capture_output=True)
    dumps = sorted(out.parent.glob(out.name + "*"), key=lambda path: path.stat().st_mtime)
    if os.environ.get("FOCUS_KEEP_CALLGRIND"):
        shutil.copy(dumps[-1], os.environ["FOCUS_KEEP_CALLGRIND"] + f".{mode}")
    for line in dumps[-1].read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1]) / calls
    raise RuntimeError("no totals in the callgrind dump")


async def hold(bench: b.Bench, mode: str, seconds: float, size: int) -> None:
    async with b.connected(bench, "mcpx", mode) as agent:
        name, arguments = ("blob", {"size": size}) if size else ("echo", {"text": "x"})
        tool = bench.tool("mcpx", mode, name)
        deadline = time.monotonic() + seconds
        calls = 0
        while time.monotonic() < deadline:
            await agent.request("tools/call", {"name": tool, "arguments": arguments})
            calls += 1
    print(f"{calls} calls", flush=True)


async def direct_latency(bench: b.Bench, mode: str, calls: int) -> dict[str, float]:
    return (await b.sequential_latency(bench, ["direct"], mode, calls))["direct"]


async def main_async(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="mcpx-focus-", dir="/tmp"))
    bench = b.Bench(root, quick=True)
    try:
        bench.upstream_urls = {"json": bench.start_upstream("json"), "sse": bench.start_upstream("sse")}
        bench.mcpx_env = bench.mcpx_environment("main", bench.upstream_urls)
        options: dict[str, object] = {}
        if args.no_audit:  # to see what the audit log costs per call
            options["audit"] = False
        if args.busy_poll_us is not None:
            options["busy_poll_us"] = args.busy_poll_us
        if options:
            set_daemon_options(Path(bench.mcpx_env["MCPX_CONFIG"]), options)
        for name in ("PYTHONPATH", "GLIBC_TUNABLES"):  # another tree than the installed one; allocator settings
            if name in os.environ:
                bench.mcpx_env[name] = os.environ[name]
        out = root / "callgrind.out"
        if args.profile:
            # cProfile in the daemon: exact call counts per function (times are inflated by the profiler).
            wrapper = (
                "import cProfile, sys; from mcpx.daemon import main; profile = cProfile.Profile(); "
                "code = profile.runcall(main, []); profile.dump_stats(sys.argv[1]); sys.exit(code)"
            )
            daemon = subprocess.Popen(
                [sys.executable, "-c", wrapper, args.profile], env=bench.mcpx_env, stdin=subprocess.DEVNULL
            )
            bench.processes.append(daemon)
            await b.wait_until_answers(Path(bench.mcpx_env["MCPX_SOCKET"]), timeout=60)
        elif args.callgrind:
            command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
                       sys.executable, str(b.BIN / "mcpxd")]  # fmt: skip
            daemon = subprocess.Popen(command, env=bench.mcpx_env, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            bench.processes.append(daemon)
            await b.wait_until_answers(Path(bench.mcpx_env["MCPX_SOCKET"]), timeout=120)
        else:
            daemon = await bench.start_daemon(bench.mcpx_env)
        for url in bench.upstream_urls.values():
            probe = b.RawHttpAgent(url)
            await probe.initialize()
            await probe.close()
        print(f"daemon pid {daemon.pid}", flush=True)
        if args.callgrind:
            for mode in ("json", "sse"):
                instructions = await callgrind_small(bench, daemon.pid, mode, args.calls, out)
                print(f"{mode}: {instructions:,.0f} instructions per small call in the daemon")
            return
        if args.hold or args.profile:
            await hold(bench, args.mode, args.hold or 10.0, args.size)
            return
        rows: dict[tuple[str, ...], list[float]] = {}
        for _ in range(args.rounds):
            for mode in ("json", "sse"):
                if args.only in (None, "small"):
                    for name, value in (await small(bench, daemon.pid, mode, args.calls)).items():
                        rows.setdefault(("small", mode, "mcpx", name), []).append(value)
                    floor = await direct_latency(bench, mode, args.calls)
                    for name in ("p50_us", "p99_us"):
                        rows.setdefault(("small", mode, "direct", name), []).append(floor[name])
                if args.only in (None, "big"):
                    for target in ("direct", "mcpx", "stdio-floor"):
                        if target == "stdio-floor" and mode == "sse":
                            continue  # (no upstream: the same as for json)
                        for name, value in (await big(bench, daemon.pid, target, mode, args.big)).items():
                            rows.setdefault(("big", mode, target, name), []).append(value)
        for key, values in rows.items():
            if key[2] != "mcpx" and key[3].startswith("daemon_"):
                continue
            print(f"{' '.join(key):40s} median {statistics.median(values):9.1f}  ({min(values):.1f}–{max(values):.1f})")
        for mode in ("json", "sse"):
            if ("small", mode, "mcpx", "p50_us") in rows:
                added = statistics.median(rows["small", mode, "mcpx", "p50_us"]) - statistics.median(
                    rows["small", mode, "direct", "p50_us"]
                )
                print(f"added p50 {mode}: {added:.0f} µs (wall, noisy)")
            if ("big", mode, "mcpx", "ms") in rows:
                mcpx, direct = rows["big", mode, "mcpx", "ms"], rows["big", mode, "direct", "ms"]
                ratios = [m / d for m, d in zip(mcpx, direct, strict=True)]
                print(f"8 MiB {mode}: {statistics.median(ratios):.2f} × direct ({min(ratios):.2f}–{max(ratios):.2f})")
    finally:
        bench.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--big", type=int, default=5, help="8 MiB results per target, mode and round")
    parser.add_argument("--only", choices=("small", "big"))
    parser.add_argument("--hold", type=float, default=0.0)
    parser.add_argument("--callgrind", action="store_true", help="count the daemon's instructions per small call")
    parser.add_argument("--no-audit", action="store_true", help="run the daemon with the audit log off")
    parser.add_argument("--busy-poll-us", type=int, help="the daemon's [daemon] busy_poll_us")
    parser.add_argument("--profile", metavar="FILE", help="run the daemon under cProfile (with --hold) into FILE")
    parser.add_argument("--mode", choices=("json", "sse"), default="json", help="with --hold")
    parser.add_argument("--size", type=int, default=0, help="with --hold: call `blob` with this size, not `echo`")
    args = parser.parse_args()
    import uvloop

    uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
