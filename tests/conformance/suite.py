"""The MCP conformance suite (`@modelcontextprotocol/conformance`, pinned in package.json next to this file): its
installation, and runs of its client scenarios with mcpx as the client (tests/conformance/client.py).

`npm ci` installs the locked suite and a Node.js 22 binary (the suite needs Node >= 22; the `node-<os>-<arch>`
packages of the npm registry carry one) into `.cache/conformance/` at the repository root, which git ignores. The
install is redone only when package.json or package-lock.json change, under a file lock (waited for at most
LOCK_TIMEOUT), so concurrent test runs share it. Each scenario runs as its own `conformance client --scenario NAME`
process, whose exit status is the suite's verdict: 0 only when no check failed or warned, the client did not time
out, and it exited 0 (or the scenario allows a client error, as for the ones where the client must refuse to go on).

`python -m tests.conformance.suite [SCENARIO ...]` runs scenarios (default: every `auth/` one) and prints where
each one's checks, stdout and stderr were saved.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conformance.client import DEADLINE

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CACHE = ROOT / ".cache" / "conformance"
MANIFESTS = ("package.json", "package-lock.json")
EXPECTED_FAILURES = HERE / "expected-failures.toml"
PACKAGE = "@modelcontextprotocol/conformance"
MIN_NODE = 22
INSTALL_TIMEOUT = 600.0
# Waiting for a concurrent test run's install: its `npm ci` is bounded by INSTALL_TIMEOUT.
LOCK_TIMEOUT = INSTALL_TIMEOUT + 60.0
# A quick suite command, such as listing the scenarios.
OUTPUT_TIMEOUT = 60.0
# The suite's per-scenario limit: our client gives up (and stops its daemon) well before.
SCENARIO_TIMEOUT = DEADLINE + 15
# The CPU work of a scenario is starting processes (Python with the SDK, mcpxd, Node): a few at a time is enough.
CONCURRENCY = min(8, 2 * (os.cpu_count() or 1))
CLIENT_COMMAND = f"exec {shlex.quote(sys.executable)} -m tests.conformance.client"


class SuiteUnavailable(Exception):
    """The suite cannot be installed or run here; the message says why and what to install."""


@dataclass(frozen=True)
class Suite:
    node: Path
    entry: Path
    version: str

    def command(self, *args: str) -> list[str]:
        return [str(self.node), str(self.entry), *args]


@dataclass(frozen=True)
class Result:
    scenario: str
    exit_code: int
    checks: list[dict[str, Any]]
    client_stderr: str
    runner_output: str
    saved_to: Path | None

    @property
    def passed(self) -> bool:
        return self.exit_code == 0

    def problems(self) -> list[str]:
        """The failed and warning checks, one line each."""
        return [
            f"{check.get('status')} {check.get('id')}: {check.get('errorMessage') or check.get('description')}"
            for check in self.checks
            if check.get("status") in ("FAILURE", "WARNING")
        ]


def install() -> Suite:
    """The installed suite, installing it first if package.json or the lock file changed since."""
    CACHE.parent.mkdir(exist_ok=True)
    digest = hashlib.sha256(b"".join((HERE / name).read_bytes() for name in MANIFESTS)).hexdigest()
    stamp = CACHE / ".installed"
    with _install_lock(LOCK_TIMEOUT):
        if not (stamp.exists() and stamp.read_text() == digest):
            _npm_ci()
            stamp.write_text(digest)
    entry = CACHE / "node_modules" / PACKAGE / "dist" / "index.js"
    version = json.loads((entry.parent.parent / "package.json").read_text())["version"]
    return Suite(_node(), entry, version)


@contextlib.contextmanager
def _install_lock(timeout: float) -> Iterator[None]:
    """Hold the install lock (an exclusive flock shared with concurrent test runs), waiting at most `timeout` s.

    The blocking flock runs in a daemon thread, so the wait is bounded without polling; a thread left waiting
    past the bound releases the lock as soon as it gets it."""
    fd = os.open(CACHE.parent / "conformance.lock", os.O_RDWR | os.O_CREAT, 0o644)
    taken = threading.Event()
    guard = threading.Lock()
    abandoned = False

    def take() -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with guard:
            if abandoned:
                os.close(fd)
            else:
                taken.set()

    threading.Thread(target=take, name="conformance-install-lock", daemon=True).start()
    if not taken.wait(timeout):
        with guard:
            abandoned = not taken.is_set()
        if abandoned:
            raise SuiteUnavailable(
                f"another test run has held {CACHE.parent / 'conformance.lock'} (installing the suite) for more than "
                f"{timeout:g} s"
            )
    try:
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _npm_ci() -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise SuiteUnavailable(
            "npm is not installed: the conformance test installs the MCP conformance suite and Node.js 22 from the "
            "npm registry with `npm ci` (install Node.js and npm, e.g. `apt-get install npm`)"
        )
    shutil.rmtree(CACHE, ignore_errors=True)
    CACHE.mkdir(parents=True)
    for name in MANIFESTS:
        shutil.copyfile(HERE / name, CACHE / name)
    command = [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"]
    try:
        subprocess.run(command, cwd=CACHE, check=True, capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
    except subprocess.CalledProcessError as exc:
        raise SuiteUnavailable(f"`npm ci` in {CACHE} failed ({exc.returncode}):\n{exc.stderr.strip()}") from None
    except subprocess.TimeoutExpired:
        raise SuiteUnavailable(f"`npm ci` in {CACHE} did not finish within {INSTALL_TIMEOUT:g} s") from None


def _node() -> Path:
    """Node.js >= 22: the one the lock file brought for this platform, else the system's if recent enough."""
    bundled = CACHE / "node_modules" / ".bin" / "node"
    if bundled.exists():
        return bundled
    system = shutil.which("node")
    version = _node_major(system) if system else None
    if system is None or version is None or version < MIN_NODE:
        found = f"the system's node is version {version}" if system else "there is no system node"
        raise SuiteUnavailable(
            f"the conformance suite needs Node.js >= {MIN_NODE}: package.json has no node-<os>-<arch> package for "
            f"{sys.platform}/{os.uname().machine} and {found}"
        )
    return Path(system)


