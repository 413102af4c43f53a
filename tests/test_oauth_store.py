"""The OAuth token store (daemon/mcpx/auth/oauth/store.py): the keyring under a bound with the file fallback,
and the file store's safety (0600 in a 0700 directory, atomic writes that survive `kill -9`, corrupt files moved
aside, wrong owner, mode or a symlink refused). Every path is under a temp dir; the keyring is never the user's.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import keyring
import keyring.backends.fail
import keyring.errors
import pytest
from keyring.backend import KeyringBackend
from structlog.testing import capture_logs

from mcpx.auth.oauth import store as store_module
from mcpx.auth.oauth.store import FileStore, KeyringStore, StoreError, open_store
from tests.support.daemon import Sandbox, mcpxctl, running_daemon
from tests.support.oauth import login, oauth_config, protected

RECORD = {"issuer": "https://as.example", "tokens": {"access_token": "at-1", "refresh_token": "rt-1"}}


# ---- keyring backends for the test process (installed with keyring.set_keyring, restored afterwards)


class MemoryKeyring(KeyringBackend):
    priority = 1

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.entries: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.entries.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.entries[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        if self.entries.pop((service, username), None) is None:
            raise keyring.errors.PasswordDeleteError(username)


class HangingKeyring(KeyringBackend):
    """Every call blocks until `release` is set (bounded, so a failing test leaves no thread behind for long)."""

    priority = 1

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def get_password(self, service: str, username: str) -> str | None:
        self.calls += 1
        self.entered.set()
        self.release.wait(30)
        return None

    def set_password(self, service: str, username: str, password: str) -> None:
        self.get_password(service, username)

    def delete_password(self, service: str, username: str) -> None:
        self.get_password(service, username)


class BrokenKeyring(KeyringBackend):
    priority = 1

    def get_password(self, service: str, username: str) -> str | None:
        raise RuntimeError("dbus said no, with a secret-looking detail")

    def set_password(self, service: str, username: str, password: str) -> None:
        raise RuntimeError("dbus said no")

    def delete_password(self, service: str, username: str) -> None:
        raise RuntimeError("dbus said no")


@pytest.fixture
def use_keyring() -> Iterator[Any]:
    previous = keyring.get_keyring()

    def install(backend: KeyringBackend) -> KeyringBackend:
        keyring.set_keyring(backend)
        return backend

    try:
        yield install
    finally:
        keyring.set_keyring(previous)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    return directory


# ---- choosing the store


async def test_no_os_keyring_falls_back_to_the_file_and_says_why(state: Path, use_keyring: Any) -> None:
    use_keyring(keyring.backends.fail.Keyring())  # type: ignore[no-untyped-call]
    with capture_logs() as logs:
        chosen = await open_store(state, "auto")
    assert isinstance(chosen, FileStore) and chosen.backend == "file"
    assert chosen.note == "no OS keyring is available"
    assert [event["event"] for event in logs] == ["OAuth tokens are kept in a private file, not the OS keyring"]
    with pytest.raises(StoreError, match="no OS keyring"):
        await open_store(state, "keyring")
    explicit = await open_store(state, "file")
    assert isinstance(explicit, FileStore) and explicit.note is None


async def test_a_hanging_keyring_is_given_up_within_its_bound(
    state: Path, use_keyring: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "KEYRING_TIMEOUT", 0.2)
    backend = use_keyring(HangingKeyring())
    try:
        started = time.monotonic()
        chosen = await open_store(state, "auto")
        elapsed = time.monotonic() - started
        assert isinstance(chosen, FileStore)
        assert chosen.note == "the OS keyring did not answer within 0.2 s"
        assert 0.2 <= elapsed < 5
        assert backend.entered.is_set()
        # While that call still hangs, the keyring is not asked again (no pile of stuck threads): refused at once.
        with pytest.raises(StoreError, match="has not answered an earlier request"):
            await open_store(state, "keyring")
        assert backend.calls == 1
        # The file store it fell back to works.
        await chosen.save("up", RECORD)
        assert await chosen.load("up") == RECORD
    finally:
        backend.release.set()
    # Once the stuck call has returned, the keyring is tried again (and answers now).
    stuck = store_module._Hung.thread
    assert stuck is not None
    await asyncio.to_thread(stuck.join, 10)
    assert isinstance(await open_store(state, "keyring"), KeyringStore)


async def test_a_hung_keyring_does_not_keep_the_process_from_exiting(tmp_path: Path) -> None:
    """The abandoned call's thread is a daemon thread, not one of the default executor (which the interpreter
    joins at exit): a process whose keyring hung forever still exits."""
    library = tmp_path / "lib"
    library.mkdir()
    (library / "hangingkeyring.py").write_text(HANGING_BACKEND)
    script = (
        "import asyncio, pathlib, sys\n"
        "from mcpx.auth.oauth import store\n"
        "store.KEYRING_TIMEOUT = 0.2\n"
        "chosen = asyncio.run(store.open_store(pathlib.Path(sys.argv[1]), 'auto'))\n"
        "print(chosen.backend, chosen.note, flush=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(library), "PYTHON_KEYRING_BACKEND": "hangingkeyring.Keyring"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, str(tmp_path), env=env, stdout=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(20):
            stdout, _ = await process.communicate()
    finally:
        if process.returncode is None:  # it hung at exit: the failure this test is about
            process.kill()
            await process.wait()
    assert process.returncode == 0
    assert stdout.decode().splitlines()[-1] == "file the OS keyring did not answer within 0.2 s"


async def test_keyring_store_round_trip_and_failures(state: Path, use_keyring: Any) -> None:
    backend = use_keyring(MemoryKeyring())
    chosen = await open_store(state, "auto")
    assert isinstance(chosen, KeyringStore) and chosen.backend == "keyring" and chosen.note is None
    await chosen.save("up", RECORD)
    assert json.loads(backend.entries[("mcpx", "up")]) == RECORD
    assert await chosen.load("up") == RECORD
    await chosen.delete("up")
    await chosen.delete("up")  # deleting what is not there is fine
    assert await chosen.load("up") is None
    assert not (state / "oauth-tokens.json").exists()

    backend.entries[("mcpx", "garbled")] = "{not json"
    with capture_logs() as logs:
        assert await chosen.load("garbled") is None
    assert logs[0]["log_level"] == "error"

    use_keyring(BrokenKeyring())  # type: ignore[no-untyped-call]
    with pytest.raises(StoreError) as raised:
        await chosen.load("up")
    assert str(raised.value) == "the OS keyring failed: RuntimeError"  # the backend's message is not repeated
    with pytest.raises(StoreError):
        await open_store(state, "keyring")
    assert isinstance(await open_store(state, "auto"), FileStore)


# ---- the file store


async def test_the_file_is_0600_in_a_0700_directory_whatever_the_umask(tmp_path: Path) -> None:
    directory = tmp_path / "fresh" / "state"
    previous = os.umask(0)
    try:
        chosen = FileStore(directory / "oauth-tokens.json")
        await chosen.save("up", RECORD)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "oauth-tokens.json").stat().st_mode) == 0o600
    assert json.loads((directory / "oauth-tokens.json").read_text()) == {"version": 1, "upstreams": {"up": RECORD}}
    assert await FileStore(directory / "oauth-tokens.json").load("up") == RECORD


async def test_writes_replace_the_file_atomically(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = state / "oauth-tokens.json"
    chosen = FileStore(path)
    await chosen.save("a", {"n": 1})
    first = path.stat().st_ino
    await chosen.save("b", {"n": 2})
    # A new file took the old one's name (rename), rather than the old one being rewritten in place.
    assert path.stat().st_ino != first
    assert sorted(entry.name for entry in state.iterdir()) == ["oauth-tokens.json"]
    await chosen.delete("a")
    assert await chosen.load("a") is None and await chosen.load("b") == {"n": 2}

    # A write that fails half-way (here: the disk refuses the fsync) leaves the old content and no temp file.
    def refuse(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", refuse)
    with pytest.raises(OSError, match="No space"):
        await chosen.save("c", {"n": 3})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"version": 1, "upstreams": {"b": {"n": 2}}}
    assert sorted(entry.name for entry in state.iterdir()) == ["oauth-tokens.json"]


async def test_a_corrupt_file_is_moved_aside_loudly(state: Path) -> None:
    path = state / "oauth-tokens.json"
    for index, garbage in enumerate((b'{"version": 1, "upstr', b"[1, 2, 3]"), start=1):
        path.write_bytes(garbage)
        path.chmod(0o600)
        chosen = FileStore(path)
        with capture_logs() as logs:
            assert await chosen.load("up") is None
        (event,) = logs
        assert event["log_level"] == "error"
        assert "moved aside" in event["event"] and event["moved_to"] == f"{path}.corrupt-{index}"
        assert not path.exists()
        assert (state / f"oauth-tokens.json.corrupt-{index}").read_bytes() == garbage
        await chosen.save("up", RECORD)
        assert await FileStore(path).load("up") == RECORD


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o606, 0o660])
async def test_a_file_others_can_read_or_write_is_refused(state: Path, mode: int) -> None:
    path = state / "oauth-tokens.json"
    await FileStore(path).save("up", RECORD)
    path.chmod(mode)
    before = path.read_bytes()
    chosen = FileStore(path)
    with pytest.raises(StoreError, match=f"fix it with: chmod 600 {path}"):
        await chosen.load("up")
    with pytest.raises(StoreError):
        await chosen.save("up", {"replaced": True})
    assert path.read_bytes() == before  # not rewritten, not moved aside


async def test_a_file_of_another_user_is_refused(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = state / "oauth-tokens.json"
    await FileStore(path).save("up", RECORD)
    # The store compares owners with our effective uid: pretend to be someone else.
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(path).st_uid + 1)
    with pytest.raises(StoreError, match="not yours"):
        await FileStore(path).load("up")


async def test_a_symlink_is_refused(state: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({"version": 1, "upstreams": {"up": {"planted": True}}}))
    elsewhere.chmod(0o600)
    path = state / "oauth-tokens.json"
    path.symlink_to(elsewhere)
    chosen = FileStore(path)
    with pytest.raises(StoreError, match="is a symlink; refused"):
        await chosen.load("up")
    with pytest.raises(StoreError, match="is a symlink"):
        await chosen.save("up", RECORD)
    assert path.is_symlink()
    assert json.loads(elsewhere.read_text()) == {"version": 1, "upstreams": {"up": {"planted": True}}}


async def test_a_directory_others_can_write_to_is_refused(state: Path, tmp_path: Path) -> None:
    path = state / "oauth-tokens.json"
    await FileStore(path).save("up", RECORD)
    state.chmod(0o777)
    try:
        with pytest.raises(StoreError, match=f"chmod 700 {state}"):
            await FileStore(path).load("up")
    finally:
        state.chmod(0o700)
    linked = tmp_path / "linked"
    linked.symlink_to(state)
    with pytest.raises(StoreError, match="not a directory"):
        await FileStore(linked / "oauth-tokens.json").load("up")


async def test_temp_files_left_by_a_killed_writer_are_removed_by_the_next_write(state: Path) -> None:
    leftover = state / ".oauth-tokens-k1ll3d"
    leftover.write_text('{"version": 1, "upstreams": {"up": {"tokens": "old"}}}')
    chosen = FileStore(state / "oauth-tokens.json")
    assert await chosen.load("up") is None  # reading leaves it
    assert leftover.exists()
    await chosen.save("up", RECORD)
    assert sorted(entry.name for entry in state.iterdir()) == ["oauth-tokens.json"]


# ---- kill -9 while writing

WRITER = """
import asyncio, hashlib, sys
from pathlib import Path
from mcpx.auth.oauth.store import FileStore

