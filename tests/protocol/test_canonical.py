"""Canonical encoding: one byte form per value, and garbage is a typed error."""

import msgpack
import pytest
from hypothesis import given, strategies as st

from protocol import canonical
from protocol.cid import content_id, is_content_id, matches

scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=20) | st.binary(max_size=20) | st.floats(allow_nan=False)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30,
)


@given(values)
def test_round_trip_is_identity_and_stable(value):
    data = canonical.encode(value)
    decoded = canonical.decode(data)
    assert canonical.encode(decoded) == data


@given(st.dictionaries(st.text(max_size=8), st.integers(-(2**63), 2**64 - 1), min_size=2, max_size=8))
def test_map_order_does_not_change_bytes(mapping):
    reversed_mapping = dict(reversed(list(mapping.items())))
    assert canonical.encode(mapping) == canonical.encode(reversed_mapping)
    assert content_id(canonical.encode(mapping)) == content_id(canonical.encode(reversed_mapping))


def test_non_canonical_bytes_are_rejected():
    unsorted = msgpack.packb({"b": 1, "a": 2})
    with pytest.raises(canonical.CanonicalError) as err:
        canonical.decode(unsorted)
    assert err.value.reason == "non_canonical"
    wide_int = b"\xd1\x00\x01"  # int16 holding 1, which has a one-byte form
    with pytest.raises(canonical.CanonicalError) as err:
        canonical.decode(wide_int)
    assert err.value.reason == "non_canonical"


@given(st.binary(max_size=200))
def test_garbage_never_raises_anything_but_canonical_error(data):
    try:
        canonical.decode(data)
    except canonical.CanonicalError as exc:
        assert exc.reason in {"malformed", "non_canonical", "oversized"}


def test_limits():
    with pytest.raises(canonical.CanonicalError) as err:
        canonical.decode(canonical.encode(b"x" * 100), canonical.Limits(max_size=50))
    assert err.value.reason == "oversized"
    with pytest.raises(canonical.CanonicalError):
        canonical.encode({1: "int key"})
    with pytest.raises(canonical.CanonicalError):
        canonical.encode(object())


def test_content_ids():
    cid = content_id(b"hello")
    assert is_content_id(cid) and cid.startswith("b3:") and len(cid) == 67
    assert matches(cid, b"hello") and not matches(cid, b"hellO")
    assert not is_content_id("b3:" + "G" * 64) and not is_content_id(cid.upper())


def test_integers_outside_64_bits_are_a_typed_error():
    with pytest.raises(canonical.CanonicalError) as err:
        canonical.encode({"n": 2**64})
    assert err.value.reason == "int_range"
