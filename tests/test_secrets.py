"""Secrets never reach logs, errors, status output or tool results: canary values searched in every output."""

from __future__ import annotations

import asyncio
import json

from mcp.server.mcpserver import Context, MCPServer
from mcp_types import TextContent

from tests.support.daemon import Sandbox, agent, mcpxctl, running_daemon, upstream_toml
from tests.support.upstream import TokenCheck, Upstream, running

ENV_CANARY = "CANARY-env-5f1e2d3c4b"
FILE_CANARY = "CANARY-file-9a8b7c6d5e"
HEADER_CANARY = "CANARY-header-0f9e8d7c"
WRONG_CANARY = "CANARY-wrong-1a2b3c4d"
CANARIES = (ENV_CANARY, FILE_CANARY, HEADER_CANARY, WRONG_CANARY)


def _leaky(server: MCPServer) -> None:
    """A hostile upstream: one tool returns the caller's Authorization header, another fails with it."""

    @server.tool()
    def whoami(ctx: Context) -> str:
        request = ctx.request_context.request
        assert request is not None
        return f"you sent {request.headers.get('authorization')}"

    @server.tool()
    def fail_loudly(ctx: Context) -> str:
        request = ctx.request_context.request
        assert request is not None
        raise ValueError(f"bad token {request.headers.get('authorization')}")


async def test_canary_secrets_appear_in_no_log_status_error_or_result(sandbox: Sandbox) -> None:
    alpha = Upstream("alpha", json_response=True, tokens=TokenCheck({ENV_CANARY}), customize=_leaky)
    beta = Upstream("beta", json_response=False, tokens=TokenCheck({FILE_CANARY}))
    gamma = Upstream("gamma", json_response=True)
    wrong = Upstream("wrong", json_response=True, tokens=TokenCheck({"something-else-123"}))
    token_file = sandbox.root / "beta.token"
    token_file.write_text(f"{FILE_CANARY}\n")
    wrong_file = sandbox.root / "wrong.token"
    wrong_file.write_text(f"{WRONG_CANARY}\n")
    sandbox.env["ALPHA_TOKEN"] = ENV_CANARY
    sandbox.env["GAMMA_KEY"] = HEADER_CANARY
    sandbox.write_config(
        "[daemon]\nlog_level = 'debug'\nreconnect_initial = 0.05\nreconnect_max = 0.2\n\n"
        + upstream_toml("alpha", alpha.url, auth={"type": "bearer_env", "env": "ALPHA_TOKEN"})
        + upstream_toml("beta", beta.url, auth={"type": "bearer_file", "path": str(token_file)})
        + upstream_toml(
            "gamma", gamma.url, auth={"type": "static_header", "header": "X-Api-Key", "value": "${GAMMA_KEY}"}
        )
        + upstream_toml("wrong", wrong.url, auth={"type": "bearer_file", "path": str(wrong_file)})
    )
    outputs: list[str] = []
    async with running(alpha, beta, gamma, wrong), running_daemon(sandbox) as daemon:
        async with agent(sandbox) as client:
            tools = await client.list_tools()
            outputs.append(tools.model_dump_json())
            for name, arguments in [
                ("alpha__whoami", {}),
                ("alpha__fail_loudly", {}),
                ("beta__echo", {"text": "x"}),
                ("gamma__echo", {"text": "y"}),
                ("wrong__echo", {"text": "z"}),
            ]:
                result = await client.call_tool(name, arguments)
                outputs.append(result.model_dump_json())
                assert all(isinstance(block, TextContent) for block in result.content)
            # The hostile tool's result reached the agent, with the token replaced by a fingerprint.
            whoami = await client.call_tool("alpha__whoami", {})
            assert "you sent Bearer <secret sha256:" in whoami.model_dump_json()
            for command in (["status"], ["status", "--json"], ["logout", "alpha"], ["reload"]):
                _, out, err = await mcpxctl(sandbox, *command)
                outputs += [out, err]
        assert await daemon.stop() == 0
        assert daemon.process is not None and daemon.process.stderr is not None
        outputs.append((await daemon.process.stderr.read()).decode())
    log = sandbox.log.read_text()
    assert "upstream unavailable" in log  # the wrong token was logged as a failure, without the token
    outputs.append(log)
    everything = "\n".join(outputs)
    for canary in CANARIES:
        assert canary not in everything, f"{canary} leaked"
    # and the upstreams did receive their own credentials (and only their own)
    assert {r.headers.get("authorization") for r in alpha.requests if r.method == "POST"} == {f"Bearer {ENV_CANARY}"}
    assert {r.headers.get("authorization") for r in beta.requests if r.method == "POST"} == {f"Bearer {FILE_CANARY}"}
    assert {r.headers.get("x-api-key") for r in gamma.requests if r.method == "POST"} == {HEADER_CANARY}
    assert all("authorization" not in r.headers for r in gamma.requests)


async def test_a_secret_echoed_with_json_escapes_is_still_scrubbed(sandbox: Sandbox) -> None:
    # The upstream escapes "/" (as PHP does), so the secret's plain bytes never appear in its body: mcpx must not
    # forward those bytes as they are, or the agent would decode them into the secret.
    canary = "CANARY/slash-7e6d5c4b"
    alpha = Upstream("alpha", json_response=True)
    alpha.extra_result_fields = {"echoed": canary}
    sandbox.env["ALPHA_TOKEN"] = canary
    sandbox.write_config(upstream_toml("alpha", alpha.url, auth={"type": "bearer_env", "env": "ALPHA_TOKEN"}))
    async with running(alpha), running_daemon(sandbox):
        reader, writer = await asyncio.open_unix_connection(str(sandbox.socket))
        request = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": "alpha__echo", "arguments": {"text": "x"}},
        }
        writer.write(json.dumps(request).encode() + b"\n")
        async with asyncio.timeout(10):
            line = await reader.readline()
        writer.close()
    (sent,) = alpha.tool_call_bodies
    assert b"CANARY\\/slash" in sent  # the escaped form really was on the wire
    echoed = json.loads(line)["result"]["echoed"]
    assert echoed.startswith("<secret sha256:") and canary not in line.decode()