async def main() -> None:
    store = FileStore(Path(sys.argv[1]))
    start = ((await store.load("up")) or {"i": 0})["i"] + 1
    for i in range(start, start + int(sys.argv[2])):
        padding = hashlib.sha256(str(i).encode()).hexdigest() * 2048  # 128 KiB, so writes take a while
        await store.save("up", {"i": i, "padding": padding, "tokens": {"access_token": f"at-{i}"}})
        sys.stderr.write(f"{i}\\n")  # progress on stderr: stdout gets the store's log lines
        sys.stderr.flush()

asyncio.run(main())
"""


def _intact(record: dict[str, Any]) -> bool:
    i = record["i"]
    return bool(
        record["padding"] == hashlib.sha256(str(i).encode()).hexdigest() * 2048
        and record["tokens"]["access_token"] == f"at-{i}"
    )


async def test_kill_9_during_writes_never_leaves_an_unreadable_store(state: Path) -> None:
    """A writer using the real store API is killed with SIGKILL after it reported N completed writes (N varies),
    while it keeps writing; the store must then load, holding the last reported record or a later one, complete,
    and the other upstreams' records untouched. Repeated a bounded number of times."""
    path = state / "oauth-tokens.json"
    other = {"issuer": "https://other.example", "tokens": {"access_token": "other-at"}}
    await FileStore(path).save("other", other)
    reported = 0
    for attempt in range(12):
        writes = 2 + attempt % 5
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            WRITER,
            str(path),
            "100000",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        assert process.stderr is not None
        try:
            async with asyncio.timeout(30):
                for _ in range(writes):
                    line = await process.stderr.readline()
                    assert line, "the writer ended early"
                    reported = int(line)
            process.send_signal(signal.SIGKILL)
        finally:
            if process.returncode is None:
                process.kill()
            async with asyncio.timeout(10):
                await process.wait()
        assert process.returncode == -signal.SIGKILL
        with capture_logs() as logs:
            reader = FileStore(path)
            record = await reader.load("up")
            assert await reader.load("other") == other
        assert not logs, logs  # nothing was quarantined
        assert record is not None and record["i"] >= reported and _intact(record)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert not list(state.glob("*.corrupt-*"))
    # Whatever temp files the kills left are gone after the next write.
    await FileStore(path).save("other", other)
    assert sorted(entry.name for entry in state.iterdir()) == ["oauth-tokens.json"]


