"""Validators for record body fields as they arrive on the wire, shared by every body parser.

Each one returns the typed value or raises Invalid("malformed", ...) naming the field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

from protocol.cid import is_content_id
from protocol.errors import Invalid
from protocol.identity import public_key_from_peer_id

MAX_UINT = 2**63 - 1
_LABEL = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")


def record_map(value: Any, keys: Iterable[str], what: str) -> dict[str, Any]:
    """``value`` as a map with exactly ``keys``."""
    expected = frozenset(keys)
    if not isinstance(value, dict):
        raise Invalid("malformed", f"{what} is not a map")
    if set(value) != expected:
        extra = sorted(repr(key) for key in set(value) - expected)[:3]
        missing = sorted(expected - set(value))[:3]
        raise Invalid("malformed", f"{what} keys: extra {extra}, missing {missing}")
    return value


def sorted_keys(value: Any, name: str, max_len: int) -> list[str]:
    """The keys of a small map with string keys, sorted (for maps whose keys are data)."""
    if not isinstance(value, dict) or len(value) > max_len or not all(isinstance(k, str) for k in value):
        raise Invalid("malformed", f"{name} must be a map of at most {max_len} string keys")
    return sorted(value)


def uint(value: Any, name: str, maximum: int = MAX_UINT) -> int:
    """A non-negative int (never a bool) no larger than ``maximum``."""
    if type(value) is not int or not 0 <= value <= maximum:
        raise Invalid("malformed", f"{name} must be an int in [0, {maximum}]")
    return value


def cid(value: Any, name: str) -> str:
    if not is_content_id(value):
        raise Invalid("malformed", f"{name} is not a content id")
    assert isinstance(value, str)
    return value


def optional_cid(value: Any, name: str) -> str | None:
    return None if value is None else cid(value, name)


def peer(value: Any, name: str) -> str:
    """An ed25519 libp2p peer id."""
    try:
        public_key_from_peer_id(value)
    except Invalid:
        raise Invalid("malformed", f"{name} is not an ed25519 peer id") from None
    assert isinstance(value, str)
    return value


def sorted_cids(value: Any, name: str, max_len: int, *, allow_empty: bool = True) -> tuple[str, ...]:
    """A list of content ids in strictly increasing order (so sorted and unique): one wire form per set."""
    if not isinstance(value, list):
        raise Invalid("malformed", f"{name} is not a list")
    if len(value) > max_len:
        raise Invalid("too_many", f"{name}: {len(value)} > {max_len}")
    if not value and not allow_empty:
        raise Invalid("malformed", f"{name} is empty")
    for index, item in enumerate(value):
        cid(item, name)
        if index and value[index - 1] >= item:
            raise Invalid("malformed", f"{name} is not sorted and unique")
    return tuple(value)


def label(value: Any, name: str) -> str:
    """A short lower-case token such as a codec, rule or reason name."""
    if not isinstance(value, str) or not _LABEL.fullmatch(value):
        raise Invalid("malformed", f"{name} is not a short lower-case label")
    return value


def text(value: Any, name: str, max_len: int) -> str:
    if not isinstance(value, str) or len(value) > max_len:
        raise Invalid("malformed", f"{name} is not a string of at most {max_len} characters")
    return value


def finite_float(value: Any, name: str) -> float:
    if type(value) is not float or not math.isfinite(value):
        raise Invalid("malformed", f"{name} must be a finite float")
    return value


def encode_real(value: float) -> str:
    """A real as its shortest round-trip decimal (Python ``repr``): one string per float64 value.

    Records whose bytes must match across peers (heads, patches) carry reals
    this way rather than as msgpack floats so that ``0.7`` reads as ``"0.7"``
    in every dump and a hand-written config value never drifts in the last bit.
    """
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"not a finite real: {value!r}")
    return repr(number + 0.0)  # + 0.0 folds -0.0 into 0.0


def decode_real(value: Any, name: str) -> float:
    """The float behind a canonical real string; rejects any other spelling of the same number."""
    if not isinstance(value, str) or len(value) > 32:
        raise Invalid("malformed", f"{name} is not a real string")
    try:
        number = float(value)
    except ValueError:
        raise Invalid("malformed", f"{name} is not a real string") from None
    if not math.isfinite(number) or encode_real(number) != value:
        raise Invalid("malformed", f"{name} is not a canonical real string")
    return number
