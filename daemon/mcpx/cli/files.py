"""Replacing a file atomically (standard library only): `mcpxctl install`'s unit files and plist, `mcpxctl import
--write`'s config."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, text: str, mode: int) -> None:
    """Replace `path` with `text` (UTF-8, permissions `mode`) in one step: a reader sees the old file or the new
    one, never a part. The text is written to a temporary file in the same directory, flushed to disk, then renamed
    over `path`; on any failure the temporary file is removed and `path` is left as it was. The directory must
    exist."""
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".mcpx-tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
