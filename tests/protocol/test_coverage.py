"""Coverage: done means included in the canonical chain, exactly once per epoch."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.cid import content_id
from protocol.coverage import (
    ALREADY_DONE,
    OVERLAP,
    UNPLANNED,
    WRONG_EPOCH,
    EpochLedger,
    replay,
    select_updates,
)
from protocol.errors import Invalid

SHARDS = tuple(sorted(content_id(b"ms-%d" % i) for i in range(12)))
PLAN = frozenset(SHARDS)


@dataclass(frozen=True)
class Covers:
    """Stands in for a head or an update: an epoch and the shards it lists."""

    epoch: int
    microshards: tuple[str, ...]


def covers(epoch: int, shards: list[str] | tuple[str, ...]) -> Covers:
    return Covers(epoch, tuple(sorted(shards)))


def uid(n: int) -> str:
    return content_id(b"update-%d" % n)


def test_done_is_what_the_chain_includes() -> None:
    ledger = EpochLedger.start(PLAN).after(covers(0, ())).after(covers(0, SHARDS[:3]))
    cov = ledger.coverage(leased=SHARDS[2:5])
    assert cov.done == frozenset(SHARDS[:3])
    assert cov.leased == frozenset(SHARDS[3:5])
    assert cov.free == PLAN - frozenset(SHARDS[:5])
    assert not cov.complete


def test_a_head_that_recounts_a_done_shard_is_refused() -> None:
    ledger = EpochLedger.start(PLAN).after(covers(0, SHARDS[:3]))
    with pytest.raises(Invalid, match="double_coverage"):
        ledger.after(covers(0, SHARDS[2:4]))
    with pytest.raises(Invalid, match=UNPLANNED):
        ledger.after(covers(0, [content_id(b"stranger")]))


def test_select_flags_double_inclusion_and_overlap_and_drops_their_shards_back_to_the_pool() -> None:
    ledger = EpochLedger.start(PLAN).after(covers(0, SHARDS[:2]))
    updates = {
        uid(1): covers(0, SHARDS[1:3]),  # re-lists a done shard
        uid(2): covers(0, SHARDS[3:5]),
        uid(3): covers(0, SHARDS[4:6]),  # overlaps whichever of 2 and 3 sorts first
        uid(4): covers(1, SHARDS[6:7]),
        uid(5): covers(0, [content_id(b"stranger")]),
    }
    selection = select_updates(ledger, updates)
    first, second = sorted([uid(2), uid(3)])
    assert selection.included == (first,)
    assert dict(selection.excluded) == {
        uid(1): ALREADY_DONE, second: OVERLAP, uid(4): WRONG_EPOCH, uid(5): UNPLANNED,
    }
    after = ledger.after(covers(0, selection.microshards))
    assert after.coverage().free == PLAN - after.done
    assert SHARDS[2] in after.coverage().free  # update 1's new shard was not counted


def test_epoch_rolls_over_when_every_shard_is_done() -> None:
    ledger = EpochLedger.start(PLAN).after(covers(0, SHARDS[:6])).after(covers(0, SHARDS[6:]))
    assert ledger.complete and ledger.coverage().complete
    with pytest.raises(Invalid, match=WRONG_EPOCH):
        ledger.after(covers(0, ()))
    fresh = ledger.after(covers(1, SHARDS[:1]))
    assert (fresh.epoch, fresh.done) == (1, frozenset(SHARDS[:1]))
    selection = select_updates(ledger, {uid(1): covers(1, SHARDS[:2]), uid(2): covers(0, SHARDS[3:4])})
    assert selection.included == (uid(1),)


def test_the_pool_after_a_round_is_the_epochs_rest_or_the_next_epochs_whole_plan() -> None:
    ledger = EpochLedger.start(PLAN).after(covers(0, SHARDS[:4]))
    assert ledger.next_pool(SHARDS[4:8]) == (0, frozenset(SHARDS[8:]))
    # A round that takes the epoch's last shards: the next round draws on the next epoch's whole plan.
    assert ledger.next_pool(SHARDS[4:]) == (1, PLAN)
    assert ledger.next_pool(SHARDS) == (1, PLAN)
    assert ledger.next_pool(()) == (0, frozenset(SHARDS[4:]))


def test_misnumbered_epoch_before_completion_is_refused() -> None:
    with pytest.raises(Invalid, match=WRONG_EPOCH):
        EpochLedger.start(PLAN).after(covers(1, SHARDS[:1]))


def test_replay_matches_the_incremental_ledger() -> None:
    chain = [covers(0, ()), covers(0, SHARDS[:4]), covers(0, SHARDS[4:]), covers(1, SHARDS[:2])]
    incremental = EpochLedger.start(PLAN)
    for head in chain:
        incremental = incremental.after(head)
    assert replay(PLAN, chain) == incremental
    assert replay(PLAN, chain[3:]) == incremental  # from the first head of the epoch, as pruning keeps
    with pytest.raises(ValueError):
        replay(PLAN, [])


@settings(max_examples=60)
@given(st.lists(st.lists(st.sets(st.sampled_from(SHARDS), min_size=1, max_size=4), max_size=5), max_size=12))
def test_rounds_of_random_updates_never_count_a_shard_twice(rounds: list[list[set[str]]]) -> None:
    ledger = EpochLedger.start(PLAN)
    counted: dict[int, list[str]] = {}
    chain = []
    for n, round_updates in enumerate(rounds):
        epoch = ledger.rolled().epoch
        updates = {uid(n * 10 + i): covers(epoch, sorted(s)) for i, s in enumerate(round_updates)}
        selection = select_updates(ledger, updates)
        head = covers(epoch, selection.microshards)
        ledger = ledger.after(head)
        chain.append(head)
        counted.setdefault(epoch, []).extend(selection.microshards)
        cov = ledger.coverage()
        assert cov.done | cov.free == PLAN and not cov.done & cov.free
    for shards in counted.values():
        assert len(shards) == len(set(shards))
    if chain:
        assert replay(PLAN, chain) == ledger
