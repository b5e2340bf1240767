"""Heads: ids, wire form, chain rules, fork choice, rollbacks and the index."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import canonical
from protocol.cid import content_id
from protocol.control import RollbackRecord
from protocol.coverage import EpochLedger, replay
from protocol.errors import Invalid
from protocol.heads import (
    MAX_HEAD_UPDATES,
    AggregationRule,
    HeadIndex,
    HeadRecord,
    check_child,
    check_inputs,
    choose_head,
    genesis_head,
    head_id,
    reference_norm,
)
from protocol.identity import SigningKey
from protocol.updates import InnerMetrics, UpdateRecord

RULE = AggregationRule.of(
    "diloco", outer_lr=0.7, momentum=0.9, nesterov=True, trim_fraction=0.0, min_updates=1
)
WORKLOAD = content_id(b"workload schema")
DATASET = content_id(b"dataset")
GENESIS = genesis_head(content_id(b"init weights"), WORKLOAD, DATASET, RULE)
PLAN = [content_id(b"ms-%d" % i) for i in range(6)]
cids = st.binary(max_size=6).map(content_id)


def child(
    parent: HeadRecord, samples: int = 10, tag: bytes = b"", rollback: str | None = None,
    epoch: int | None = None, shards: tuple[str, ...] = (),
) -> HeadRecord:
    return HeadRecord(
        parent=parent.id, round=parent.round + 1, epoch=parent.epoch if epoch is None else epoch,
        updates=(content_id(b"u" + tag + parent.id.encode()),), excluded=(), rule=RULE,
        weights=content_id(b"w" + tag + parent.id.encode()), momentum=content_id(b"m" + tag),
        samples_total=parent.samples_total + samples, tokens_total=parent.tokens_total + 5 * samples,
        samples=samples, tokens=5 * samples, microshards=shards, eval=None,
        workload=parent.workload, dataset=parent.dataset,
        rollback=parent.rollback if rollback is None else rollback,
    )


@st.composite
def heads(draw: st.DrawFn) -> HeadRecord:
    if draw(st.booleans()):
        return genesis_head(draw(cids), draw(cids), draw(cids), RULE)
    updates = sorted(draw(st.sets(cids, min_size=1, max_size=4)))
    excluded = sorted(draw(st.sets(cids, max_size=3)) - set(updates))
    samples, tokens = draw(st.integers(0, 10**6)), draw(st.integers(0, 10**9))
    return HeadRecord(
        parent=draw(cids), round=draw(st.integers(1, 10**6)), epoch=draw(st.integers(0, 50)),
        updates=tuple(updates),
        excluded=tuple((i, draw(st.sampled_from(["already_done", "overlap", "late"]))) for i in excluded),
        rule=AggregationRule.of(
            draw(st.sampled_from(["diloco", "trimmed_mean"])),
            outer_lr=draw(st.floats(1e-6, 10.0)), nesterov=draw(st.booleans()),
            steps=draw(st.integers(-5, 5)),
        ),
        weights=draw(cids), momentum=draw(st.none() | cids),
        samples_total=samples + draw(st.integers(0, 10**9)),
        tokens_total=tokens + draw(st.integers(0, 10**9)),
        samples=samples, tokens=tokens, microshards=tuple(sorted(draw(st.sets(cids, max_size=4)))),
        eval=draw(st.none() | st.dictionaries(
            st.sampled_from(["loss", "ppl", "acc"]), st.floats(-1e9, 1e9, allow_nan=False)
        ).map(lambda d: tuple(sorted(d.items())))),
        workload=draw(cids), dataset=draw(cids), rollback=draw(st.none() | cids),
        update_norm=draw(st.none() | st.floats(0.0, 1e12)),
    )


@given(heads())
def test_head_survives_the_wire_with_the_same_id(head: HeadRecord) -> None:
    again = HeadRecord.from_wire(canonical.decode(canonical.encode(head.to_wire())))
    assert again == head
    assert again.id == head.id == head_id(head)


def test_reals_travel_as_canonical_strings() -> None:
    wire = GENESIS.to_wire()
    assert wire["rule"]["params"] == {
        "min_updates": 1, "momentum": "0.9", "nesterov": True, "outer_lr": "0.7", "trim_fraction": "0.0",
    }
    for spelling in ("0.70", "7e-1", ".7", "nan", "inf", "-0.0"):
        wire["rule"]["params"]["outer_lr"] = spelling
        with pytest.raises(Invalid):
            HeadRecord.from_wire(wire)


ALTERNATES: dict[str, Any] = {
    "parent": content_id(b"other parent"),
    "round": 7,
    "epoch": 2,
    "updates": (content_id(b"another update"),),
    "excluded": ((content_id(b"excluded one"), "late"),),
    "rule": AggregationRule.of("diloco", outer_lr=0.7000000000000001, momentum=0.9, nesterov=True),
    "weights": content_id(b"other weights"),
    "momentum": None,
    "samples_total": 10**6,
    "tokens_total": 10**7,
    "samples": 11,
    "tokens": 51,
    "microshards": (content_id(b"other shard"),),
    "eval": (("loss", 1.25),),
    "workload": content_id(b"other workload"),
    "dataset": content_id(b"other dataset"),
    "rollback": content_id(b"some rollback"),
    "update_norm": 0.25,
}


@pytest.mark.parametrize("name", sorted(ALTERNATES))
def test_head_id_changes_when_any_field_changes(name: str) -> None:
    head = child(child(GENESIS))
    assert {f.name for f in dataclasses.fields(HeadRecord)} == set(ALTERNATES)
    changed = dataclasses.replace(head, **{name: ALTERNATES[name]})
    assert getattr(changed, name) != getattr(head, name)
    assert changed.id != head.id


@pytest.mark.parametrize(
    "mutate",
    [
        lambda w: w.pop("eval"),
        lambda w: w.update(extra=0),
        lambda w: w.update(parent=None),  # a parentless head at round 2
        lambda w: w.update(round=-1),
        lambda w: w.update(updates=list(reversed(w["updates"]))),
        lambda w: w.update(updates=[content_id(b"%d" % i) for i in range(MAX_HEAD_UPDATES + 1)]),
        lambda w: w.update(excluded=[[w["updates"][0], "late"]]),  # both included and excluded
        lambda w: w.update(excluded=[[content_id(b"x")]]),
        lambda w: w.update(excluded=[[content_id(b"x"), "Not a label"]]),
        lambda w: w.update(samples=w["samples_total"] + 1),
        lambda w: w.update(weights=None),
        lambda w: w.update(rule={"name": "diloco"}),
        lambda w: w["rule"]["params"].update(outer_lr=0.7),  # a msgpack float, not a real string
        lambda w: w.update(eval={"loss": 1.5}),
        lambda w: w.update(workload="b3:short"),
    ],
)
def test_malformed_heads_are_invalid(mutate: Callable[[dict[str, Any]], object]) -> None:
    wire = child(child(GENESIS)).to_wire()
    wire["updates"] = sorted([content_id(b"a"), content_id(b"b")])
    HeadRecord.from_wire(wire)
    mutate(wire)
    with pytest.raises(Invalid):
        HeadRecord.from_wire(wire)


def test_genesis_is_the_same_everywhere_and_carries_nothing_else() -> None:
    assert genesis_head(GENESIS.weights, WORKLOAD, DATASET, RULE).id == GENESIS.id
    assert HeadRecord.from_wire(GENESIS.to_wire()) == GENESIS
    with pytest.raises(Invalid):
        HeadRecord.from_wire(dataclasses.replace(GENESIS, samples_total=1, tokens_total=0).to_wire())


def test_chain_rules() -> None:
    a = child(GENESIS)
    check_child(GENESIS, a, {})
    bad = {
        "wrong_parent": dataclasses.replace(a, parent=content_id(b"elsewhere")),
        "wrong_round": dataclasses.replace(a, round=5),
        "wrong_epoch": dataclasses.replace(a, epoch=2),
        "wrong_totals": dataclasses.replace(a, samples_total=a.samples_total + 1),
        "wrong_workload": dataclasses.replace(a, dataset=content_id(b"other")),
        "unknown_rollback": dataclasses.replace(a, rollback=content_id(b"rb")),
    }
    for reason, head in bad.items():
        with pytest.raises(Invalid) as err:
            check_child(GENESIS, head, {})
        assert err.value.reason == reason
    rollback = RollbackRecord(target=a.id, reason="bad merge", issued_ms=1)
    with pytest.raises(Invalid, match="bad_rollback"):
        check_child(GENESIS, dataclasses.replace(a, rollback=rollback.id), {rollback.id: rollback})
    check_child(a, child(a, rollback=rollback.id), {rollback.id: rollback})


def test_check_inputs_ties_a_head_to_its_updates() -> None:
    peer = SigningKey(b"\x01" * 32).peer_id
    base = child(GENESIS)
    ups = {
        content_id(b"r%d" % i): UpdateRecord(
            round=2, base=base.id, artifact=content_id(b"pg%d" % i), codec="fp32", samples=4, tokens=40,
            microshards=(PLAN[i],), epoch=0, metrics=InnerMetrics(1.0, 10, 100), peer=peer,
        )
        for i in range(3)
    }
    head = dataclasses.replace(
        child(base, samples=12), updates=tuple(sorted(ups)), tokens=120,
        tokens_total=base.tokens_total + 120, microshards=tuple(sorted(PLAN[:3])),
    )
    sizes = {shard: (5, 50) for shard in PLAN}
    check_inputs(head, ups, sizes)
    with pytest.raises(Invalid, match="inputs_mismatch"):
        check_inputs(head, dict(list(ups.items())[:2]), sizes)
    with pytest.raises(Invalid, match="inputs_mismatch"):
        check_inputs(dataclasses.replace(head, samples=11), ups, sizes)
    # Claims above the plan's sizes count for the plan's sizes only: 3 x min(4, 3) samples.
    small = {shard: (3, 30) for shard in PLAN}
    with pytest.raises(Invalid, match="inputs_mismatch"):
        check_inputs(head, ups, small)
    check_inputs(dataclasses.replace(head, samples=9, samples_total=base.samples_total + 9, tokens=90,
                                     tokens_total=base.tokens_total + 90), ups, small)


def test_a_head_that_merges_nothing_is_invalid() -> None:
    """Honest peers never make one; believing one would let its author set the weights at will."""
    empty = dataclasses.replace(child(GENESIS), updates=(), samples=0, samples_total=0, tokens=0, tokens_total=0)
    with pytest.raises(Invalid, match="no_updates"):
        HeadRecord.from_wire(canonical.decode(canonical.encode(empty.to_wire())))


def test_the_reference_norm_is_the_median_of_recent_heads_update_norms() -> None:
    chain = [GENESIS]
    for norm in (None, 1.0, 2.0, 100.0, 3.0):
        chain.append(dataclasses.replace(child(chain[-1]), update_norm=norm))
    newest_first = chain[::-1]
    assert reference_norm(newest_first) == 2.5  # median of 3, 100, 2, 1
    assert reference_norm(newest_first, window=3) == 3.0
    assert reference_norm([GENESIS]) is None
    with pytest.raises(Invalid):
        HeadRecord.from_wire({**chain[-1].to_wire(), "update_norm": "nan"})


def fork_tree() -> list[HeadRecord]:
    a = child(GENESIS, 10)
    b1, b2, b3 = child(a, 10, b"1"), child(a, 30, b"2"), child(a, 30, b"3")
    c = child(b1, 1)
    return [GENESIS, a, b1, b2, b3, c]


@settings(max_examples=50)
@given(st.permutations(fork_tree()))
def test_fork_choice_is_independent_of_input_order(order: list[HeadRecord]) -> None:
    assert choose_head(order) == choose_head(fork_tree())


def test_fork_choice_prefers_round_then_samples_then_smallest_id() -> None:
    genesis, a, b1, b2, b3, c = fork_tree()
    assert choose_head([genesis, a, b1, b2, b3, c]) == c.id  # highest round, despite fewer samples
    assert choose_head([b1, b2]) == b2.id  # same round: more samples
    assert choose_head([b2, b3]) == min(b2.id, b3.id)  # tie: smallest id
    assert choose_head([]) is None


@settings(max_examples=50)
@given(st.lists(heads(), min_size=1, max_size=6))
def test_fork_choice_is_a_total_order(hs: list[HeadRecord]) -> None:
    best = choose_head(hs)
    winner = next(h for h in hs if h.id == best)
    for h in hs:
        assert (winner.round, winner.samples_total) >= (h.round, h.samples_total)
        if (winner.round, winner.samples_total) == (h.round, h.samples_total):
            assert winner.id <= h.id
    assert choose_head(list(reversed(hs))) == best


def lone_fork() -> tuple[list[HeadRecord], dict[str, frozenset[str]], HeadRecord, HeadRecord]:
    """A swarm of three trains on from ``a``; a fourth peer forks off alone and makes twice the rounds."""
    a = child(GENESIS, tag=b"a")
    authors = {a.id: frozenset({"p1", "p2", "p3", "p4"})}
    swarm, lone = [a], [a]
    for n in range(3):
        swarm.append(child(swarm[-1], 30, tag=b"swarm%d" % n, epoch=1))
        authors[swarm[-1].id] = frozenset({"p1", "p2", "p3"})
    for n in range(6):
        lone.append(child(lone[-1], 20, tag=b"lone%d" % n))
        authors[lone[-1].id] = frozenset({"p4"})
    return [GENESIS, *swarm, *lone[1:]], authors, swarm[-1], lone[-1]


def test_a_lone_peers_longer_branch_loses_to_the_swarms_branch_with_more_authors() -> None:
    heads_, authors, swarm_tip, lone_tip = lone_fork()
    assert lone_tip.round > swarm_tip.round and lone_tip.samples_total > swarm_tip.samples_total
    assert choose_head(heads_, authors=authors) == swarm_tip.id  # 3 x 3 authors against 6 x 1
    assert choose_head(heads_) == lone_tip.id  # with no authors known, rounds decide
    # Only the branches since their last common head weigh: a head the swarm makes on the lone
    # branch's tip extends it, and that branch is the heavier one now.
    joined = child(lone_tip, 1, tag=b"joined")
    assert choose_head([*heads_, joined], authors={**authors, joined.id: frozenset({"p1", "p2", "p3", "p4"})}) == joined.id


def test_a_sibling_with_one_more_author_does_not_outweigh_the_rounds_built_since() -> None:
    heads_, authors, swarm_tip, _ = lone_fork()
    a = heads_[1]
    late = child(a, 50, tag=b"late")  # merged every author of round 2, and a fifth
    authors[late.id] = frozenset({"p1", "p2", "p3", "p4", "p5"})
    assert choose_head([GENESIS, *heads_[1:5], late], authors=authors) == swarm_tip.id  # 9 against 5
    assert choose_head([GENESIS, a, heads_[2], late], authors=authors) == late.id  # 5 against 3


@settings(max_examples=50)
@given(st.permutations(lone_fork()[0]))
def test_the_author_weighted_fork_choice_is_independent_of_input_order(order: list[HeadRecord]) -> None:
    _, authors, swarm_tip, _ = lone_fork()
    assert choose_head(order, authors=authors) == swarm_tip.id


def test_with_as_many_authors_the_higher_round_wins_as_before() -> None:
    a = child(GENESIS)
    b1, b2 = child(a, 10, b"1"), child(a, 30, b"2")
    c = child(b1, 1)
    authors = {h.id: frozenset({"p1", "p2"}) for h in (a, b1, b2, c)}
    assert choose_head([GENESIS, a, b1, b2, c], authors=authors) == c.id  # extends: more rounds
    assert choose_head([GENESIS, a, b1, b2], authors=authors) == b2.id  # siblings: more samples
    # A sibling that merged a third author's update beats one with more samples and two.
    b3 = child(a, 5, b"3")
    authors[b3.id] = frozenset({"p1", "p2", "p3"})
    assert choose_head([GENESIS, a, b1, b2, b3], authors=authors) == b3.id
    assert choose_head([GENESIS, a, b1, b2, b3, c], authors=authors) == c.id  # 2 + 2 against 3


def test_index_weighs_branches_by_the_authors_it_was_given_and_forgets_them_with_the_heads() -> None:
    heads_, authors, swarm_tip, lone_tip = lone_fork()
    index = HeadIndex(GENESIS)
    for head in heads_[1:]:
        index.add(head, authors[head.id])
    assert index.tip() == swarm_tip.id
    assert index.authors(lone_tip.id) == {"p4"}
    dropped = index.prune(2)
    assert lone_tip.id in dropped and index.authors(lone_tip.id) == frozenset()
    assert index.tip() == swarm_tip.id


def test_rollback_pins_the_target_and_only_its_new_branch_competes() -> None:
    a = child(GENESIS)
    b = child(a)
    c_old, d_old = child(b, tag=b"old"), None
    d_old = child(c_old, tag=b"old")
    everything = [GENESIS, a, b, c_old, d_old]
    assert choose_head(everything) == d_old.id

    rollback = RollbackRecord(target=b.id, reason="diverged at c", issued_ms=100)
    assert choose_head(everything, rollback) == b.id  # c and d descend from b but predate the order

    c_new = child(b, tag=b"new", rollback=rollback.id)
    forged = child(c_old, tag=b"forged", rollback=rollback.id)  # marker on the abandoned branch
    unrelated = child(GENESIS, 10**6, tag=b"side")
    heads_now = everything + [c_new, forged, unrelated]
    assert choose_head(heads_now, rollback) == c_new.id
    d_new = child(c_new, 1, tag=b"new")
    assert choose_head(heads_now + [d_new], rollback) == d_new.id

    assert choose_head([a, c_new], rollback) is None  # the target is not known
    later = RollbackRecord(target=a.id, reason="again", issued_ms=200)
    assert choose_head(heads_now + [d_new], later) == a.id


def test_index_tracks_the_tip_under_rollbacks() -> None:
    index = HeadIndex(GENESIS)
    a = child(GENESIS)
    b = child(a)
    c = child(b, tag=b"old")
    for head in (a, b, c):
        assert index.add(head)
    assert not index.add(c)
    assert index.tip() == c.id
    with pytest.raises(Invalid, match="unknown_parent"):
        index.add(child(child(c)))

    rollback = RollbackRecord(target=b.id, reason="bad c", issued_ms=5)
    c_new = child(b, tag=b"new", rollback=rollback.id)
    with pytest.raises(Invalid, match="unknown_rollback"):
        index.add(c_new)
    index.pin(rollback)
    assert index.rollback == rollback
    assert index.tip() == b.id
    index.add(c_new)
    assert index.tip() == c_new.id
    assert [h.id for h in index.chain(c_new.id)] == [GENESIS.id, a.id, b.id, c_new.id]
    assert index.is_ancestor(a.id, c_new.id) and not index.is_ancestor(c.id, c_new.id)


def test_prune_keeps_the_last_heads_and_the_tips_epoch() -> None:
    index = HeadIndex(GENESIS)
    ledger = EpochLedger.start(PLAN)
    head = GENESIS
    for n in range(10):
        epoch = ledger.rolled().epoch
        shards = (PLAN[n % len(PLAN)],)
        head = child(head, epoch=epoch, shards=shards)
        ledger = ledger.after(head)
        index.add(head)
    side = child(index.chain(head.id)[-2], samples=1, tag=b"side")  # a weaker fork just below the tip
    old_side = child(index.chain(head.id)[1], tag=b"old side")
    index.add(side)
    index.add(old_side)

    dropped = index.prune(keep=2)
    chain = index.chain(head.id)
    assert chain[0] == index.root
    assert [h.epoch for h in chain] == [1] * 4  # rounds 7..10 are epoch 1, more than keep=2
    assert side.id in index and old_side.id not in index and GENESIS.id not in index
    assert old_side.id in dropped and index.tip() == head.id
    assert replay(PLAN, chain) == ledger
