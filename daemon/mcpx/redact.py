"""Secret registry and redaction: every secret value mcpx reads is registered here, and text leaving the daemon
(logs, errors, status) passes through `redact`, which replaces any registered value by its fingerprint.

This is the second line of defence: the first is never putting secrets into messages at all.
"""

from __future__ import annotations

import hashlib

# Secrets shorter than this are not scrubbed from text: replacing e.g. "1" everywhere would mangle output,
# and such values are not credentials worth the name.
_MIN_SECRET_LENGTH = 6

_secrets: dict[str, bytes] = {}  # secret → its UTF-8 encoding, for scrubbing serialized messages


def fingerprint(secret: str) -> str:
    """A short, stable, non-reversible label for a secret, safe to show to the user."""
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()[:8]


def register_secret(secret: str) -> None:
    """Remember `secret` so `redact` can scrub it from any text."""
    if len(secret) >= _MIN_SECRET_LENGTH and secret not in _secrets:
        _secrets[secret] = secret.encode()


def any_registered() -> bool:
    return bool(_secrets)


def scrub(data: bytes) -> bytes:
    """`data` (serialized JSON on its way to an agent) with every registered secret replaced by its fingerprint.

    An upstream that echoes our credential back in a result must not hand it to the agent.
    """
    for secret, encoded in _secrets.items():
        if encoded in data:
            data = data.replace(encoded, f"<secret {fingerprint(secret)}>".encode())
    return data


def redact(text: str) -> str:
    """`text` with every registered secret replaced by its fingerprint."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, f"<secret {fingerprint(secret)}>")
    return text
