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
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import keyring
import keyring.backends.fail
import pytest
from structlog.testing import capture_logs

from mcpx.auth.oauth import store as store_module
from mcpx.auth.oauth.store import FileStore, KeyringStore, StoreError, open_store
from tests.support.daemon import Sandbox, mcpxctl, running_daemon
from tests.support.keyrings import ControlledKeyring, hung_call_lands, installed
from tests.support.oauth import login, oauth_config, protected

RECORD = {"issuer": "https://as.example", "tokens": {"access_token": "at-1", "refresh_token": "rt-1"}}


@pytest.fixture
def state(tmp_path: Path) -> Path:
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    return directory


# ---- choosing the store


async def test_no_os_keyring_falls_back_to_the_file_and_says_why(state: Path) -> None:
    with installed(keyring.backends.fail.Keyring()):  # type: ignore[no-untyped-call]
        with capture_logs() as logs:
            chosen = await open_store(state, "auto")
            assert chosen.backend == "file" and chosen.note == "no OS keyring is available"
            await chosen.save("up", RECORD)  # the file takes it, and that was said once already
            assert await chosen.load("up") == RECORD
            assert chosen.note == "no OS keyring is available"
        assert [event["event"] for event in logs] == ["OAuth tokens are kept in a private file, not the OS keyring"]
        assert await FileStore(state / "oauth-tokens.json").load("up") == RECORD
        with pytest.raises(StoreError, match="no OS keyring"):
            await open_store(state, "keyring")
        explicit = await open_store(state, "file")
        assert isinstance(explicit, FileStore) and explicit.note is None


async def test_a_hanging_keyring_is_given_up_within_its_bound(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "KEYRING_TIMEOUT", 0.2)
    with installed(ControlledKeyring()) as backend:
        backend.hang()
        started = time.monotonic()
        chosen = await open_store(state, "auto")
        elapsed = time.monotonic() - started
        assert chosen.backend == "file"
        assert chosen.note == "the OS keyring did not answer within 0.2 s"
        assert 0.2 <= elapsed < 5
        assert backend.entered.is_set()
        # While that call still hangs, the keyring is not asked again (no pile of stuck threads): refused at once.
        with pytest.raises(StoreError, match="has not answered an earlier request"):
            await open_store(state, "keyring")
        assert backend.calls == ["get"]
        # The file store it fell back to works.
        await chosen.save("up", RECORD)
        assert await chosen.load("up") == RECORD
        # Once the stuck call has returned, the keyring is tried again (and answers now).
        await hung_call_lands(backend)
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


async def test_keyring_store_round_trip_and_failures(state: Path, controlled: ControlledKeyring) -> None:
    backend = controlled
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

    backend.failing = True
    with pytest.raises(StoreError) as raised:
        await chosen.load("up")
    assert str(raised.value) == "the OS keyring failed: RuntimeError"  # the backend's message is not repeated
    with pytest.raises(StoreError):
        await open_store(state, "keyring")
    assert (await open_store(state, "auto")).backend == "file"


# ---- the keyring stops answering mid-run: the file takes the saves, and wins at the next load

CANARY = "canary"  # every token below holds it: no log line, note or error may
# The keyring's bound in these tests: short, as each hang costs it, yet far above a healthy call's time.
HUNG_AFTER = 0.5
NOT_ANSWERED = "the OS keyring did not answer within 0.5 s"


def login_record(n: int) -> dict[str, Any]:
    """The record after the n-th rotation of the refresh token."""
    return {
        "issuer": "https://as.example",
        "resource": "https://up.example/mcp",
        "tokens": {"access_token": f"canary-at-{n}", "refresh_token": f"canary-rt-{n}"},
    }


def file_entries(state: Path) -> dict[str, Any]:
    path = state / "oauth-tokens.json"
    if not path.exists():
        return {}
    upstreams: dict[str, Any] = json.loads(path.read_text())["upstreams"]
    return upstreams


def shown(chosen: store_module.TokenStore) -> tuple[str, str | None]:
    """What `mcpxctl status` shows of the store: its backend and note (read afresh: they change)."""
    return chosen.backend, chosen.note


def in_keyring(backend: ControlledKeyring, name: str = "up") -> Any:
    raw = backend.entries.get(("mcpx", name))
    return None if raw is None else json.loads(raw)


@pytest.fixture
def controlled(monkeypatch: pytest.MonkeyPatch) -> Iterator[ControlledKeyring]:
    """A keyring in memory that tests make hang or fail; a hung call is given up after HUNG_AFTER seconds."""
    monkeypatch.setattr(store_module, "KEYRING_TIMEOUT", HUNG_AFTER)
    with installed(ControlledKeyring()) as backend:
        yield backend


