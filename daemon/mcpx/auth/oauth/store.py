"""Where OAuth registrations and tokens live: the OS keyring when it works, else a private file.

One record per upstream name, a JSON object (issuer, resource, client registration, tokens). The daemon is the
only reader and writer (TOK-1). Keyring calls run in a thread under a timeout, since a locked or absent Secret
Service can hang (TOK-6). The file store lives in the 0700 state directory: created 0600 at open time, written
atomically (temp file, fsync, rename, fsync of the directory: a reader sees the old or the new content, never a
mix, even after `kill -9`), refused when its owner or mode is wrong or it is a symlink (TOK-7/8), and moved
aside with a loud error when it cannot be parsed (TOK-9).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

from mcpx import jsonrpc
from mcpx.errors import ParseError
from mcpx.log import get_logger

_log = get_logger("mcpx.oauth")

KEYRING_SERVICE: Final = "mcpx"
KEYRING_TIMEOUT: Final = 3.0
_T = TypeVar("_T")

Record = dict[str, Any]


class StoreError(Exception):
    """The store cannot be used safely; the message says why and what to do."""


class TokenStore(Protocol):
    backend: str

    async def load(self, name: str) -> Record | None: ...

    async def save(self, name: str, record: Record) -> None: ...

    async def delete(self, name: str) -> None: ...


class FileStore:
    """All records in `<state>/oauth-tokens.json`, mode 0600."""

    backend = "file"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = asyncio.Lock()

    async def load(self, name: str) -> Record | None:
        async with self._lock:
            record = self._read().get(name)
        return record if isinstance(record, dict) else None

    async def save(self, name: str, record: Record) -> None:
        async with self._lock:
            records = self._read()
            records[name] = record
            self._write(records)

    async def delete(self, name: str) -> None:
        async with self._lock:
            records = self._read()
            if records.pop(name, None) is not None:
                self._write(records)

    def _read(self) -> dict[str, Any]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StoreError(f"cannot open the token store {self.path}: {exc.strerror} (is it a symlink?)") from None
        with os.fdopen(fd, "rb") as file:
            info = os.fstat(file.fileno())
            if info.st_uid != os.geteuid() or info.st_mode & 0o077:
                raise StoreError(
                    f"the token store {self.path} is readable by others or not yours "
                    f"(mode {stat.filemode(info.st_mode)}); fix it with: chmod 600 {self.path}"
                )
            raw = file.read()
        try:
            records = jsonrpc.loads(raw)
            if not isinstance(records, dict) or not isinstance(records.get("upstreams"), dict):
                raise ParseError("not an object with upstreams")
        except ParseError:
            self._quarantine()
            return {}
        upstreams: dict[str, Any] = records["upstreams"]
        return upstreams

    def _quarantine(self) -> None:
        for index in range(1, 1000):
            aside = self.path.with_name(f"{self.path.name}.corrupt-{index}")
            if not aside.exists():
                os.replace(self.path, aside)
                _log.error("the token store was unreadable; moved aside, logins are needed again", moved_to=str(aside))
                return

    def _write(self, records: dict[str, Any]) -> None:
        directory = self.path.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = jsonrpc.dumps({"version": 1, "upstreams": records})
        # mkstemp creates the file 0600 whatever the umask.
        fd, temporary = tempfile.mkstemp(prefix=".oauth-tokens-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)


class KeyringStore:
    """One keyring entry per upstream (service `mcpx`, user = upstream name)."""

    backend = "keyring"

    def __init__(self, keyring_module: Any) -> None:
        self._keyring = keyring_module

    async def load(self, name: str) -> Record | None:
        raw = await _bounded(lambda: self._keyring.get_password(KEYRING_SERVICE, name))
        if raw is None:
            return None
        try:
            record = jsonrpc.loads(raw)
        except ParseError:
            _log.error("an unreadable keyring entry was ignored; a login is needed again", upstream=name)
            return None
        return record if isinstance(record, dict) else None

    async def save(self, name: str, record: Record) -> None:
        data = jsonrpc.dumps(record).decode()
        await _bounded(lambda: self._keyring.set_password(KEYRING_SERVICE, name, data))

    async def delete(self, name: str) -> None:
        errors = getattr(self._keyring, "errors", None)
        missing = getattr(errors, "PasswordDeleteError", LookupError)

        def delete() -> None:
            with contextlib.suppress(missing):
                self._keyring.delete_password(KEYRING_SERVICE, name)

        await _bounded(delete)


async def _bounded(call: Callable[[], _T]) -> _T:
    try:
        async with asyncio.timeout(KEYRING_TIMEOUT):
            return await asyncio.to_thread(call)
    except TimeoutError:
        raise StoreError(f"the OS keyring did not answer within {KEYRING_TIMEOUT:g} s") from None
    except StoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - keyring backends raise anything; none may reach the caller raw
        raise StoreError(f"the OS keyring failed: {type(exc).__name__}") from None


async def open_store(state_dir: Path, choice: str = "auto") -> TokenStore:
    """The keyring if one answers (bounded), else the file store, with a warning saying where tokens go.
    `choice` is `[daemon] token_store`: "auto", "keyring" (no fallback) or "file"."""
    file_store = FileStore(state_dir / "oauth-tokens.json")
    if choice == "file":
        return file_store
    try:
        keyring = await _bounded(_load_keyring)
        store = KeyringStore(keyring)
        await store.load("__mcpx_probe__")
    except StoreError as exc:
        if choice == "keyring":
            raise
        _log.warning(
            "OAuth tokens are kept in a private file, not the OS keyring", reason=str(exc), path=str(file_store.path)
        )
        return file_store
    return store


def _load_keyring() -> Any:
    """The keyring module with a usable backend (choosing one may talk to D-Bus: run in a thread)."""
    try:
        import keyring
        import keyring.backends.fail
    except ImportError:
        raise StoreError("the keyring package is not installed") from None
    if isinstance(keyring.get_keyring(), keyring.backends.fail.Keyring):
        raise StoreError("no OS keyring is available")
    return keyring