# ---- through the daemon

HANGING_BACKEND = """
import threading
from keyring.backend import KeyringBackend

class Keyring(KeyringBackend):
    priority = 1

    def get_password(self, service, username):
        threading.Event().wait()  # a Secret Service that never answers

    def set_password(self, service, username, password):
        threading.Event().wait()

    def delete_password(self, service, username):
        threading.Event().wait()
"""


@pytest.fixture
def hanging_keyring(sandbox: Sandbox) -> Sandbox:
    library = sandbox.root / "lib"
    library.mkdir()
    (library / "hangingkeyring.py").write_text(HANGING_BACKEND)
    sandbox.env["PYTHONPATH"] = str(library)
    sandbox.env["PYTHON_KEYRING_BACKEND"] = "hangingkeyring.Keyring"
    return sandbox


async def test_the_daemon_falls_back_to_the_file_when_the_keyring_hangs_and_says_so(
    hanging_keyring: Sandbox,
) -> None:
    sandbox = hanging_keyring
    async with protected() as (_auth, upstream):
        oauth_config(sandbox, upstream)
        sandbox.write_config(sandbox.config.read_text().replace('token_store = "file"', 'token_store = "auto"'))
        async with running_daemon(sandbox) as daemon:
            code, _, stderr = await login(sandbox)
            assert code == 0, stderr
            code, status_out, _ = await mcpxctl(sandbox, "status")
            assert code == 0
            assert "protected: logged in (OAuth, file" in status_out
            assert (
                "tokens are kept in a private file, not the OS keyring: the OS keyring did not answer within 3 s"
                in status_out
            )
            _, status_json, _ = await mcpxctl(sandbox, "status", "--json")
            (oauth,) = [u["oauth"] for u in json.loads(status_json)["upstreams"] if u["name"] == "protected"]
            assert oauth["storage"] == "file"
            assert oauth["storage_note"] == "the OS keyring did not answer within 3 s"
            assert stat.S_IMODE((sandbox.state / "oauth-tokens.json").stat().st_mode) == 0o600
        # The keyring call still hangs in its thread, and the daemon stopped anyway (within the stop's bound).
        assert daemon.process is not None and daemon.process.returncode == 0


