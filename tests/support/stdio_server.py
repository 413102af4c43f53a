"""A real stdio MCP server for tests: the `mcp` SDK's MCPServer over stdin/stdout, run as
`python stdio_server.py NAME [--stubborn]`.

Its tools say which server ran them (`NAME:`), report what the process sees (environment variable names, working
directory, pid), write to stderr, write lines that are not JSON-RPC (or too long) to stdout, start a helper process
that runs until stopped (`helper`), and end the process (`crash`). On start it writes `NAME started` to stderr,
with the value of `$STDIO_TEST_SECRET` when that is set (so tests can check that secrets are redacted in mcpxd's
log).

The rest of the surface, for the tests that run it over stdio: a prompt (`review`), a resource (`note://readme`),
a question to the client during a call (`ask_name`: elicitation; `summarize`: sampling), progress and a log
message (`work`), and a call that waits until cancelled (`hang`; `cancelled` says whether one was).

`--stubborn` is the fault: it ignores SIGTERM and, when stdin closes, keeps running until it is killed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading

from mcp.server.mcpserver import Context, MCPServer
from mcp.shared.exceptions import MCPError
from mcp.types import SamplingMessage, TextContent
from pydantic import BaseModel

# The protocol's stdout, kept before the SDK diverts fd 1 to stderr (it guards the wire against stray prints).
_WIRE = os.dup(1)


class Name(BaseModel):
    name: str


def build(name: str) -> MCPServer:
    server: MCPServer = MCPServer(name, log_level="WARNING")
    cancelled = threading.Event()

    @server.tool()
    def echo(text: str) -> str:
        """Echo the text back, prefixed with the server's name."""
        return f"{name}:{text}"

    @server.tool()
    def env_names() -> list[str]:
        """The names of the process's environment variables."""
        return sorted(os.environ)

    @server.tool()
    def env_value(variable: str) -> str:
        """The value of one environment variable ('' when unset)."""
        return os.environ.get(variable, "")

    @server.tool()
    def where() -> str:
        """The working directory."""
        return os.getcwd()

    @server.tool()
    def pid() -> int:
        """The process id."""
        return os.getpid()

    @server.tool()
    def say(text: str) -> str:
        """Write the text to stderr as one line."""
        print(text, file=sys.stderr, flush=True)
        return "said"

    @server.tool()
    def garbage(size: int = 0, lines: int = 1) -> str:
        """Write `lines` lines that are not JSON-RPC to stdout (`size` bytes long when given) before the answer."""
        os.write(_WIRE, ((b"x" * size if size else b"this is not JSON-RPC {") + b"\n") * lines)
        return "after garbage"

    @server.tool()
    def helper() -> int:
        """Start a helper process that runs until stopped (in this server's process group); its pid."""
        started = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return started.pid

    @server.tool()
    def crash(status: int) -> str:
        """End the process at once with `status`."""
        print(f"{name} crashing with {status}", file=sys.stderr, flush=True)
        os._exit(status)

    @server.prompt()
    def review(topic: str) -> str:
        """Ask for a review of a topic."""
        return f"{name} reviews {topic}"

    @server.resource("note://readme", mime_type="text/plain")
    def readme() -> str:
        """A note."""
        return f"{name} readme"

    @server.tool()
    async def ask_name(ctx: Context) -> str:
        """Ask the user for a name (form elicitation) and greet them."""
        answer = await ctx.elicit("Who are you?", Name)
        return f"hello {answer.data.name}" if answer.action == "accept" and answer.data is not None else "no name"

    @server.tool()
    async def summarize(text: str, ctx: Context) -> str:
        """Ask the client's model (sampling) to summarize `text`."""
        try:
            reply = await ctx.request_context.session.create_message(
                messages=[SamplingMessage(role="user", content=TextContent(type="text", text=text))],
                max_tokens=20,
                related_request_id=ctx.request_id,
            )
        except MCPError as exc:
            return f"sampling refused: {exc.error.code}"
        content = reply.content
        return f"summary: {content.text}" if isinstance(content, TextContent) else "summary: ?"

    @server.tool()
    async def work(steps: int, ctx: Context) -> str:
        """Report progress for each step, then log a message."""
        for step in range(1, steps + 1):
            await ctx.report_progress(step, steps, f"step {step}")
        await ctx.info(f"{name} did {steps} steps")
        return "worked"

    @server.tool()
    async def hang() -> str:
        """Wait until cancelled."""
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    @server.tool(name="cancelled")
    def was_cancelled() -> bool:
        """Whether a `hang` call was cancelled."""
        return cancelled.is_set()

    return server


def main() -> None:
    name = sys.argv[1]
    stubborn = "--stubborn" in sys.argv[2:]
    if stubborn:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    secret = os.environ.get("STDIO_TEST_SECRET")
    print(f"{name} started" + (f" with secret {secret}" if secret else ""), file=sys.stderr, flush=True)
    build(name).run("stdio")
    if stubborn:
        print(f"{name} ignores the end of stdin", file=sys.stderr, flush=True)
        threading.Event().wait()  # until SIGKILL


if __name__ == "__main__":
    main()
