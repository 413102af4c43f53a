"""Where OAuth registrations and tokens live: the OS keyring when it works, else a private file.

One record per upstream name, a JSON object (issuer, resource, client registration, tokens). The daemon is the
only reader and writer (TOK-1). Keyring calls run in their own daemon thread under a timeout, since a locked or
absent Secret Service can hang (TOK-6): a call that hangs is abandoned (it cannot keep the daemon from exiting),
and while it hangs the keyring counts as not answering. The file store lives in the 0700 state directory:
created 0600, written atomically (temp file, fsync, rename, fsync of the directory: a reader sees the old or the
new content, never a mix, even after `kill -9`; temp files such a kill leaves behind are removed by the next
write), refused when its owner or mode, or its directory's, is wrong or it is a symlink (TOK-7/8), and moved
aside with a loud error when it cannot be parsed (TOK-9).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

from mcpx import jsonrpc
from mcpx.errors import ParseError
from mcpx.log import get_logger

_log = get_logger("mcpx.oauth")

KEYRING_SERVICE: Final = "mcpx"
KEYRING_TIMEOUT: Final = 3.0
_TEMP_PREFIX: Final = ".oauth-tokens-"
_T = TypeVar("_T")

Record = dict[str, Any]


class StoreError(Exception):
    """The store cannot be used safely; the message says why and what to do."""


class TokenStore(Protocol):
    backend: str
    # Why tokens are not where the user may expect them (the file store standing in for the keyring), or None.
    note: str | None

    async def load(self, name: str) -> Record | None: ...

    async def save(self, name: str, record: Record) -> None: ...

    async def delete(self, name: str) -> None: ...


class FileStore:
    """All records in `<state>/oauth-tokens.json`, mode 0600."""

    backend = "file"

    def __init__(self, path: Path, note: str | None = None) -> None:
        self.path = path
        self.note = note
        self._lock = asyncio.Lock()
        self._swept = False

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

    def _check_directory(self) -> None:
        """The directory must be a real directory of ours that nobody else can write to (they could swap the
        file). A missing one is created by the first write."""
        directory = self.path.parent
        try:
            info = directory.lstat()
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(info.st_mode):
            raise StoreError(f"the token store's directory {directory} is not a directory (a symlink?); refused")
        if info.st_uid != os.geteuid() or info.st_mode & 0o022:
            raise StoreError(
                f"the token store's directory {directory} is writable by others or not yours "
                f"(mode {stat.filemode(info.st_mode)}, uid {info.st_uid}); fix it with: chmod 700 {directory}"
            )

    def _read(self) -> dict[str, Any]:
        self._check_directory()
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise StoreError(f"the token store {self.path} is a symlink; refused (remove it)") from None
            raise StoreError(f"cannot open the token store {self.path}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise StoreError(f"the token store {self.path} is not a regular file; refused")
            if info.st_uid != os.geteuid() or info.st_mode & 0o077:
                raise StoreError(
                    f"the token store {self.path} is readable by others or not yours "
                    f"(mode {stat.filemode(info.st_mode)}, uid {info.st_uid}); fix it with: chmod 600 {self.path}"
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
            if not os.path.lexists(aside):
                os.replace(self.path, aside)
                _log.error(
                    "the token store was unreadable; moved aside, logins are needed again",
                    path=str(self.path),
                    moved_to=str(aside),
                )
                return
        raise StoreError(f"the token store {self.path} is unreadable and 999 copies are already set aside")

    def _write(self, records: dict[str, Any]) -> None:
        directory = self.path.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._check_directory()
        if not self._swept:
            self._sweep(directory)
        data = jsonrpc.dumps({"version": 1, "upstreams": records})
        # mkstemp creates the file 0600 whatever the umask.
        fd, temporary = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=directory)
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

    def _sweep(self, directory: Path) -> None:
        """Remove temp files a killed writer left (they hold tokens that must not outlive a logout). The daemon is
        the only writer (TOK-1), so none of them is being written now."""
        self._swept = True
        for leftover in directory.glob(f"{_TEMP_PREFIX}*"):
            with contextlib.suppress(OSError):
                leftover.unlink()
                _log.info("removed a token store temp file left by an interrupted write", path=str(leftover))


class KeyringStore:
    """One keyring entry per upstream (service `mcpx`, user = upstream name)."""

    backend = "keyring"
    note: str | None = None

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


class _Hung:
    """The keyring call that did not answer in time, while its thread still waits (at most one is ever left)."""

    thread: threading.Thread | None = None


async def _bounded(call: Callable[[], _T]) -> _T:
    """Run a keyring call in its own daemon thread, for at most KEYRING_TIMEOUT seconds.

    Not `asyncio.to_thread`: a call that never returns would hold a thread of the default executor, which the
    interpreter joins at exit, so a hung keyring would keep mcpxd from ever stopping."""
    hung = _Hung.thread
    if hung is not None:
        if hung.is_alive():
            raise StoreError("the OS keyring has not answered an earlier request yet")
        _Hung.thread = None
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[_T] = loop.create_future()

    def deliver(outcome: Callable[[], None]) -> None:
        if not answer.done():
            outcome()

    def run() -> None:
        try:
            result = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task, which judges it
            failure = exc
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
                loop.call_soon_threadsafe(deliver, lambda: answer.set_exception(failure))
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(deliver, lambda: answer.set_result(result))

    thread = threading.Thread(target=run, name="mcpx-keyring", daemon=True)
    thread.start()
    try:
        async with asyncio.timeout(KEYRING_TIMEOUT):
            return await answer
    except TimeoutError:
        _Hung.thread = thread
        raise StoreError(f"the OS keyring did not answer within {KEYRING_TIMEOUT:g} s") from None
    except StoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - keyring backends raise anything; none may reach the caller raw
        raise StoreError(f"the OS keyring failed: {type(exc).__name__}") from None


async def open_store(state_dir: Path, choice: str = "auto") -> TokenStore:
    """The keyring if one answers (one bound for choosing the backend and a probe read), else the file store, with
    a warning saying where tokens go. `choice` is `[daemon] token_store`: "auto", "keyring" (no fallback) or
    "file"."""
    path = state_dir / "oauth-tokens.json"
    if choice == "file":
        return FileStore(path)
    try:
        keyring = await _bounded(probe_keyring)
    except StoreError as exc:
        if choice == "keyring":
            raise
        _log.warning("OAuth tokens are kept in a private file, not the OS keyring", reason=str(exc), path=str(path))
        return FileStore(path, note=str(exc))
    return KeyringStore(keyring)


def probe_keyring() -> Any:
    """The keyring module, once its backend has been chosen (that may talk to D-Bus) and has answered a read."""
    try:
        import keyring
        import keyring.backends.fail
    except ImportError:
        raise StoreError("the keyring package is not installed") from None
    if isinstance(keyring.get_keyring(), keyring.backends.fail.Keyring):
        raise StoreError("no OS keyring is available")
    keyring.get_password(KEYRING_SERVICE, "__mcpx_probe__")
    return keyring
