"""Secret registry and redaction: every secret value mcpx reads is registered here, and text leaving the daemon
(logs, errors, status) passes through `redact`, which replaces any registered value by its fingerprint.

This is the second line of defence: the first is never putting secrets into messages at all.
"""

from __future__ import annotations

import hashlib

# Secrets shorter than this are not scrubbed from text: replacing e.g. "1" everywhere would mangle output,
# and such values are not credentials worth the name.
_MIN_SECRET_LENGTH = 6

# What is scrubbed: secret → (its UTF-8 encoding, the bytes that replace it). Derived from the two below.
_secrets: dict[str, tuple[bytes, bytes]] = {}
_fixed: set[str] = set()  # values that stay secret for the daemon's life (config, environment)
_slots: dict[str, tuple[str, ...]] = {}  # a rotating credential → its current value and the one before


def fingerprint(secret: str) -> str:
    """A short, stable, non-reversible label for a secret, safe to show to the user."""
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()[:8]


def register_secret(secret: str, *, slot: str | None = None) -> None:
    """Remember `secret` so `redact` and `scrub` replace it everywhere.

    A `slot` names a credential that rotates (an OAuth access token, a re-read token file): it holds the new
    value and the previous one (a reply in flight may still echo it), so the registry, scanned for every message,
    does not grow with every refresh.
    """
    if len(secret) < _MIN_SECRET_LENGTH:
        return
    if slot is None:
        if secret in _fixed:
            return
        _fixed.add(secret)
    else:
        held = _slots.get(slot, ())
        if held[:1] == (secret,):
            return
        _slots[slot] = (secret, *held[:1])
    live = _fixed.union(*_slots.values())
    for gone in _secrets.keys() - live:
        del _secrets[gone]
    for value in live - _secrets.keys():
        _secrets[value] = (value.encode(), f"<secret {fingerprint(value)}>".encode())
    # Longest first: a secret that contains another (`Bearer <key>`, the key) is replaced whole.
    ordered = sorted(_secrets.items(), key=lambda item: len(item[0]), reverse=True)
    _secrets.clear()
    _secrets.update(ordered)


def any_registered() -> bool:
    return bool(_secrets)


def scrub(data: bytes) -> bytes:
    """`data` (serialized JSON on its way to an agent) with every registered secret replaced by its fingerprint.

    An upstream that echoes our credential back in a result must not hand it to the agent.
    """
    for encoded, replacement in _secrets.values():
        if encoded in data:
            data = data.replace(encoded, replacement)
    return data


def redact(text: str) -> str:
    """`text` with every registered secret replaced by its fingerprint."""
    for secret, (_, replacement) in _secrets.items():
        if secret in text:
            text = text.replace(secret, replacement.decode())
    return text
