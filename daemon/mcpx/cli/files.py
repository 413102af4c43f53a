"""The files mcpxctl writes (standard library only): replaced atomically (`mcpxctl install`'s unit files and plist,
`install-shim`'s launcher, `import --write`'s config), and recognised by the marker line it puts in those it owns."""

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


def has_marker(path: Path, marker: str) -> bool:
    """Whether `marker` is in the first KiB of `path`: the line mcpxctl writes into each file it owns."""
    try:
        with path.open(encoding="utf-8", errors="replace") as file:
            head = file.read(1024)
    except OSError:
        return False
    return marker in head
