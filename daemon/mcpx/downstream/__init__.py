"""Downstream side: the Unix socket agents (through mcpx-shim) and mcpxctl connect to, one session each."""
