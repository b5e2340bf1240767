"""Operator records, the kind registry and who may author each kind, end to end through signing."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import canonical, kinds
from protocol.cid import content_id
from protocol.control import (
    SETTINGS,
    PatchRecord,
    RollbackRecord,
    Temperature,
    check_warm_round,
    earliest_warm_round,
    is_operator,
    latest_rollback,
    settings_at,
)
from protocol.errors import Invalid
from protocol.heads import AggregationRule, genesis_head
from protocol.identity import SigningKey
from protocol.leases import LeaseClaim
from protocol.records import RecordKind, sign_record, validate_record
from protocol.updates import InnerMetrics, UpdateRecord

OPERATOR = SigningKey(b"\x31" * 32)
PEER = SigningKey(b"\x32" * 32)
OTHER = SigningKey(b"\x33" * 32)
NOW = 1_700_000_000_000
SWARM = "test-swarm"

setting_values = {
    "inner_lr": st.floats(1e-6, 1.0),
    "inner_steps": st.integers(1, 1_000_000),
    "outer_lr": st.floats(1e-3, 10.0),
    "outer_momentum": st.floats(0.0, 0.99),
    "codec": st.sampled_from(["fp32", "bf16", "int8"]),
    "round_deadline_s": st.integers(1, 86_400),
}
patches = st.builds(
    PatchRecord.create,
    st.dictionaries(st.sampled_from(sorted(SETTINGS)), st.none(), min_size=1).flatmap(
        lambda keys: st.fixed_dictionaries({k: setting_values[k] for k in keys})
    ),
    st.integers(0, 100),
    st.integers(0, 2**40),
)


def test_every_setting_is_classified() -> None:
    assert set(SETTINGS) == set(setting_values)
    assert {spec.temperature for spec in SETTINGS.values()} <= set(Temperature)
    assert SETTINGS["inner_lr"].temperature is Temperature.HOT
    assert SETTINGS["outer_lr"].temperature is Temperature.WARM


@given(st.binary(max_size=8).map(content_id), st.text(max_size=50), st.integers(0, 2**50))
def test_rollback_survives_the_wire(target: str, reason: str, issued: int) -> None:
    rollback = RollbackRecord(target, reason, issued)
    assert RollbackRecord.from_wire(canonical.decode(canonical.encode(rollback.to_wire()))) == rollback


@given(patches)
def test_patch_survives_the_wire(patch: PatchRecord) -> None:
    assert PatchRecord.from_wire(canonical.decode(canonical.encode(patch.to_wire()))) == patch


def test_patch_reals_are_canonical_strings_and_ints_are_ints() -> None:
    wire = PatchRecord.create({"outer_lr": 1, "inner_steps": 500}, 3, NOW).to_wire()
    assert wire["settings"] == {"outer_lr": "1.0", "inner_steps": 500}


@pytest.mark.parametrize(
    "settings_wire",
    [
        {},
        {"learning_rate": "0.1"},
        {"inner_lr": 0.1},
        {"inner_lr": "0.10"},
        {"inner_lr": "2.0"},
        {"inner_lr": "-0.1"},
        {"inner_steps": 0},
        {"inner_steps": "10"},
        {"outer_momentum": "1.0"},
        {"codec": "FP 32"},
        {"round_deadline_s": 86_401},
        {"round_deadline_s": True},
    ],
)
def test_bad_patches_are_invalid(settings_wire: dict[str, Any]) -> None:
    with pytest.raises(Invalid):
        PatchRecord.from_wire({"settings": settings_wire, "effective_round": 1, "issued_ms": NOW})


def test_bad_rollbacks_are_invalid() -> None:
    good = RollbackRecord(content_id(b"h"), "why", 5).to_wire()
    bads = [
        {**good, "target": "h"}, {**good, "reason": "x" * 501}, {**good, "issued_ms": -1}, {"target": "h"},
    ]
    for bad in bads:
        with pytest.raises(Invalid):
            RollbackRecord.from_wire(bad)


@settings(max_examples=40)
@given(st.lists(patches, max_size=6), st.randoms(use_true_random=False), st.integers(0, 100))
def test_settings_at_does_not_depend_on_arrival_order(
    ps: list[PatchRecord], rnd: random.Random, round: int
) -> None:
    base = {"inner_lr": 0.001, "inner_steps": 100}
    assert settings_at(base, ps, round) == settings_at(base, rnd.sample(ps, len(ps)), round)


def test_settings_at_applies_due_patches_in_round_order() -> None:
    early = PatchRecord.create({"inner_steps": 200}, 2, NOW + 5)
    late = PatchRecord.create({"inner_steps": 300, "outer_lr": 0.5}, 5, NOW)
    base = {"inner_steps": 100}
    assert settings_at(base, [late, early], 1) == {"inner_steps": 100}
    assert settings_at(base, [late, early], 3) == {"inner_steps": 200}
    assert settings_at(base, [late, early], 5) == {"inner_steps": 300, "outer_lr": 0.5}


def test_latest_rollback_wins_and_ties_break_by_id() -> None:
    a = RollbackRecord(content_id(b"a"), "", 10)
    b = RollbackRecord(content_id(b"b"), "", 10)
    c = RollbackRecord(content_id(b"c"), "", 9)
    assert latest_rollback([a, b, c]) == latest_rollback([c, b, a]) == max(a, b, key=lambda r: r.id)
    assert latest_rollback([]) is None


def test_is_operator() -> None:
    assert is_operator(OPERATOR.peer_id, {OPERATOR.peer_id})
    assert not is_operator(PEER.peer_id, {OPERATOR.peer_id})


def signed(key: SigningKey, kind: str, body: dict[str, Any]) -> bytes:
    return sign_record(key, kind, 1, SWARM, body, NOW)


def validate(data: bytes) -> Any:
    record = validate_record(data, swarm=SWARM, kinds=kinds.record_kinds(), now_ms=NOW)
    kinds.check_author(record, {OPERATOR.peer_id})
    return record


def lease_body(peer: str) -> dict[str, Any]:
    return LeaseClaim.create(peer, 0, 1, [content_id(b"s")], NOW, NOW + 60_000).to_wire()


def update_body(peer: str) -> dict[str, Any]:
    return UpdateRecord(
        round=1, base=content_id(b"g"), artifact=content_id(b"a"), codec="bf16", samples=1, tokens=1,
        microshards=(content_id(b"s"),), epoch=0, metrics=InnerMetrics(0.5, 1, 1), peer=peer,
    ).to_wire()


def test_every_builtin_kind_validates_end_to_end() -> None:
    genesis = genesis_head(content_id(b"w"), content_id(b"wl"), content_id(b"ds"), AggregationRule.of("mean"))
    cases = [
        (PEER, kinds.LEASE, lease_body(PEER.peer_id), LeaseClaim),
        (PEER, kinds.UPDATE, update_body(PEER.peer_id), UpdateRecord),
        (OTHER, kinds.HEAD, genesis.to_wire(), type(genesis)),
        (OPERATOR, kinds.ROLLBACK, RollbackRecord(genesis.id, "test", NOW).to_wire(), RollbackRecord),
        (OPERATOR, kinds.PATCH, PatchRecord.create({"inner_lr": 0.01}, 2, NOW).to_wire(), PatchRecord),
    ]
    for key, kind, body, body_type in cases:
        record = validate(signed(key, kind, body))
        assert isinstance(record.body, body_type)
    assert validate(signed(OTHER, kinds.HEAD, genesis.to_wire())).body.id == genesis.id


def test_authors_may_only_speak_for_themselves_and_operators_for_the_swarm() -> None:
    with pytest.raises(Invalid, match="author_mismatch"):
        validate(signed(OTHER, kinds.LEASE, lease_body(PEER.peer_id)))
    with pytest.raises(Invalid, match="author_mismatch"):
        validate(signed(OTHER, kinds.UPDATE, update_body(PEER.peer_id)))
    with pytest.raises(Invalid, match="not_operator"):
        validate(signed(PEER, kinds.ROLLBACK, RollbackRecord(content_id(b"h"), "", NOW).to_wire()))
    with pytest.raises(Invalid, match="bad_body"):
        validate(signed(PEER, kinds.LEASE, {**lease_body(PEER.peer_id), "epoch": -1}))


def test_extra_kinds_join_the_registry_once() -> None:
    heartbeat = RecordKind("heartbeat", frozenset({1}), lambda body: body)
    registry = kinds.record_kinds([heartbeat])
    assert set(registry) == {"heartbeat", "lease", "update", "head", "rollback", "patch"}
    with pytest.raises(ValueError):
        kinds.record_kinds([RecordKind("lease", frozenset({1}), lambda body: body)])


wire_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | st.binary(max_size=8)
    | st.sampled_from([content_id(b"x"), PEER.peer_id, "0.5"]),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=12) | st.integers(), inner, max_size=5),
    max_leaves=20,
)


@settings(max_examples=150)
@given(st.sampled_from(kinds.BUILTIN_KINDS), wire_values)
def test_body_parsers_answer_garbage_with_invalid_only(kind: RecordKind, value: Any) -> None:
    try:
        kind.parse_body(value)
    except Invalid:
        pass


@settings(max_examples=100)
@given(st.sampled_from(kinds.BUILTIN_KINDS), st.data())
def test_body_parsers_refuse_a_valid_body_with_one_field_garbled(
    kind: RecordKind, data: st.DataObject
) -> None:
    genesis = genesis_head(content_id(b"w"), content_id(b"wl"), content_id(b"ds"), AggregationRule.of("mean"))
    valid = {
        kinds.LEASE: lease_body(PEER.peer_id),
        kinds.UPDATE: update_body(PEER.peer_id),
        kinds.HEAD: genesis.to_wire(),
        kinds.ROLLBACK: RollbackRecord(genesis.id, "test", NOW).to_wire(),
        kinds.PATCH: PatchRecord.create({"inner_lr": 0.01}, 2, NOW).to_wire(),
    }[kind.name]
    key = data.draw(st.sampled_from(sorted(valid)))
    garbage = data.draw(wire_values)
    try:
        parsed = kind.parse_body({**valid, key: garbage})
    except Invalid:
        return
    assert parsed.to_wire() == {**valid, key: garbage}  # only an equally valid value gets through


def test_a_warm_setting_takes_effect_two_rounds_past_the_canonical_head_at_the_earliest() -> None:
    # Canonical head of round 7: round 8 may be under way somewhere, so round 9 is the first safe one.
    assert earliest_warm_round(7) == 9
    check_warm_round({"outer_lr": 0.5}, 9, 7)
    with pytest.raises(Invalid) as refused:
        check_warm_round({"outer_lr": 0.5, "inner_lr": 0.01}, 8, 7)
    assert refused.value.reason == "too_soon" and "outer_lr" in refused.value.detail and "inner_lr" not in refused.value.detail
    # Hot settings apply as soon as their round begins, even the current one.
    check_warm_round({"inner_lr": 0.01, "round_deadline_s": 30}, 0, 7)
    check_warm_round({}, 0, 7)
