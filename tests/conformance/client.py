"""mcpx as the client under test of the MCP conformance suite's authorization scenarios.

The suite runs `<python> -m tests.conformance.client <server-url>` (from the repository root) with the scenario's
name in `MCP_CONFORMANCE_SCENARIO` and, for some scenarios, credentials in `MCP_CONFORMANCE_CONTEXT` (JSON). This
does what a user of mcpx does: write a config with one upstream, start the real `mcpxd`, log in with `mcpxctl
login` (the scripted browser of tests/support follows the fake authorization server's redirect), then, as an
agent speaking stdio to the real `mcpx-shim`, initialize, list the tools and call `test-tool`. When a call says a
login is needed (a 403 `insufficient_scope` step-up), it logs in again, as the user would, a bounded number of
times. Exit status 0 only if the tool answered.

Everything lives in a fresh temp directory (config, socket, state, HOME); tokens go to the file store.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from typing import Any

from tests.support import browser
from tests.support.daemon import Sandbox, agent, mcpxctl, running_daemon, upstream_toml
from tests.support.results import text_of

UPSTREAM = "conformance"
TOOL = f"{UPSTREAM}__test-tool"
# The URL the CIMD scenario expects as client_id; offered to every authorization-code scenario, as the suite's own
# reference client does: mcpx uses it only where the authorization server advertises CIMD support.
CLIENT_METADATA_URL = "https://conformance-test.local/client-metadata.json"
# Logins a patient user would run when mcpx keeps asking for one (mcpx itself stops asking after its step-up
# limit; this bound only keeps a broken mcpx from looping until the suite's timeout).
MAX_LOGINS = 5
# The whole run, well inside the suite's per-scenario timeout, so the daemon is always stopped by us.
DEADLINE = 45.0
LOGIN_TIMEOUT = 20.0
_STARTED = time.monotonic()


def say(message: str) -> None:
    print(f"[mcpx-conformance {time.monotonic() - _STARTED:6.2f}s] {message}", file=sys.stderr, flush=True)


def auth_for(scenario: str, context: dict[str, Any], sandbox: Sandbox) -> dict[str, Any]:
    """The upstream's `auth` table, as a user would configure it for this kind of server."""
    if scenario.startswith("auth/client-credentials-"):
        auth: dict[str, Any] = {"type": "oauth_client_credentials", "client_id": context["client_id"]}
        if "private_key_pem" in context:
            key = sandbox.root / "client-key.pem"
            key.touch(mode=0o600)
            key.write_text(context["private_key_pem"])
            auth["private_key_file"] = str(key)
            auth["private_key_algorithm"] = context.get("signing_algorithm", "ES256")
        else:
            auth["client_secret"] = context["client_secret"]
        return auth
    auth = {"type": "oauth", "client_metadata_url": CLIENT_METADATA_URL}
    if "client_id" in context:  # a pre-registered client
        auth["client_id"] = context["client_id"]
        if "client_secret" in context:
            auth["client_secret"] = context["client_secret"]
    return auth


async def login(sandbox: Sandbox) -> bool:
    code, stdout, stderr = await mcpxctl(sandbox, "login", UPSTREAM, "--timeout", str(LOGIN_TIMEOUT))
    say(f"mcpxctl login exited {code}: {(stdout + stderr).strip()}")
    return code == 0


async def use_as_agent(sandbox: Sandbox, logins: int) -> bool:
    async with agent(sandbox) as client:
        say("agent initialized through mcpx-shim")
        tools = [tool.name for tool in (await client.list_tools()).tools]
        say(f"tools: {tools}")
        while True:
            result = await client.call_tool(TOOL, {})
            text = text_of(result)
            if not result.is_error:
                say(f"{TOOL} answered: {text!r}")
                return True
            say(f"{TOOL} failed: {text}")
            if f"mcpxctl login {UPSTREAM}" not in text or logins >= MAX_LOGINS:
                return False
            logins += 1
            if not await login(sandbox):
                return False


async def run(server_url: str, scenario: str, context: dict[str, Any]) -> bool:
    sandbox = Sandbox.create()
    ok = False
    try:
        auth = auth_for(scenario, context, sandbox)
        sandbox.env["BROWSER"] = browser.COMMAND
        sandbox.write_config('[daemon]\ntoken_store = "file"\n\n' + upstream_toml(UPSTREAM, server_url, auth=auth))
        say(f"scenario {scenario}: upstream {server_url}, auth type {auth['type']}")
        async with running_daemon(sandbox):
            needs_login = auth["type"] == "oauth"
            if not needs_login or await login(sandbox):
                ok = await use_as_agent(sandbox, logins=int(needs_login))
        say("mcpxd stopped")
        return ok
    finally:
        if not ok and sandbox.log.exists():
            say("mcpxd log:\n" + sandbox.log.read_text(errors="replace"))
        sandbox.remove()


async def main_async(server_url: str) -> int:
    scenario = os.environ.get("MCP_CONFORMANCE_SCENARIO", "")
    context = json.loads(os.environ.get("MCP_CONFORMANCE_CONTEXT") or "{}")
    task = asyncio.current_task()
    assert task is not None
    # The suite stops a client that overruns with SIGTERM: end cleanly, stopping the daemon.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        async with asyncio.timeout(DEADLINE):
            return 0 if await run(server_url, scenario, context) else 1
    except TimeoutError:
        say(f"gave up after {DEADLINE:g} s")
        return 1


def main() -> int:
    if len(sys.argv) < 2:
        print("usage: python -m tests.conformance.client SERVER_URL", file=sys.stderr)
        return 2
    return asyncio.run(main_async(sys.argv[-1]))


if __name__ == "__main__":
    sys.exit(main())
