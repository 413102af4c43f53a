"""Customizations of the test upstream (`tests.support.upstream.Upstream(customize=...)`) that several test modules
share: a subscribable resource, prompts with completions, and tools that ask the client questions."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from mcp.server import ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.shared.exceptions import MCPError
from mcp.types import (
    Completion,
    EmptyResult,
    ResourceLink,
    ResourceUpdatedNotification,
    ResourceUpdatedNotificationParams,
    SamplingMessage,
    SetLevelRequestParams,
    SubscribeRequestParams,
    TextContent,
    UnsubscribeRequestParams,
)
from pydantic import BaseModel

NOTES = "file:///notes.txt"


class Subscriptions:
    """An upstream's resource subscriptions, as its `resources/subscribe` and `unsubscribe` handlers saw them.
    A subscription to a URI in `held` is answered only once `release` is set."""

    def __init__(self, held: frozenset[str] = frozenset()) -> None:
        self.subscribed: list[str] = []
        self.unsubscribed: list[str] = []
        self.unsubscribe_received = asyncio.Event()
        self.subscribe_received = asyncio.Event()
        self.held = held
        self.release = asyncio.Event()

    def customize(self, server: MCPServer) -> None:
        @server.resource(NOTES, name="notes", mime_type="text/plain")
        def notes() -> str:
            return "notes"

        @server.tool()
        async def touch(uri: str, ctx: Context) -> str:
            """Change a resource: its subscribers hear of it."""
            session = ctx.request_context.session
            notification = ResourceUpdatedNotification(params=ResourceUpdatedNotificationParams(uri=uri))
            await session.send_notification(notification, related_request_id=ctx.request_id)
            return "touched"

        @server.tool()
        def linked() -> list[Any]:
            """A result that links to a resource of this server."""
            return [ResourceLink(type="resource_link", uri=NOTES, name="notes")]

        async def subscribe(ctx: Any, params: SubscribeRequestParams) -> EmptyResult:
            self.subscribed.append(str(params.uri))
            self.subscribe_received.set()
            if str(params.uri) in self.held:
                await self.release.wait()
            return EmptyResult()

        async def unsubscribe(ctx: Any, params: UnsubscribeRequestParams) -> EmptyResult:
            self.unsubscribed.append(str(params.uri))
            self.unsubscribe_received.set()
            return EmptyResult()

        lowlevel = server._lowlevel_server
        lowlevel.add_request_handler("resources/subscribe", SubscribeRequestParams, subscribe)
        lowlevel.add_request_handler("resources/unsubscribe", UnsubscribeRequestParams, unsubscribe)


def with_prompts(name: str, levels: list[str] | None = None) -> Callable[[MCPServer], None]:
    """A review prompt and its completions; with `levels`, the server also offers logging and records there each
    level it is set to."""

    def customize(server: MCPServer) -> None:
        @server.prompt()
        def review(topic: str) -> str:
            """Ask for a review of a topic."""
            return f"{name} reviews {topic}"

        @server.completion()  # type: ignore[no-untyped-call, untyped-decorator]  # the SDK's decorator is untyped
        async def complete(ref: object, argument: object, context: object) -> Completion:
            return Completion(values=[f"{name}-one", f"{name}-two"])

        if levels is None:
            return

        async def set_level(ctx: ServerRequestContext[Any], params: SetLevelRequestParams) -> EmptyResult:
            levels.append(params.level)
            return EmptyResult()

        # MCPServer has no decorator for logging/setLevel (deprecated in 2026-07-28): its low-level server takes the
        # handler, and then offers the logging capability.
        server._lowlevel_server.add_request_handler("logging/setLevel", SetLevelRequestParams, set_level)

    return customize


class Name(BaseModel):
    name: str


def with_questions(server: MCPServer) -> None:
    """Tools that ask the client during the call: `greet` (form elicitation) and `summarize` (sampling)."""

    @server.tool()
    async def greet(ctx: Context) -> str:
        """Ask the user for a name (form elicitation) and greet them."""
        answer = await ctx.elicit("Who are you?", Name)
        return f"hello {answer.data.name}" if answer.action == "accept" else f"no name ({answer.action})"

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
            return f"sampling refused: {exc.error.code} {exc.error.message}"
        content = reply.content
        return f"summary: {content.text}" if isinstance(content, TextContent) else "summary: ?"
