"""Signature checks against peer ids, including the per-peer cache of decoded public keys."""

from __future__ import annotations

import pytest

from protocol.identity import SigningKey, verify


def test_verify_accepts_the_signer_only_and_the_cache_keeps_keys_apart() -> None:
    alice, bob = SigningKey.generate(), SigningKey.generate()
    message = b"a record body"
    signature = alice.sign(message)
    for _ in range(3):  # the second and later checks use alice's cached key
        assert verify(alice.peer_id, message, signature)
    assert not verify(alice.peer_id, b"another body", signature)
    assert not verify(bob.peer_id, message, signature)  # bob's key is not alice's
    assert verify(bob.peer_id, message, bob.sign(message))
    assert not verify(alice.peer_id, message, bob.sign(message))


@pytest.mark.parametrize("peer_id", [None, 7, ["12D3Koo"], b"12D3KooW", "", "12D3KooWnot-base58-at-all-0OIl" * 2, "x" * 52])
def test_verify_rejects_what_is_not_an_ed25519_peer_id(peer_id: object) -> None:
    key = SigningKey.generate()
    assert not verify(peer_id, b"m", key.sign(b"m"))  # type: ignore[arg-type]
