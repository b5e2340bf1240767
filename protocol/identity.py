"""Peer identities: ed25519 keys and the libp2p peer ids derived from them."""

from __future__ import annotations

import functools

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.errors import Invalid

# libp2p PublicKey protobuf for ed25519 (field 1 = KeyType.Ed25519, field 2 = 32 bytes),
# wrapped in an identity multihash: this is how libp2p spells an ed25519 peer id.
_PROTOBUF_PREFIX = bytes([0x08, 0x01, 0x12, 0x20])
_IDENTITY_MULTIHASH_PREFIX = bytes([0x00, 0x24])
PEER_ID_PREFIX = _IDENTITY_MULTIHASH_PREFIX + _PROTOBUF_PREFIX
_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58_ALPHABET)}


def b58encode(data: bytes) -> str:
    number = int.from_bytes(data, "big")
    out = []
    while number:
        number, rem = divmod(number, 58)
        out.append(_B58_ALPHABET[rem])
    leading = len(data) - len(data.lstrip(b"\0"))
    return "1" * leading + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    number = 0
    for char in text:
        digit = _B58_INDEX.get(char)
        if digit is None:
            raise Invalid("bad_peer_id", f"not base58: {char!r}")
        number = number * 58 + digit
    leading = len(text) - len(text.lstrip("1"))
    body = number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b""
    return b"\0" * leading + body


def peer_id_from_public_key(public_key: bytes) -> str:
    """The libp2p peer id string (``12D3KooW…``) of a raw 32-byte ed25519 public key."""
    if len(public_key) != 32:
        raise Invalid("bad_peer_id", "ed25519 public keys are 32 bytes")
    return b58encode(PEER_ID_PREFIX + public_key)


def public_key_from_peer_id(peer_id: str) -> bytes:
    """The ed25519 public key inside an ed25519 peer id; Invalid for any other kind of id."""
    if not isinstance(peer_id, str) or not 40 <= len(peer_id) <= 60:
        raise Invalid("bad_peer_id", "peer id has the wrong length")
    raw = b58decode(peer_id)
    if len(raw) != len(PEER_ID_PREFIX) + 32 or not raw.startswith(PEER_ID_PREFIX):
        raise Invalid("bad_peer_id", "not an ed25519 libp2p peer id")
    return raw[len(PEER_ID_PREFIX):]


@functools.lru_cache(maxsize=4096)
def _public_key(peer_id: str) -> Ed25519PublicKey:
    """The key behind ``peer_id``, decoded once: a swarm's records come from the same peers
    many times a second, and decoding the id was a large part of checking a record."""
    return Ed25519PublicKey.from_public_bytes(public_key_from_peer_id(peer_id))


def verify(peer_id: str, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` over ``message`` was made by the key behind ``peer_id``."""
    if not isinstance(peer_id, str):
        return False
    try:
        _public_key(peer_id).verify(signature, message)
    except (Invalid, InvalidSignature, ValueError):
        return False
    return True


class SigningKey:
    """An ed25519 private key held as its 32-byte seed, the form persisted on disk."""

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise ValueError("an ed25519 seed is 32 bytes")
        self.seed = bytes(seed)
        self._key = Ed25519PrivateKey.from_private_bytes(self.seed)
        self.public_key = self._key.public_key().public_bytes_raw()
        self.peer_id = peer_id_from_public_key(self.public_key)

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate().private_bytes_raw())

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)
