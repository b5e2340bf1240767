"""A hostile peer that wins an epoch's last microshards and answers with an update no merge can use
must not stall the swarm: the round merges nothing, its update is set aside, its author struck and
the shards trained by an honest peer on the retry."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.adversary import AdversarialSwarm, assert_exactly_once, assert_survived
from tests.swarm_harness import training

pytestmark = pytest.mark.slow

# An epoch of the tiny workload lasts four or five rounds. The hostile peer sends NaN for the short
# rounds at an epoch's end; the shards it held are left for the next round, whose one or two it
# wins about half the time: these many rounds make it hold a whole tail several times.
ROUNDS = 24


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
    with pair.phase("tail_nan", rounds=ROUNDS) as run:
        pass
    result = run.result
    assert result is not None
    tails = [row for row in result.reported("tail_nan") if row["holds_all"]]
    assert tails, f"the hostile peer never held an epoch's whole tail: {result.reported('tail_nan')}"
    # Each such round merged nothing; the retry went on without the NaN update.
    assert_survived(result, run)
    assert_exactly_once(result)
    row = training(honest)
    assert row["rounds_without_head"] >= 1, row
    chain = result.after_base(honest.name)
    assert len(chain) >= ROUNDS
    assert all(head.updates for head in chain), "a head with no updates is canonical"
    assert row["round_failures"] == 0, row
