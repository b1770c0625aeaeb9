"""The identity provider's tokens at rest (proxy/sealing.py): sealed with the newest session secret's
key, opened by any configured one, and only in the session they were sealed for."""

from __future__ import annotations

import pytest

from proxy.sealing import SealError, TokenSealer

OLD = "old-session-secret-8c1f3a5e7d9b2c4e6f8a0b1c3d5e7f9a"
NEW = "new-session-secret-1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d"


def test_a_sealed_value_opens_only_in_its_own_session() -> None:
    sealer = TokenSealer([NEW])
    sealed = sealer.seal(b'{"rt": "refresh-me"}', bound_to="session-a")

    assert b"refresh-me" not in sealed.encode()
    assert sealer.open(sealed, bound_to="session-a") == b'{"rt": "refresh-me"}'
    with pytest.raises(SealError):
        sealer.open(sealed, bound_to="session-b")


def test_rotation_opens_old_values_seals_with_the_newest_and_drops_retired_keys() -> None:
    before = TokenSealer([OLD]).seal(b"tokens", bound_to="k")
    during = TokenSealer([NEW, OLD])
    after = TokenSealer([NEW])

    assert during.open(before, bound_to="k") == b"tokens"
    assert after.open(during.seal(b"tokens", bound_to="k"), bound_to="k") == b"tokens"
    with pytest.raises(SealError):
        after.open(before, bound_to="k")


@pytest.mark.parametrize("value", ["", "v1", "v1.abcd.", "v2.abcd.AAAA", "v1.{kid}.AAAA", "v1.{kid}.%%%"])
def test_a_damaged_value_never_opens(value: str) -> None:
    sealer = TokenSealer([NEW])
    kid = sealer.seal(b"x", bound_to="k").split(".")[1]

    with pytest.raises(SealError):
        sealer.open(value.format(kid=kid), bound_to="k")


def test_an_altered_value_never_opens() -> None:
    sealer = TokenSealer([NEW])
    sealed = sealer.seal(b"tokens", bound_to="k")
    altered = sealed[:-2] + ("A" if sealed[-2] != "A" else "B") + sealed[-1]

    with pytest.raises(SealError):
        sealer.open(altered, bound_to="k")
