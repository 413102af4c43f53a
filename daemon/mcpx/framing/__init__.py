"""Sans-I/O framers: bytes in, messages out, every buffer bounded."""
