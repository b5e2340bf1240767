"""A hostile peer that wins an epoch's last microshards and answers with an update no merge can use
must not stall the swarm: the round merges nothing, its update is set aside, its author struck and
the shards trained by an honest peer on the retry."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.adversary import AdversarialSwarm, assert_exactly_once, assert_survived
from tests.swarm_harness import training, wait_until

pytestmark = pytest.mark.slow

# An epoch of the tiny workload lasts four or five rounds. The hostile peer sends NaN for the short
# rounds at an epoch's end; the shards it held are left for the next round, whose one or two it
# wins about half the time. It is given this long to hold a whole tail.
HOLD_TAIL_S = 120.0
ROUNDS_AFTER = 3  # rounds the swarm must make after the tail the hostile peer held


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[AdversarialSwarm]:
    # One honest peer against one hostile peer, which wins about half of every contested shard.
    swarm = AdversarialSwarm(tmp_path / "pair", honest=1)
    try:
        swarm.start()
        yield swarm
    finally:
        swarm.close()


def test_an_unusable_update_for_an_epochs_last_shards_does_not_stall_the_swarm(pair: AdversarialSwarm) -> None:
    honest = pair.honest[0]
    with pair.phase("tail_nan", rounds=ROUNDS_AFTER) as run:
        since = time.time()
        # The hostile peer says when it holds a whole tail as it sees the pool; the honest peer's
        # own view can differ by a claim, so the test waits for what used to stall for good: an
        # honest round with nothing its merge could use.
        wait_until(lambda: [r for r in pair.hostile_report(since) if r["kind"] == "tail_nan" and r["holds_all"]],
                   HOLD_TAIL_S, interval=0.2, what="the hostile peer holding an epoch's whole tail")
        wait_until(lambda: training(honest).get("rounds_without_head", 0) >= 1, HOLD_TAIL_S, interval=0.2,
                   what="an honest round that merged nothing (the hostile peer's NaN held the whole tail)")
        stalled_at = wait_until(lambda: training(honest).get("round"), 10, interval=0.2, what="the honest peer's round")
        wait_until(lambda: training(honest).get("head_round", 0) >= stalled_at + ROUNDS_AFTER, 30, interval=0.2,
                   what=f"{ROUNDS_AFTER} rounds past the tail the hostile peer held (round {stalled_at})")
    result = run.result
    assert result is not None
    assert_survived(result, run)
    assert_exactly_once(result)
    row = wait_until(lambda: training(honest), 10, interval=0.2, what="the honest peer's /status")
    chain = result.after_base(honest.name)
    assert all(head.updates for head in chain), "a head with no updates is canonical"
    # The NaN updates of the tails it held are never merged (its honest updates may be): each is the
    # update the hostile peer reports right after saying it holds a tail.
    nan, tail_round = set(), None
    for said in result.report:
        if said["kind"] == "tail_nan":
            tail_round = said["round"]
        elif said["kind"] == "update" and said["round"] == tail_round:
            nan.add(said["id"])
            tail_round = None
    assert nan, "the hostile peer published no NaN update for a tail"
    assert not {u for head in chain for u in head.updates} & nan
    assert row["round_failures"] == 0, row
