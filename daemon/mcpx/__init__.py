"""mcpx: a per-user MCP broker daemon (`mcpxd`), its control client (`mcpxctl`) and their shared modules."""

__version__ = "0.1.0"

# How mcpx names itself to MCP peers: `clientInfo` to upstreams, `serverInfo` to agents (an MCP `Implementation`).
IMPLEMENTATION = {"name": "mcpx", "version": __version__}
