"""mcpx: a per-user MCP broker daemon (`mcpxd`), its control client (`mcpxctl`) and their shared modules."""

__version__ = "0.1.0"
