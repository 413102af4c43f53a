"""OAuth 2.1 for upstreams, as the MCP authorization spec profiles it (2026-07-28 `basic/authorization`)."""
