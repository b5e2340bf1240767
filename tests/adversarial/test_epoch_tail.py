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
        held = wait_until(lambda: [r for r in pair.hostile_report(since) if r["kind"] == "tail_nan" and r["holds_all"]],
                          HOLD_TAIL_S, interval=0.2, what="the hostile peer holding an epoch's whole tail")
        # Before the round was set aside, the swarm stalled here for good.
        stalled_at = held[0]["round"]
        wait_until(lambda: training(honest).get("head_round", 0) >= stalled_at + ROUNDS_AFTER, 30, interval=0.2,
                   what=f"{ROUNDS_AFTER} rounds past the tail the hostile peer held (round {stalled_at})")
    result = run.result
    assert result is not None
    assert_survived(result, run)
    assert_exactly_once(result)
    row = training(honest)
    assert row["rounds_without_head"] >= 1, row
    chain = result.after_base(honest.name)
    assert all(head.updates for head in chain), "a head with no updates is canonical"
    hostile = {r["id"] for r in result.reported("update")}
    assert not {u for head in chain if head.round == stalled_at for u in head.updates} & hostile
    assert row["round_failures"] == 0, row
