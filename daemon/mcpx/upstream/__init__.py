"""Upstream side: one client session per configured MCP server, kept alive by a supervisor."""