async def fallen_back(state: Path, backend: ControlledKeyring) -> store_module.TokenStore:
    """A store whose keyring took login 1, then hung while login 2 was saved (the file took it); the hung call
    has not returned."""
    chosen = await open_store(state, "auto")
    assert shown(chosen) == ("keyring", None)
    await chosen.save("up", login_record(1))
    backend.hang()
    await chosen.save("up", login_record(2))
    assert backend.entered.is_set()
    return chosen


async def test_a_token_rotated_while_the_keyring_hangs_is_what_the_next_daemon_loads(
    state: Path, controlled: ControlledKeyring
) -> None:
    backend = controlled
    with capture_logs() as logs:
        chosen = await fallen_back(state, backend)
        await chosen.save("up", login_record(3))  # refused at once while that call hangs: the file again
        assert await chosen.load("up") == login_record(3)
    assert file_entries(state) == {"up": login_record(3)}
    assert stat.S_IMODE((state / "oauth-tokens.json").stat().st_mode) == 0o600
    assert in_keyring(backend) == login_record(1)
    assert backend.calls == ["get", "set", "set"]  # the probe, login 1, login 2 (hung); no pile of stuck calls
    assert shown(chosen) == ("file", NOT_ANSWERED)
    (warning,) = logs  # said once, not at every save
    assert warning["log_level"] == "warning" and warning["path"] == str(state / "oauth-tokens.json")
    assert CANARY not in repr(logs) and CANARY not in str(shown(chosen))

    # The hung call lands late (login 2, already outdated, goes into the keyring); the daemon stops. The next one
    # finds the keyring answering, and still gets the last rotated token.
    await hung_call_lands(backend)
    assert in_keyring(backend) == login_record(2)
    following = await open_store(state, "auto")
    assert await following.load("up") == login_record(3)
    assert shown(following) == (
        "file",
        "the OS keyring did not take them when they were last saved; the next save moves them to it",
    )


async def test_a_keyring_that_answers_again_takes_the_saves_back_and_the_file_copy_goes(
    state: Path, controlled: ControlledKeyring
) -> None:
    backend = controlled
    chosen = await fallen_back(state, backend)
    await FileStore(state / "oauth-tokens.json").save("other", {"resource": "r", "tokens": {"access_token": "x"}})
    await hung_call_lands(backend)
    with capture_logs() as logs:
        await chosen.save("up", login_record(3))
    assert in_keyring(backend) == login_record(3)
    assert file_entries(state) == {"other": {"resource": "r", "tokens": {"access_token": "x"}}}  # others untouched
    assert shown(chosen) == ("keyring", None)
    assert [event["event"] for event in logs] == [
        "the OS keyring answers again; OAuth tokens are moved back to it as they are saved"
    ]
    assert await (await open_store(state, "auto")).load("up") == login_record(3)
    # A second spell of trouble is warned about again.
    backend.failing = True
    with capture_logs() as logs:
        await chosen.save("up", login_record(4))
    assert [event["log_level"] for event in logs] == ["warning"] and CANARY not in repr(logs)
    assert shown(chosen) == ("file", "the OS keyring failed: RuntimeError")  # not the backend's message
    assert file_entries(state)["up"] == login_record(4)


async def hung_at_start(state: Path, backend: ControlledKeyring) -> store_module.TokenStore:
    """A store opened while the keyring, holding login 1, hangs (the file alone, for now); the call has not
    returned."""
    backend.entries[("mcpx", "up")] = json.dumps(login_record(1))
    backend.hang()
    return await open_store(state, "auto")


async def test_a_keyring_that_hung_at_start_is_asked_again_once_that_call_returns(
    state: Path, controlled: ControlledKeyring
) -> None:
    backend = controlled
    chosen = await hung_at_start(state, backend)
    assert shown(chosen) == ("file", NOT_ANSWERED)
    await chosen.save("up", login_record(2))
    assert file_entries(state) == {"up": login_record(2)} and in_keyring(backend) == login_record(1)
    await hung_call_lands(backend)
    await chosen.save("up", login_record(3))
    assert in_keyring(backend) == login_record(3) and file_entries(state) == {}
    assert shown(chosen) == ("keyring", None)


class Crash(BaseException):
    """The process dies here (kill -9): nothing after it runs, not even the store's own error handling."""


