"""Update records: the wire form round-trips and anything malformed is Invalid."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import canonical
from protocol.cid import content_id
from protocol.errors import Invalid
from protocol.identity import SigningKey
from protocol.updates import MAX_UPDATE_MICROSHARDS, InnerMetrics, UpdateRecord, credit, update_binding

PEER = SigningKey(b"\x07" * 32).peer_id
cids = st.binary(max_size=8).map(content_id)


@st.composite
def updates(draw: st.DrawFn) -> UpdateRecord:
    return UpdateRecord(
        round=draw(st.integers(1, 2**40)),
        base=draw(cids),
        artifact=draw(cids),
        codec=draw(st.sampled_from(["fp32", "bf16", "int8", "raw"])),
        samples=draw(st.integers(1, 2**40)),
        tokens=draw(st.integers(0, 2**40)),
        microshards=tuple(sorted(draw(st.sets(cids, min_size=1, max_size=6)))),
        epoch=draw(st.integers(0, 1000)),
        metrics=InnerMetrics(
            loss=draw(st.floats(allow_nan=False, allow_infinity=False)),
            steps=draw(st.integers(0, 10_000)),
            inner_ms=draw(st.integers(0, 10**9)),
        ),
        peer=PEER,
    )


@given(updates())
def test_update_survives_the_wire(update: UpdateRecord) -> None:
    assert UpdateRecord.from_wire(canonical.decode(canonical.encode(update.to_wire()))) == update


def sample() -> dict[str, Any]:
    return UpdateRecord(
        round=3, base=content_id(b"base"), artifact=content_id(b"pg"), codec="int8",
        samples=64, tokens=8192, microshards=(content_id(b"s"),), epoch=0,
        metrics=InnerMetrics(2.5, 100, 12_000), peer=PEER,
    ).to_wire()


@pytest.mark.parametrize(
    "mutate",
    [
        lambda w: w.pop("codec"),
        lambda w: w.update(more=1),
        lambda w: w.update(round=0),
        lambda w: w.update(samples=0),
        lambda w: w.update(tokens=-1),
        lambda w: w.update(base="b3:" + "0" * 63),
        lambda w: w.update(artifact=None),
        lambda w: w.update(codec="Not A Label"),
        lambda w: w.update(peer=content_id(b"x")),
        lambda w: w.update(microshards=[]),
        lambda w: w.update(microshards=[content_id(b"%d" % i) for i in range(MAX_UPDATE_MICROSHARDS + 1)]),
        lambda w: w["metrics"].update(loss=math.nan),
        lambda w: w["metrics"].update(loss=math.inf),
        lambda w: w["metrics"].update(loss=2),
        lambda w: w["metrics"].update(steps=-1),
        lambda w: w["metrics"].pop("inner_ms"),
        lambda w: w.update(metrics=[]),
    ],
)
def test_malformed_updates_are_invalid(mutate: Callable[[dict[str, Any]], object]) -> None:
    wire = sample()
    UpdateRecord.from_wire(wire)
    mutate(wire)
    with pytest.raises(Invalid):
        UpdateRecord.from_wire(wire)


@given(st.recursive(st.none() | st.integers() | st.text(max_size=5), lambda c: st.lists(c, max_size=3)))
def test_arbitrary_values_never_escape_as_other_errors(value: object) -> None:
    with pytest.raises(Invalid):
        UpdateRecord.from_wire(value)


def test_an_update_counts_for_its_claim_capped_by_the_plan() -> None:
    update = UpdateRecord(
        round=2, base=content_id(b"b"), artifact=content_id(b"a"), codec="int8", samples=10**9, tokens=10**12,
        microshards=tuple(sorted(content_id(b"s%d" % i) for i in range(3))), epoch=0,
        metrics=InnerMetrics(1.0, 10, 100), peer=PEER,
    )
    sizes = {shard: (7, 70) for shard in update.microshards}
    assert credit(update, sizes) == (7 * len(update.microshards), 70 * len(update.microshards))
    honest = dataclasses.replace(update, samples=3, tokens=30)
    assert credit(honest, sizes) == (3, 30)
    assert credit(update, {}) == (0, 0)  # unplanned shards count nothing


def test_an_update_binding_names_author_base_and_round() -> None:
    peer, other = SigningKey(b"\x01" * 32).peer_id, SigningKey(b"\x02" * 32).peer_id
    base = content_id(b"base")
    bound = update_binding(peer, base, 3)
    assert bound == update_binding(peer, base, 3)
    assert len({bound, update_binding(other, base, 3), update_binding(peer, content_id(b"x"), 3),
                update_binding(peer, base, 4)}) == 4
