"""Content ids: ``b3:`` followed by the hex BLAKE3 digest of the exact bytes."""

from __future__ import annotations

from typing import TypeGuard

import blake3

PREFIX = "b3:"
_HEX_LEN = 64
_HEX_DIGITS = frozenset("0123456789abcdef")


def content_id(data: bytes | bytearray | memoryview) -> str:
    """The content id of ``data``."""
    return PREFIX + blake3.blake3(data).hexdigest()


def content_hasher() -> blake3.blake3:
    """An incremental hasher: ``content_id_of(hasher)`` after feeding it every byte in order."""
    return blake3.blake3()


def content_id_of(hasher: blake3.blake3) -> str:
    """The content id of everything fed to ``hasher`` (from ``content_hasher``)."""
    return PREFIX + hasher.hexdigest()


def is_content_id(value: object) -> TypeGuard[str]:
    """Whether ``value`` is a well-formed content id string (lower-case hex)."""
    return (
        isinstance(value, str)
        and len(value) == len(PREFIX) + _HEX_LEN
        and value.startswith(PREFIX)
        and set(value[len(PREFIX):]) <= _HEX_DIGITS
    )


def matches(cid: str, data: bytes | bytearray | memoryview) -> bool:
    """Whether ``data`` hashes to ``cid``; the check every receiver makes before use."""
    return content_id(data) == cid


def digest_bytes(cid: str) -> bytes:
    """The raw 32-byte digest inside a content id (for rendezvous hashing and sorting)."""
    if not is_content_id(cid):
        raise ValueError(f"not a content id: {cid!r}")
    return bytes.fromhex(cid[len(PREFIX):])
