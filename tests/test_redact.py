"""The secret registry: what is scrubbed, and that rotating credentials do not make it grow."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mcpx import redact


@pytest.fixture(autouse=True)
def fresh_registry() -> Iterator[None]:
    secrets, fixed, slots = redact._secrets.copy(), redact._fixed.copy(), redact._slots.copy()
    redact._secrets.clear()
    redact._fixed.clear()
    redact._slots.clear()
    yield
    redact._secrets.clear()
    redact._secrets.update(secrets)
    redact._fixed.clear()
    redact._fixed.update(fixed)
    redact._slots.clear()
    redact._slots.update(slots)


def test_a_rotating_credential_keeps_its_current_and_previous_value_only() -> None:
    for index in range(100):
        redact.register_secret(f"access-token-{index:03d}", slot="jira:access")
    assert set(redact._secrets) == {"access-token-099", "access-token-098"}
    text = redact.redact("old access-token-098 new access-token-099 gone access-token-097")
    assert "access-token-098" not in text and "access-token-099" not in text
    assert "access-token-097" in text  # no longer a credential of ours


def test_fixed_secrets_stay_and_a_value_shared_with_a_slot_outlives_the_slot() -> None:
    redact.register_secret("config-secret-1", slot=None)
    redact.register_secret("config-secret-1", slot="up:access")
    redact.register_secret("token-two-22", slot="up:access")
    redact.register_secret("token-three-3", slot="up:access")
    assert set(redact._secrets) == {"config-secret-1", "token-two-22", "token-three-3"}
    scrubbed = redact.scrub(b'{"a":"config-secret-1 token-three-3"}')
    assert scrubbed == b'{"a":"<secret %b> <secret %b>"}' % (
        redact.fingerprint("config-secret-1").encode(),
        redact.fingerprint("token-three-3").encode(),
    )


def test_short_values_are_not_secrets() -> None:
    redact.register_secret("12345")
    assert not redact.any_registered()