@pytest.mark.parametrize("operation", ["save", "delete"])
@pytest.mark.parametrize("crash_after", [0, 1, 2, 3])
async def test_a_crash_between_the_two_stores_writes_leaves_the_newest_state(
    state: Path, controlled: ControlledKeyring, monkeypatch: pytest.MonkeyPatch, operation: str, crash_after: int
) -> None:
    """The keyring holds login 1, the file login 2 (saved there while the keyring hung), and the keyring answers
    again. The process dies after the store's n-th write (file or keyring) of a save of login 3 or of a logout:
    the next daemon loads login 2 (nothing written yet), then login 3 or nothing; never login 1."""
    backend = controlled
    backend.entries[("mcpx", "up")] = json.dumps(login_record(1))
    await FileStore(state / "oauth-tokens.json").save("up", login_record(2))
    chosen = await open_store(state, "auto")
    writes: list[str] = []

    def counted(write: Any, what: str) -> Any:
        def write_then_maybe_crash(*args: Any) -> Any:
            result = write(*args)
            writes.append(what)
            if len(writes) == crash_after:
                raise Crash
            return result

        return write_then_maybe_crash

    # (undone before the next daemon's store opens; the fixture's own patches stay)
    with monkeypatch.context() as patch:
        patch.setattr(FileStore, "_write", counted(FileStore._write, "file"))
        patch.setattr(backend, "set_password", counted(backend.set_password, "keyring"))
        patch.setattr(backend, "delete_password", counted(backend.delete_password, "keyring"))
        expected: dict[str, Any] | None
        if crash_after == 0:
            expected = login_record(2)
        else:
            expected = login_record(3) if operation == "save" else None
            with pytest.raises(Crash):
                if operation == "save":
                    await chosen.save("up", login_record(3))
                else:
                    await chosen.delete("up")
        assert writes == ["file", "keyring", "file"][:crash_after]
    following = await open_store(state, "auto")
    assert await following.load("up") == expected
    # Whatever the crash left, the next save or logout ends with one copy, in the keyring.
    if expected is None:
        await following.delete("up")
        assert in_keyring(backend) is None
    else:
        await following.save("up", login_record(4))
        assert in_keyring(backend) == login_record(4)
    assert file_entries(state) == {}


async def test_a_save_the_keyring_fails_goes_to_the_file_and_a_crash_after_it_keeps_it(
    state: Path, controlled: ControlledKeyring
) -> None:
    backend = controlled
    chosen = await open_store(state, "auto")
    await chosen.save("up", login_record(1))
    backend.failing = True
    await chosen.save("up", login_record(2))  # nothing after this write: as good as a kill -9 right after it
    backend.failing = False
    assert await (await open_store(state, "auto")).load("up") == login_record(2)


async def test_logout_removes_the_login_from_both_stores(state: Path, controlled: ControlledKeyring) -> None:
    backend = controlled
    chosen = await fallen_back(state, backend)
    await hung_call_lands(backend)
    await chosen.delete("up")
    assert in_keyring(backend) is None and file_entries(state) == {}
    assert await chosen.load("up") is None
    assert await (await open_store(state, "auto")).load("up") is None


async def test_a_logout_the_hung_keyring_cannot_take_does_not_come_back(
    state: Path, controlled: ControlledKeyring
) -> None:
    backend = controlled
    chosen = await open_store(state, "auto")
    await chosen.save("up", login_record(1))
    backend.hang()
    with capture_logs() as logs:
        await chosen.delete("up")  # returns within the bound; the keyring still holds the login
    assert in_keyring(backend) == login_record(1)
    assert file_entries(state) == {"up": {"logged_out": True}}  # a marker, no secret
    assert CANARY not in repr(logs)
    assert await chosen.load("up") is None
    # The daemon restarts; the keyring answers, the hung delete never landed: the login stays logged out.
    backend.hanging = False
    assert await (await open_store(state, "auto")).load("up") is None
    await hung_call_lands(backend)
    # A new login puts the keyring back in charge and the marker goes.
    following = await open_store(state, "auto")
    await following.save("up", login_record(2))
    assert in_keyring(backend) == login_record(2) and file_entries(state) == {}
    assert await (await open_store(state, "auto")).load("up") == login_record(2)


async def test_logout_while_the_keyring_hung_at_start_does_not_let_its_copy_come_back(
    state: Path, controlled: ControlledKeyring
) -> None:
    backend = controlled
    chosen = await hung_at_start(state, backend)
    await chosen.delete("up")
    await hung_call_lands(backend)
    assert in_keyring(backend) == login_record(1)  # nobody could delete it
    assert await (await open_store(state, "auto")).load("up") is None


async def test_keyring_without_fallback_refuses_rather_than_writing_the_file(
    state: Path, controlled: ControlledKeyring
) -> None:
    backend = controlled
    chosen = await open_store(state, "keyring")
    backend.failing = True
    with pytest.raises(StoreError) as raised:
        await chosen.save("up", login_record(1))
    assert str(raised.value) == "the OS keyring failed: RuntimeError"
    assert not (state / "oauth-tokens.json").exists()


async def test_a_file_the_store_could_not_write_is_a_store_error_without_secrets(
    state: Path, controlled: ControlledKeyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keyring and disk both refuse: the credential is told (a StoreError it logs), not handed an OSError."""
    backend = controlled
    chosen = await open_store(state, "auto")
    backend.failing = True

    def refuse(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", refuse)
    with pytest.raises(StoreError, match="No space left on device") as raised:
        await chosen.save("up", login_record(1))
    assert CANARY not in str(raised.value)


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
                "OAuth tokens are kept in a private file, not the OS keyring: the OS keyring did not answer within 3 s"
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
