"""Canonical msgpack: one byte form per value, with hard size limits on decode.

Canonical means: maps have string keys in sorted order, integers use their
smallest encoding, floats are always float64, text is UTF-8 ``str`` and
binary is ``bin``. A decoder re-encodes what it read and rejects any input
whose bytes differ, so equal values always have equal content ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from protocol.errors import Invalid

DEFAULT_MAX_SIZE = 64 * 1024
MAX_DEPTH = 16
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1


class CanonicalError(Invalid):
    """Input is not a canonical msgpack value within limits; ``reason`` says why."""


@dataclass(frozen=True)
class Limits:
    max_size: int = DEFAULT_MAX_SIZE
    max_str_len: int = 64 * 1024
    max_bin_len: int = 64 * 1024
    max_array_len: int = 100_000
    max_map_len: int = 1_000


def _normalise(value: Any, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise CanonicalError("too_deep", f"nesting deeper than {MAX_DEPTH}")
    if isinstance(value, int) and not isinstance(value, bool) and not _INT_MIN <= value <= _INT_MAX:
        raise CanonicalError("int_range", "integers must fit in 64 bits")
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (list, tuple)):
        return [_normalise(item, depth + 1) for item in value]
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise CanonicalError("bad_key", f"map key {key!r} is not a string")
        return {key: _normalise(value[key], depth + 1) for key in sorted(value)}
    raise CanonicalError("bad_type", f"cannot encode {type(value).__name__}")


def encode(value: Any) -> bytes:
    """Encode ``value`` canonically. Raises CanonicalError for values outside the model."""
    encoded: bytes = msgpack.packb(_normalise(value, 0), use_bin_type=True, use_single_float=False)
    return encoded


def decode(data: bytes | bytearray | memoryview, limits: Limits = Limits()) -> Any:
    """Decode canonical bytes; raise CanonicalError if oversized, malformed or non-canonical."""
    raw = bytes(data)
    if len(raw) > limits.max_size:
        raise CanonicalError("oversized", f"{len(raw)} bytes > limit {limits.max_size}")
    try:
        value = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_bin_len,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise CanonicalError("malformed", str(exc) or type(exc).__name__) from None
    except Exception as exc:  # msgpack raises a few undocumented types on garbage
        raise CanonicalError("malformed", type(exc).__name__) from None
    try:
        again = encode(value)
    except CanonicalError as exc:
        raise CanonicalError("malformed", exc.detail) from None
    if again != raw:
        raise CanonicalError("non_canonical", "bytes differ from the canonical form")
    return value