def _node_major(node: str) -> int | None:
    try:
        output = subprocess.run([node, "--version"], check=False, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.match(r"v(\d+)\.", output)
    return int(match.group(1)) if match else None


def expected_failures() -> dict[str, str]:
    """Scenario name → why mcpx fails it."""
    document = tomllib.loads(EXPECTED_FAILURES.read_text(encoding="utf-8"))
    listed = document.get("expected_failures", {})
    return {str(name): str(reason).strip() for name, reason in listed.items()}


async def _output_of(*command: str, timeout: float = OUTPUT_TIMEOUT) -> str:
    process = await asyncio.create_subprocess_exec(
        *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, cwd=ROOT
    )
    try:
        async with asyncio.timeout(timeout):
            stdout, _ = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise SuiteUnavailable(f"{shlex.join(command)} did not finish within {timeout:g} s") from None
    if process.returncode != 0:
        raise SuiteUnavailable(f"{shlex.join(command)} exited with {process.returncode}")
    return stdout.decode()


async def client_scenarios(suite: Suite, prefix: str = "auth/") -> list[str]:
    """The suite's client scenarios whose names start with `prefix`."""
    listing = await _output_of(*suite.command("list", "--client"))
    return [name for name in re.findall(r"^\s*- (\S+)", listing, re.MULTILINE) if name.startswith(prefix)]


async def run_scenario(suite: Suite, scenario: str, output: Path) -> Result:
    """One scenario, in its own suite process, with mcpx as the client."""
    output.mkdir(parents=True, exist_ok=True)
    process = await asyncio.create_subprocess_exec(
        *suite.command(
            "client",
            "--command",
            CLIENT_COMMAND,
            "--scenario",
            scenario,
            "--timeout",
            str(int(SCENARIO_TIMEOUT * 1000)),
            "--output-dir",
            str(output),
        ),
        cwd=ROOT,
        env={**os.environ, "NO_COLOR": "1", "FORCE_COLOR": "0"},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(SCENARIO_TIMEOUT + 30):
            runner_output, _ = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        runner_output = b"(the suite's runner did not finish in time and was killed)"
    assert process.returncode is not None
    saved = next(output.glob("**/checks.json"), None)
    return Result(
        scenario,
        process.returncode,
        json.loads(saved.read_text()) if saved else [],
        (saved.parent / "stderr.txt").read_text(errors="replace") if saved else "",
        runner_output.decode(errors="replace"),
        saved.parent if saved else None,
    )


async def run_scenarios(suite: Suite, scenarios: Iterable[str], output: Path) -> list[Result]:
    """Scenarios, `CONCURRENCY` at a time (the suite's own `--suite` mode would start them all at once)."""
    slots = asyncio.Semaphore(CONCURRENCY)

    async def one(index: int, scenario: str) -> Result:
        async with slots:
            return await run_scenario(suite, scenario, output / f"{index:02d}-{scenario.replace('/', '_')}")

    return list(await asyncio.gather(*(one(index, name) for index, name in enumerate(scenarios))))


async def _main(names: list[str]) -> int:
    suite = install()
    scenarios = names or await client_scenarios(suite)
    output = Path(tempfile.mkdtemp(prefix="mcpx-conformance-"))
    results = await run_scenarios(suite, scenarios, output)
    for result in results:
        print(f"{'pass' if result.passed else 'FAIL'}  {result.scenario}  ({result.saved_to})")
        for problem in result.problems():
            print(f"      {problem}")
    return 0 if all(result.passed for result in results) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(_main(sys.argv[1:])))
