"""Stdio upstreams in tests: the real SDK server script (`stdio_server.py`) as a `command` upstream of mcpxd."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

# The server script, run by the test venv's Python (the child gets a minimal environment: no venv variables).
SERVER = str(Path(__file__).with_name("stdio_server.py"))
# The fault of a server that stops reading its stdin (or, with `--slow`, reads it slowly).
STOPS_READING = str(Path(__file__).with_name("stdio_stops_reading.py"))


def stdio_toml(name: str, *server_args: str, table: str = "[[proxy.upstream]]", **fields: Any) -> str:
    """One stdio upstream running `stdio_server.py NAME SERVER_ARGS…`: a `[[proxy.upstream]]` table, or with
    `table="[mcpServers.NAME]"` the Claude Desktop spelling. Strings, lists and string tables are written as TOML
    (JSON strings and arrays of them are valid TOML)."""
    lines = [table]
    if table == "[[proxy.upstream]]":
        lines.append(f"name = {json.dumps(name)}")
    lines += [f"command = {json.dumps(sys.executable)}", f"args = {json.dumps([SERVER, name, *server_args])}"]
    for key, value in fields.items():
        if isinstance(value, dict):
            value_text = "{ " + ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in value.items()) + " }"
        elif isinstance(value, bool):
            value_text = "true" if value else "false"
        else:
            value_text = json.dumps(value)
        lines.append(f"{key} = {value_text}")
    return "\n".join(lines) + "\n\n"


def gone(pid: int) -> bool:
    """Whether no process has this id any more (the daemon reaped its child)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False
