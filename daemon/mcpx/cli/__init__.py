"""Command-line programs other than the daemon (standard library only, so they start fast)."""
