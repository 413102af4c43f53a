"""Credential providers: what mcpx sends each upstream to authenticate, and how it re-reads it."""
