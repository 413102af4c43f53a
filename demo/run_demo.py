"""`make demo`: mcpx end to end on this machine, in a temp directory, in a few seconds.

1. starts a bundled demo MCP server (the `mcp` SDK over streamable HTTP on 127.0.0.1) that requires a token;
2. writes an mcpx config that gives mcpx the token from an environment variable;
3. starts `mcpxd`, then runs an agent session (the SDK client) through `mcpx-shim` over stdio, exactly as
   Claude Code or Codex would: it lists the tools and calls one, without ever seeing the token or the URL;
4. prints `mcpxctl status`, stops the daemon cleanly and removes the temp directory.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path

import uvicorn
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from mcp_types import TextContent
from pydantic import AnyHttpUrl

BIN = Path(sys.executable).parent


class DemoTokens:
    def __init__(self, token: str) -> None:
        self.token = token

    async def verify_token(self, token: str) -> AccessToken | None:
        if token != self.token:
            return None
        return AccessToken(token=token, client_id="mcpx-demo", scopes=[])


def demo_server(port: int, token: str) -> MCPServer:
    auth = AuthSettings(
        issuer_url=AnyHttpUrl(f"http://127.0.0.1:{port}"),
        resource_server_url=AnyHttpUrl(f"http://127.0.0.1:{port}/mcp"),
        validate_token_resource=False,
    )
    server = MCPServer("demo", auth=auth, token_verifier=DemoTokens(token), log_level="WARNING")

    @server.tool()
    def greet(name: str) -> str:
        """Greet someone by name."""
        return f"Hello, {name}! (from the demo upstream, through mcpx)"

    @server.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    return server


async def start_daemon(env: dict[str, str], root: Path) -> asyncio.subprocess.Process:
    """Start mcpxd and wait for its sd_notify READY=1 (sent once the socket is served)."""
    notify_path = root / "notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.setblocking(False)
    daemon = await asyncio.create_subprocess_exec(
        str(BIN / "mcpxd"), env={**env, "NOTIFY_SOCKET": str(notify_path)}, stdin=asyncio.subprocess.DEVNULL
    )
    try:
        async with asyncio.timeout(20):
            while b"READY=1" not in await asyncio.get_running_loop().sock_recv(notify, 4096):
                pass
    finally:
        notify.close()
    return daemon


def say(text: str) -> None:
    print(text, flush=True)


async def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="mcpx-demo-", dir="/tmp"))
    token = "demo-" + secrets.token_urlsafe(16)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    upstream = uvicorn.Server(
        uvicorn.Config(demo_server(port, token).streamable_http_app(json_response=True), log_level="warning")
    )
    upstream_task = asyncio.create_task(upstream.serve(sockets=[listener]))
    env = {
        "HOME": str(root),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "MCPX_CONFIG": str(root / "config.toml"),
        "MCPX_SOCKET": str(root / "mcpx.sock"),
        "MCPX_STATE_DIR": str(root / "state"),
        "DEMO_TOKEN": token,
    }
    config = f"""[[proxy.upstream]]
name = "demo"
url = "http://127.0.0.1:{port}/mcp"
auth = {{ type = "bearer_env", env = "DEMO_TOKEN" }}
"""
    (root / "config.toml").write_text(config)
    say(f"1. demo upstream listening on http://127.0.0.1:{port}/mcp (requires a bearer token)")
    say(f"2. mcpx config ({root / 'config.toml'}):\n\n" + "\n".join("     " + line for line in config.splitlines()))
    daemon = await start_daemon(env, root)
    exit_code = 1
    try:
        say("\n3. mcpxd started; an agent connects through mcpx-shim (stdio), as Claude Code or Codex would")
        params = StdioServerParameters(command=str(BIN / "mcpx-shim"), env=env)
        async with Client(params) as agent:
            info = agent.server_info
            say(f"   connected to {info.name if info else '?'} (protocol {agent.protocol_version})")
            tools = await agent.list_tools()
            say("   tools the agent sees: " + ", ".join(tool.name for tool in tools.tools))
            result = await agent.call_tool("demo__greet", {"name": "world"})
            text = result.content[0].text if isinstance(result.content[0], TextContent) else "?"
            say(f"   demo__greet(name='world') -> {text!r}")
            total = await agent.call_tool("demo__add", {"a": 2, "b": 40})
            say(f"   demo__add(a=2, b=40) -> {total.structured_content}")
        say("\n4. mcpxctl status:\n")
        status = await asyncio.create_subprocess_exec(str(BIN / "mcpxctl"), "status", env=env)
        await status.wait()
        exit_code = 0 if (status.returncode == 0 and "Hello, world" in text) else 1
    finally:
        if daemon.returncode is None:
            daemon.send_signal(signal.SIGTERM)
        daemon_code = await asyncio.wait_for(daemon.wait(), 15)
        upstream.should_exit = True
        await asyncio.wait_for(upstream_task, 15)
        shutil.rmtree(root, ignore_errors=True)
    outcome = "OK" if exit_code == 0 else "FAILED"
    say(f"\n5. mcpxd stopped (exit {daemon_code}); the agent never saw the token or the URL. Demo {outcome}.")
    return exit_code or daemon_code


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
