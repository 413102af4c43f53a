"""What test agents do: watch their tool list (the `notifications/tools/list_changed` mcpx sends, and wait, bounded,
on them), and answer an elicitation (`answering_as`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from mcp.client import Client, ClientRequestContext
from mcp.types import ElicitRequestParams, ElicitResult


def answering_as(
    name: str, asked: list[str]
) -> Callable[[ClientRequestContext, ElicitRequestParams], Awaitable[ElicitResult]]:
    """An elicitation callback that records each question in `asked` and accepts with `{"name": name}`."""

    async def on_elicit(context: ClientRequestContext, params: ElicitRequestParams) -> ElicitResult:
        asked.append(params.message)
        return ElicitResult(action="accept", content={"name": name})

    return on_elicit


def change_watcher() -> tuple[asyncio.Event, Callable[[object], Awaitable[None]]]:
    """An event set on each `notifications/tools/list_changed`, and the message handler (for `agent(...,
    message_handler=...)`) that sets it."""
    changed = asyncio.Event()

    async def on_message(message: object) -> None:
        if getattr(message, "method", None) == "notifications/tools/list_changed":
            changed.set()

    return changed, on_message


async def wait_for_tools(client: Client, changed: asyncio.Event, predicate: Callable[[set[str]], bool]) -> set[str]:
    """Wait (bounded) for list_changed notifications until the agent's tool list satisfies `predicate`."""
    async with asyncio.timeout(15):
        while True:
            names = {tool.name for tool in (await client.list_tools()).tools}
            if predicate(names):
                return names
            await changed.wait()
            changed.clear()