@pytest.fixture
async def corrupt_store(sandbox: Sandbox) -> AsyncIterator[Sandbox]:
    sandbox.state.mkdir(mode=0o700)
    (sandbox.state / "oauth-tokens.json").write_bytes(b'{"version": 1, "upstreams": {"protected": {"tok')
    (sandbox.state / "oauth-tokens.json").chmod(0o600)
    yield sandbox


async def test_the_daemon_keeps_running_with_a_corrupt_store(corrupt_store: Sandbox) -> None:
    sandbox = corrupt_store
    async with protected() as (_auth, upstream):
        oauth_config(sandbox, upstream)
        async with running_daemon(sandbox):
            code, stdout, stderr = await login(sandbox)
            assert code == 0, stderr
            assert "logged in to protected: ready" in stdout
        events = [json.loads(line) for line in sandbox.log.read_text().splitlines()]
        (moved,) = [event for event in events if "token store was unreadable" in event["event"]]
        assert moved["level"] == "error"
        assert moved["moved_to"] == str(sandbox.state / "oauth-tokens.json.corrupt-1")
        assert (sandbox.state / "oauth-tokens.json.corrupt-1").exists()
        assert await FileStore(sandbox.state / "oauth-tokens.json").load("protected") is not None


async def test_the_daemon_refuses_a_store_others_can_read_and_says_how_to_fix_it(sandbox: Sandbox) -> None:
    sandbox.state.mkdir(mode=0o700)
    path = sandbox.state / "oauth-tokens.json"
    path.write_text('{"version": 1, "upstreams": {}}')
    path.chmod(0o644)
    async with protected() as (_auth, upstream):
        oauth_config(sandbox, upstream)
        async with running_daemon(sandbox):
            code, _, stderr = await login(sandbox)
            assert code == 1
            assert f"chmod 600 {path}" in stderr
            code, status_out, _ = await mcpxctl(sandbox, "status")
            assert code == 0 and "protected" in status_out  # the daemon still answers
        assert path.read_text() == '{"version": 1, "upstreams": {}}'
