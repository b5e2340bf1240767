"""Signed records: valid ones pass, every kind of bad one is rejected with its reason."""

import pytest
from hypothesis import given, settings, strategies as st

from protocol import canonical
from protocol.errors import Invalid
from protocol.identity import SigningKey, peer_id_from_public_key, public_key_from_peer_id, verify
from protocol.records import RecordKind, sign_record, validate_record

KEY = SigningKey(bytes(range(32)))
OTHER = SigningKey(bytes(range(1, 33)))
NOW = 1_700_000_000_000


def parse_body(body):
    if not isinstance(body, dict) or set(body) != {"n"} or type(body["n"]) is not int:
        raise Invalid("malformed", "body")
    return body["n"]


KINDS = {"ping": RecordKind("ping", frozenset({1}), parse_body, max_size=1024)}


def check(data, **overrides):
    args = dict(swarm="s1", kinds=KINDS, now_ms=NOW)
    args.update(overrides)
    return validate_record(data, **args)


def reason(data, **overrides):
    with pytest.raises(Invalid) as err:
        check(data, **overrides)
    return err.value.reason


def test_valid_record_round_trip():
    raw = sign_record(KEY, "ping", 1, "s1", {"n": 7}, NOW)
    record = check(raw)
    assert (record.kind, record.version, record.author, record.body) == ("ping", 1, KEY.peer_id, 7)
    assert record.id.startswith("b3:")


def test_peer_id_matches_libp2p_form():
    assert KEY.peer_id.startswith("12D3KooW")
    assert public_key_from_peer_id(KEY.peer_id) == KEY.public_key
    assert peer_id_from_public_key(KEY.public_key) == KEY.peer_id
    assert verify(KEY.peer_id, b"m", KEY.sign(b"m")) and not verify(OTHER.peer_id, b"m", KEY.sign(b"m"))


def test_each_rejection_reason():
    assert reason(b"\xc1garbage") == "malformed"
    assert reason(canonical.encode([1, 2, 3])) == "malformed"
    assert reason(sign_record(KEY, "pong", 1, "s1", {"n": 1}, NOW)) == "unknown_kind"
    assert reason(sign_record(KEY, "ping", 2, "s1", {"n": 1}, NOW)) == "unknown_version"
    assert reason(sign_record(KEY, "ping", 1, "other", {"n": 1}, NOW)) == "wrong_swarm"
    assert reason(sign_record(KEY, "ping", 1, "s1", {"n": "x"}, NOW)) == "bad_body:malformed"
    assert reason(sign_record(KEY, "ping", 1, "s1", {"n": 1}, NOW - 3_600_000)) == "clock_skew"
    assert reason(sign_record(KEY, "ping", 1, "s1", {"n": 1}, NOW), members=frozenset({OTHER.peer_id})) == "not_member"
    assert reason(sign_record(KEY, "ping", 1, "s1", {"n": 1, "pad": "x" * 2000}, NOW)) == "oversized"
    kind, version, swarm, author, created, body, sig = canonical.decode(sign_record(KEY, "ping", 1, "s1", {"n": 1}, NOW))
    forged = canonical.encode([kind, version, swarm, OTHER.peer_id, created, body, sig])
    assert reason(forged) == "bad_signature"
    altered = canonical.encode([kind, version, swarm, author, created, {"n": 2}, sig])
    assert reason(altered) == "bad_signature"


@settings(max_examples=150)
@given(st.data())
def test_any_mutation_is_rejected(data):
    raw = bytearray(sign_record(KEY, "ping", 1, "s1", {"n": 12345}, NOW))
    position = data.draw(st.integers(0, len(raw) - 1))
    flip = data.draw(st.integers(1, 255))
    raw[position] ^= flip
    with pytest.raises(Invalid):
        check(bytes(raw))


def test_a_long_string_in_a_body_is_oversized_not_malformed():
    big = sign_record(KEY, "ping", 1, "s1", {"n": 1, "pad": "x" * 70_000}, NOW)
    assert reason(big) == "oversized"
