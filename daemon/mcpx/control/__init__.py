"""The control protocol mcpxctl speaks with mcpxd: JSON-RPC `mcpx/*` methods over the agent socket."""
