"""Static credential providers: none, bearer token from an env var or a file, and a fixed header.

A provider turns an upstream's `auth` config into request headers. Every secret it reads is registered with
the redactor. `reload()` is called after the upstream answers 401: it re-reads the source and says whether
the credential changed, so one retry is worth making.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from mcpx.auth.oauth.credential import OAuthContext, OAuthCredential
from mcpx.auth.oauth.metadata import Challenge
from mcpx.config.model import (
    AuthConfig,
    BearerEnvAuth,
    BearerFileAuth,
    NoAuth,
    OAuthAuth,
    OAuthClientCredentialsAuth,
    StaticHeaderAuth,
    UpstreamConfig,
)
from mcpx.errors import CredentialRejected, McpxError
from mcpx.redact import fingerprint, register_secret

_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# A token file larger than this is refused: its token would not fit in a request's headers (upstream/h1.py allows
# 64 KiB of them), and reading it must stay cheap.
MAX_TOKEN_FILE_BYTES: Final = 64 * 1024
# What a token file that is not a regular file is, for the error.
_FILE_KINDS: Final = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


class CredentialProvider(Protocol):
    async def prepare(self) -> None:
        """Called before each (re)connection: load or obtain what `headers()` needs."""
        ...

    def headers(self) -> dict[str, str]:
        """Headers to add to every request. Raises `CredentialRejected` when the credential cannot be read, or
        `NeedsLogin` when the user must log in first."""
        ...

    async def renew(self, rejected: Mapping[str, str], challenge: Challenge) -> bool:
        """After a 401 for the `rejected` headers: True if a retry with `headers()` is worth making."""
        ...

    def insufficient_scope(self, challenge: Challenge) -> McpxError | None:
        """After a 403 `insufficient_scope`: the error that tells the user how to get the scopes, if any."""
        ...

    def fix_hint(self) -> str:
        """What the user should fix when the upstream rejects this credential."""
        ...

    def describe(self) -> str:
        """A secret-free description for `mcpxctl status` (kind and fingerprint)."""
        ...


def expand_env(
    template: str, *, upstream: str, what: str, environ: Mapping[str, str] | None = None, secret: bool = False
) -> str:
    """Expand `${VAR}` references from `environ` (default: mcpxd's environment). Raises `CredentialRejected` naming
    the variable when one is unset. `secret`: the result is a secret, and so is each variable's value on its own
    (`Bearer ${API_KEY}`: an upstream may echo the key alone); all are registered for redaction."""
    environ = os.environ if environ is None else environ

    def substitute(match: re.Match[str]) -> str:
        value = environ.get(match.group(1))
        if value is None:
            raise CredentialRejected(upstream, f"environment variable {match.group(1)} (used in {what}) is not set")
        if secret:
            register_secret(value)
        return value

    expanded = _ENV_REFERENCE.sub(substitute, template)
    if secret:
        register_secret(expanded)
    return expanded


class StaticCredential:
    """Static credentials have nothing to prepare; after a rejection they re-read their source."""

    async def prepare(self) -> None:
        return None

    async def renew(self, rejected: Mapping[str, str], challenge: Challenge) -> bool:
        return self.reload()

    def insufficient_scope(self, challenge: Challenge) -> McpxError | None:
        return None  # a static credential cannot ask for more scopes: the 403 is reported as it is

    def reload(self) -> bool:
        """Re-read the credential after a rejection; True if it differs from the one last sent."""
        return False

    def headers(self) -> dict[str, str]:
        raise NotImplementedError

    def fix_hint(self) -> str:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class NoCredential(StaticCredential):
    def headers(self) -> dict[str, str]:
        return {}

    def fix_hint(self) -> str:
        return "the upstream requires authentication but none is configured: set `auth` for it in the config"

    def describe(self) -> str:
        return "none"


class _SecretSource(StaticCredential):
    """What the providers below share: send the current value, and after a rejection say whether re-reading it
    gives a different one. Subclasses read the value (`_read`) and shape the header (`_header`)."""

    def __init__(self, upstream: str) -> None:
        self._upstream = upstream
        self._sent: str | None = None

    def _read(self, *, force: bool) -> str:
        raise NotImplementedError

    def _header(self, value: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {value}"}

    def headers(self) -> dict[str, str]:
        value = self._read(force=False)
        self._sent = value
        return self._header(value)

    def reload(self) -> bool:
        try:
            return self._read(force=True) != self._sent
        except CredentialRejected:
            return False

    def _fingerprint(self, unreadable: str) -> str:
        try:
            return fingerprint(self._read(force=False))
        except CredentialRejected:
            return unreadable


class BearerFromEnv(_SecretSource):
    def __init__(self, upstream: str, variable: str) -> None:
        super().__init__(upstream)
        self._variable = variable

    def _read(self, *, force: bool) -> str:
        value = os.environ.get(self._variable, "").strip()
        if not value:
            raise CredentialRejected(self._upstream, f"environment variable {self._variable} is not set or empty")
        register_secret(value)
        return value

    def fix_hint(self) -> str:
        return f"put a valid token in the environment variable {self._variable} of mcpxd and restart it"

    def describe(self) -> str:
        return f"bearer_env {self._variable} ({self._fingerprint('unset')})"


@dataclass(frozen=True, slots=True)
class _FileStamp:
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, info: os.stat_result) -> _FileStamp:
        return cls(info.st_ino, info.st_size, info.st_mtime_ns)


class BearerFromFile(_SecretSource):
    """Token from the first non-empty line of a file, re-read whenever the file's inode, size or mtime change.

    Only a regular file (or a symlink to one) of at most `MAX_TOKEN_FILE_BYTES` is read: it is read on the event
    loop, where a FIFO or a device could block the daemon or feed it without end."""

    def __init__(self, upstream: str, path: Path) -> None:
        super().__init__(upstream)
        self._path = path
        self._stamp: _FileStamp | None = None
        self._token: str | None = None

    def _read(self, *, force: bool) -> str:
        try:
            info = os.stat(self._path)
        except OSError as exc:
            raise self._unreadable(exc) from None
        if force or _FileStamp.of(info) != self._stamp or self._token is None:
            self._check_regular(info)  # before opening: opening some devices does something
            self._token, self._stamp = self._read_file()
        return self._token

    def _read_file(self) -> tuple[str, _FileStamp]:
        """The token and the stamp of the file it was read from (which may have replaced the one stat saw)."""
        try:
            # O_NONBLOCK: opening a FIFO without a writer would otherwise wait for one.
            fd = os.open(self._path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as exc:
            raise self._unreadable(exc) from None
        try:
            info = os.fstat(fd)
            self._check_regular(info)
            data = self._read_bounded(fd, info)
        except OSError as exc:
            raise self._unreadable(exc) from None
        finally:
            os.close(fd)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise CredentialRejected(self._upstream, f"token file {self._path} is not UTF-8 text") from None
        for line in text.splitlines():
            if line.strip():
                token = line.strip()
                register_secret(token, slot=f"file:{self._path}")  # the file is re-read when it changes
                return token, _FileStamp.of(info)
        raise CredentialRejected(self._upstream, f"token file {self._path} is empty")

    def _read_bounded(self, fd: int, info: os.stat_result) -> bytes:
        # stat's size is checked first; the reads are bounded too, as the file may grow meanwhile.
        data = b""
        if info.st_size <= MAX_TOKEN_FILE_BYTES:
            while chunk := os.read(fd, MAX_TOKEN_FILE_BYTES + 1 - len(data)):
                data += chunk
                if len(data) > MAX_TOKEN_FILE_BYTES:
                    break
            else:
                return data
        raise CredentialRejected(
            self._upstream, f"token file {self._path} is larger than {MAX_TOKEN_FILE_BYTES} bytes: it must hold a token"
        )

    def _check_regular(self, info: os.stat_result) -> None:
        if not stat.S_ISREG(info.st_mode):
            kind = _FILE_KINDS.get(stat.S_IFMT(info.st_mode), "not a regular file")
            raise CredentialRejected(
                self._upstream, f"token file {self._path} is {kind}: it must be a regular file (or a symlink to one)"
            )

    def _unreadable(self, exc: OSError) -> CredentialRejected:
        return CredentialRejected(self._upstream, f"cannot read token file {self._path}: {exc.strerror}")

    def fix_hint(self) -> str:
        return f"write a valid token to {self._path} (mcpx re-reads it on the next call)"

    def describe(self) -> str:
        return f"bearer_file {self._path} ({self._fingerprint('unreadable')})"


class StaticHeader(_SecretSource):
    def __init__(self, upstream: str, header: str, template: str) -> None:
        super().__init__(upstream)
        self._name = header
        self._template = template

    def _read(self, *, force: bool) -> str:
        return expand_env(self._template, upstream=self._upstream, what=f"the {self._name} header", secret=True)

    def _header(self, value: str) -> dict[str, str]:
        return {self._name: value}

    def fix_hint(self) -> str:
        names = _ENV_REFERENCE.findall(self._template)
        if names:
            return f"put a valid value in {', '.join(names)} (used in the {self._name} header) and restart mcpxd"
        return f"fix the value of the {self._name} header in the config and run `mcpxctl reload`"

    def describe(self) -> str:
        return f"static_header {self._name} ({self._fingerprint('unset')})"


def credentials_for(upstream: UpstreamConfig, oauth: OAuthContext) -> CredentialProvider:
    """The provider of an upstream's `auth`: OAuth ones share the daemon's OAuth context."""
    auth = upstream.auth
    if isinstance(auth, OAuthAuth | OAuthClientCredentialsAuth):
        return OAuthCredential(upstream, auth, oauth)
    return provider_for(upstream.name, auth)


def provider_for(upstream: str, auth: AuthConfig) -> StaticCredential:
    """The provider of a static `auth` (none, bearer_env, bearer_file, static_header)."""
    match auth:
        case NoAuth():
            return NoCredential()
        case BearerEnvAuth(env=variable):
            return BearerFromEnv(upstream, variable)
        case BearerFileAuth(path=path):
            return BearerFromFile(upstream, path)
        case StaticHeaderAuth(header=header, value=value):
            return StaticHeader(upstream, header, value)
        case _:
            raise ValueError(f"{auth.type} credentials need the daemon's OAuth context: use credentials_for")
