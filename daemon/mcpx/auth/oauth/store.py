"""Where OAuth registrations and tokens live: the OS keyring when it works, else a private file.

One record per upstream name, a JSON object (issuer, resource, client registration, tokens). The daemon is the
only reader and writer (TOK-1). Keyring calls run in their own daemon thread under a timeout, since a locked or
absent Secret Service can hang (TOK-6): a call that hangs is abandoned (it cannot keep the daemon from exiting),
and while it hangs the keyring counts as not answering. The file store lives in the 0700 state directory:
created 0600, written atomically (temp file, fsync, rename, fsync of the directory: a reader sees the old or the
new content, never a mix, even after `kill -9`; temp files such a kill leaves behind are removed by the next
write), refused when its owner or mode, or its directory's, is wrong or it is a symlink (TOK-7/8), and moved
aside with a loud error when it cannot be parsed (TOK-9).

With `token_store = "auto"` the keyring store keeps the file as its fallback, so that a refresh token the server
rotated is never held only in memory because the keyring stopped answering mid-run ("keyring" puts no new record
in the file: such a save fails; it still follows the rule for entries an earlier run left there). The rule:

    An upstream's entry in the file, when it has one, wins over the keyring's: a record, or a logout marker
    (`{"logged_out": true}`, no secret) that means "none". Without a file entry, the keyring's record counts.

Every write keeps that rule true at each step, so a `kill -9` between any two writes leaves the newest state:
- a save to an upstream with no file entry goes to the keyring; if the keyring fails or does not answer, the same
  record goes to the file (once warned per spell of keyring trouble; `note` says why). A crash before the file
  write loses only a save that had not returned.
- a save to an upstream with a file entry goes to the file first (it stays the newest), then to the keyring, and
  only once the keyring has taken it is the file entry removed: a crash in between leaves the same record in
  both. A keyring that answers again thus takes the saves back, and the file copy goes.
- a logout (`delete`) first turns a record in the file into a logout marker, then deletes the keyring entry, then
  removes the file entry; if the keyring cannot delete, a marker is written (or kept), so a keyring copy (or a
  hung delete that never lands) cannot bring the login back.
A keyring call abandoned while it hangs may still land later, but only an older or the same save (or a delete):
no keyring call is made while one hangs, so the file entry that holds the newer state is never removed under it.
A keyring that did not answer when the store was opened is asked again once that call has returned.
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
# What the file holds for an upstream logged out while the keyring may still hold its record (see the rule above).
_LOGGED_OUT: Final[Record] = {"logged_out": True}
# The note when records are in the file but this daemon has not seen the keyring fail (an earlier one did).
_LEFT_IN_FILE: Final = "the OS keyring did not take them when they were last saved; the next save moves them to it"


class StoreError(Exception):
    """The store cannot be used safely; the message says why and what to do."""


class KeyringTimeout(StoreError):
    """The keyring did not answer in time, or an earlier call of ours still hangs in it."""


class TokenStore(Protocol):
    @property
    def backend(self) -> str: ...

    # Why tokens are not where the user may expect them (the file store standing in for the keyring), or None.
    @property
    def note(self) -> str | None: ...

    async def load(self, name: str) -> Record | None: ...

    async def save(self, name: str, record: Record) -> None: ...

    async def delete(self, name: str) -> None: ...


class FileStore:
    """All records in `<state>/oauth-tokens.json`, mode 0600."""

    backend = "file"
    note: str | None = None

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = asyncio.Lock()
        self._swept = False

    async def load(self, name: str) -> Record | None:
        record = await self.entry(name)
        return None if record is None or _logged_out(record) else record

    async def entry(self, name: str) -> Record | None:
        """What the file holds for `name`: a record, a logout marker, or None."""
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
    """One keyring entry per upstream (service `mcpx`, user = upstream name), and the file store's entries, which
    win when there are any (the rule in the module docstring). `keyring_module` is None when the keyring did not
    answer when the store was opened (`unavailable` says why): the file then takes everything, and the keyring is
    asked again once a call that hung has returned (`probe_again`). `fallback=False` (`token_store = "keyring"`):
    a save the keyring refuses fails, rather than going to the file."""

    def __init__(
        self,
        keyring_module: Any | None,
        file: FileStore,
        *,
        fallback: bool = True,
        unavailable: str | None = None,
        probe_again: bool = False,
    ) -> None:
        self._keyring = keyring_module
        self._file = file
        self._fallback = fallback
        self._probe_again = probe_again
        # Why the keyring is not taking records (the note), and whether that was already logged.
        self._reason = unavailable
        self._warned = unavailable is not None
        # The upstreams whose newest record is in the file, as far as this store has seen.
        self._in_file: set[str] = set()
        self._lock = asyncio.Lock()

    @property
    def backend(self) -> str:
        return "file" if self._keyring is None or self._in_file else "keyring"

    @property
    def note(self) -> str | None:
        return None if self.backend == "keyring" else self._reason or _LEFT_IN_FILE

    async def load(self, name: str) -> Record | None:
        async with self._lock:
            entry = await self._file.entry(name)
            if entry is not None:
                if _logged_out(entry):
                    return None
                self._in_file.add(name)
                return entry
            self._in_file.discard(name)
            keyring = await self._answering()
            if keyring is None:
                return None
            raw = await _bounded(lambda: keyring.get_password(KEYRING_SERVICE, name))
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
        async with self._lock:
            entry = await self._file.entry(name)
            if entry is not None:
                # The file holds this upstream's newest state: it takes the new one first, so it stays so.
                await self._write_file(name, record)
                self._in_file.add(name)
            try:
                await self._keyring_call(lambda keyring: keyring.set_password(KEYRING_SERVICE, name, data))
            except StoreError as exc:
                if entry is None:
                    if not self._fallback:
                        raise
                    await self._write_file(name, record)
                    self._in_file.add(name)
                self._keyring_failed(exc)
                return
            if entry is not None:
                await self._remove_from_file(name)
            self._in_file.discard(name)
            self._keyring_answered()

    async def delete(self, name: str) -> None:
        def delete(keyring: Any) -> None:
            missing = getattr(getattr(keyring, "errors", None), "PasswordDeleteError", LookupError)
            with contextlib.suppress(missing):
                keyring.delete_password(KEYRING_SERVICE, name)

        async with self._lock:
            entry = await self._file.entry(name)
            if entry is not None and not _logged_out(entry):
                # From here on nothing of this login can come back, whatever the keyring does or a crash cuts.
                await self._mark_logged_out(name)
            self._in_file.discard(name)
            try:
                await self._keyring_call(delete)
            except StoreError as exc:
                if entry is None:
                    await self._mark_logged_out(name)
                _log.info(
                    "the OS keyring could not delete a login; the token file records the logout instead",
                    upstream=name,
                    reason=str(exc),
                )
                return
            if entry is not None:
                await self._remove_from_file(name)
            self._keyring_answered()

    async def _answering(self) -> Any | None:
        """The keyring module, if the keyring may be asked now: when it did not answer at first, it is probed
        again once the call that hung has returned (one that failed outright is not)."""
        if self._keyring is None and self._probe_again and not _hung():
            try:
                self._keyring = await _bounded(probe_keyring)
            except KeyringTimeout as exc:
                self._reason = str(exc)
            except StoreError as exc:
                self._reason = str(exc)
                self._probe_again = False
            else:
                _log.info("the OS keyring answers now; OAuth tokens go to it from the next save")
        return self._keyring

    async def _keyring_call(self, call: Callable[[Any], object]) -> None:
        keyring = await self._answering()
        if keyring is None:
            raise StoreError(self._reason or "the OS keyring is not available")
        await _bounded(lambda: call(keyring))

    def _keyring_failed(self, exc: StoreError) -> None:
        """A save went to the file instead of the keyring: said once per spell of keyring trouble, whose first
        failure is the note (the later ones are mostly "has not answered an earlier request yet")."""
        if not self._warned or self._reason is None:
            self._reason = str(exc)
        if not self._warned:
            self._warned = True
            _log.warning(
                "the OS keyring did not take OAuth tokens; they are kept in the private token file until it does",
                reason=str(exc),
                path=str(self._file.path),
            )

    def _keyring_answered(self) -> None:
        if self._warned and self._keyring is not None:
            self._warned = False
            _log.info("the OS keyring answers again; OAuth tokens are moved back to it as they are saved")

    async def _write_file(self, name: str, record: Record) -> None:
        try:
            await self._file.save(name, record)
        except OSError as exc:
            raise StoreError(f"cannot write the token store {self._file.path}: {exc.strerror}") from None

    async def _mark_logged_out(self, name: str) -> None:
        await self._write_file(name, dict(_LOGGED_OUT))

    async def _remove_from_file(self, name: str) -> None:
        """The keyring holds the newest state now; the file's entry only repeats it (or a logout it has taken).
        If the file cannot be rewritten, the entry stays: the same record, or a logout, still wins."""
        try:
            await self._file.delete(name)
        except OSError as exc:
            _log.warning("could not remove an entry from the token file", path=str(self._file.path), error=exc.strerror)


def _logged_out(entry: Record) -> bool:
    return entry == _LOGGED_OUT


# The keyring calls that did not answer in time, while their threads still wait (normally at most one: no call is
# made while one hangs).
_HUNG: list[threading.Thread] = []


def _hung() -> bool:
    """Whether a keyring call we abandoned still hangs (forgetting those that have returned)."""
    _HUNG[:] = [thread for thread in _HUNG if thread.is_alive()]
    return bool(_HUNG)


async def _bounded(call: Callable[[], _T]) -> _T:
    """Run a keyring call in its own daemon thread, for at most KEYRING_TIMEOUT seconds.

    Not `asyncio.to_thread`: a call that never returns would hold a thread of the default executor, which the
    interpreter joins at exit, so a hung keyring would keep mcpxd from ever stopping."""
    if _hung():
        raise KeyringTimeout("the OS keyring has not answered an earlier request yet")
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
        _HUNG.append(thread)
        raise KeyringTimeout(f"the OS keyring did not answer within {KEYRING_TIMEOUT:g} s") from None
    except StoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - keyring backends raise anything; none may reach the caller raw
        raise StoreError(f"the OS keyring failed: {type(exc).__name__}") from None


async def open_store(state_dir: Path, choice: str = "auto") -> TokenStore:
    """The keyring if one answers (one bound for choosing the backend and a probe read), else the file, with a
    warning saying where tokens go. `choice` is `[daemon] token_store`: "auto", "keyring" (no file for tokens the
    keyring refuses) or "file" (the file alone). Both keyring choices honour the file's entries (see the rule)."""
    path = state_dir / "oauth-tokens.json"
    if choice == "file":
        return FileStore(path)
    try:
        keyring = await _bounded(probe_keyring)
    except StoreError as exc:
        if choice == "keyring":
            raise
        _log.warning("OAuth tokens are kept in a private file, not the OS keyring", reason=str(exc), path=str(path))
        return KeyringStore(None, FileStore(path), unavailable=str(exc), probe_again=isinstance(exc, KeyringTimeout))
    return KeyringStore(keyring, FileStore(path), fallback=choice != "keyring")


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
