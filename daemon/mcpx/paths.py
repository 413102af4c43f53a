"""Where mcpx keeps things: the config file, the socket and the state directory (standard library only).

Resolution (the shim repeats the socket part, since it imports nothing from this package; a test keeps the
two in step):
- config: `--config`, else `$MCPX_CONFIG`, else `$XDG_CONFIG_HOME/mcpx/config.toml` (`~/.config/...`).
- socket: `[daemon] socket`, else `$MCPX_SOCKET`, else `$XDG_RUNTIME_DIR/mcpx/mcpx.sock`; without
  `$XDG_RUNTIME_DIR` (macOS, some containers) `/tmp/mcpx-<uid>/mcpx.sock`, a directory mcpxd creates 0700 and
  refuses to use when another user owns it.
- state: `[daemon] state_dir`, else `$MCPX_STATE_DIR`, else `$XDG_STATE_HOME/mcpx` (`~/.local/state/mcpx`); the
  daemon's log is `mcpxd.log` in it.
- the variables of a user service (`NAME=value` lines): `env` beside the config file.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Mapping
from pathlib import Path

LOG_FILE_NAME = "mcpxd.log"  # in the state directory
# sockaddr_un.sun_path is 108 bytes on Linux and 104 on macOS, including the terminating NUL.
MAX_SOCKET_PATH = 103
MAX_CONFIG_BYTES = 1 << 20  # a config of mcpx is a few KiB; a bigger file is not one


def read_config_file(path: Path, limit: int = MAX_CONFIG_BYTES) -> bytes:
    """The bytes of the config file `path`, which must be a regular file of at most `limit` bytes. It is opened
    without blocking and checked before it is read: a FIFO or a device there would otherwise block mcpxd's start,
    `reload` or `doctor` for good.

    Raises:
        OSError: it cannot be read (FileNotFoundError when missing); `strerror` says why.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, 1 << 16):
            size += len(chunk)
            if size > limit:
                raise OSError(errno.EFBIG, f"larger than {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _env_path(env: Mapping[str, str], name: str) -> Path | None:
    value = env.get(name, "")
    return Path(value).expanduser() if value else None


def config_home(env: Mapping[str, str] = os.environ) -> Path:
    """`$XDG_CONFIG_HOME`, else `~/.config`: where mcpx's config, systemd's user units and agents' configs live."""
    return _env_path(env, "XDG_CONFIG_HOME") or Path.home() / ".config"


def config_path(explicit: Path | None, env: Mapping[str, str] = os.environ) -> Path:
    if explicit is not None:
        return explicit.expanduser()
    if (configured := _env_path(env, "MCPX_CONFIG")) is not None:
        return configured
    return config_home(env) / "mcpx" / "config.toml"


def env_file(config: Path) -> Path:
    """The variables a user service's mcpxd gets (`bearer_env`, `${VAR}`): `NAME=value` lines beside the config."""
    return config.parent / "env"


def config_is_explicit(explicit: Path | None, env: Mapping[str, str] = os.environ) -> bool:
    """A config file named by the user must exist; the default location may be absent (empty config)."""
    return explicit is not None or bool(env.get("MCPX_CONFIG"))


def socket_path(configured: Path | None, env: Mapping[str, str] = os.environ) -> Path:
    if configured is not None:
        return configured.expanduser()
    if (from_env := _env_path(env, "MCPX_SOCKET")) is not None:
        return from_env
    if (runtime := _env_path(env, "XDG_RUNTIME_DIR")) is not None:
        return runtime / "mcpx" / "mcpx.sock"
    return Path(f"/tmp/mcpx-{os.getuid()}") / "mcpx.sock"


def socket_lock(socket: Path) -> Path:
    """The lock file beside the socket, held by the daemon that serves it (`<socket>.lock`)."""
    return socket.with_name(socket.name + ".lock")


def state_dir(configured: Path | None, env: Mapping[str, str] = os.environ) -> Path:
    if configured is not None:
        return configured.expanduser()
    if (from_env := _env_path(env, "MCPX_STATE_DIR")) is not None:
        return from_env
    base = _env_path(env, "XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return base / "mcpx"
