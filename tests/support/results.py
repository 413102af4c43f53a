"""Reading MCP results in tests."""

from __future__ import annotations

from mcp_types import CallToolResult, TextContent


def text_of(result: CallToolResult) -> str:
    """The text of a tool result's first content block (which must be text)."""
    block = result.content[0]
    assert isinstance(block, TextContent), block
    return block.text
