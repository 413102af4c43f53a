"""mcpx: a per-user MCP broker daemon (`mcpxd`), its control client (`mcpxctl`) and their shared modules."""

__version__ = "0.1.0"

# How mcpx names itself to MCP peers: `clientInfo` to upstreams, `serverInfo` to agents (an MCP `Implementation`).
IMPLEMENTATION = {"name": "mcpx", "version": __version__}


def compiled() -> bool:
    """Whether the daemon's hot path runs compiled by mypyc (`make compile`, mypyc_build.py), not as plain Python."""
    from mcpx.upstream import h1

    return not (h1.__file__ or "").endswith(".py")
