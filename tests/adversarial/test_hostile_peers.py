"""A patched ``p2p-node start`` misbehaving in one mode per test; the three honest daemons must not suffer for it.

Each test switches the hostile peer to its mode for as many rounds as the clean reference phase ran.
Seeds: training is seeded by head and peer ids, the record flood by ``random.Random(7)``, the forged
weights by ``torch`` seed 11.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest

from node.config import TrainingSection
from protocol.leases import STRIKES_TO_EXCLUDE
from tests.adversary import (
    EXAMPLES_PER_MICROSHARD,
    PHASE_TIMEOUT_S,
    AdversarialSwarm,
    PhaseResult,
    PhaseRun,
    assert_agreed,
    assert_exactly_once,
    assert_loss_near,
    assert_survived,
)

pytestmark = pytest.mark.slow


def run_mode(swarm: AdversarialSwarm, mode: str, timeout_s: float = PHASE_TIMEOUT_S) -> tuple[PhaseResult, PhaseRun]:
    with swarm.phase(mode, timeout_s=timeout_s) as run:
        pass
    assert run.result is not None
    return run.result, run


def assert_honest_outcome(result: PhaseResult, run: PhaseRun, clean: PhaseResult) -> None:
    """What every mode must leave: live daemons that agree, count each microshard once, and learn."""
    assert_survived(result, run)
    assert_agreed(result, run)
    assert_exactly_once(result)
    assert_loss_near(result, clean)


def hostile_rounds(result: PhaseResult) -> str:
    """Where the hostile peer's updates went: per round, how many updates the honest head merged
    and whether the hostile one was among them (printed: a small round and a large one both matter)."""
    mine = {row["id"] for row in result.reported("update")}
    rows = []
    for head in result.after_base(next(iter(result.chains))):
        inside = mine & set(head.updates)
        excluded = {u: why for u, why in head.excluded if u in mine}
        rows.append(f"round {head.round}: {len(head.updates)} merged, hostile "
                    f"{'in' if inside else ('excluded: ' + ','.join(excluded.values()) if excluded else 'absent')}")
    return "; ".join(rows)


def test_inflated_sample_counts_weigh_nothing(adversarial_swarm: AdversarialSwarm, clean: PhaseResult) -> None:
    result, run = run_mode(adversarial_swarm, "inflated_samples")
    print(hostile_rounds(result))
    assert result.reported("update"), "the hostile peer published no update"
    assert_honest_outcome(result, run, clean)
    # A head's samples come from what every peer can check (its microshards' sizes), never from
    # an author's claim of 10^9.
    for peer in result.chains:
        for head in result.after_base(peer):
            assert head.samples <= EXAMPLES_PER_MICROSHARD * len(head.microshards), (
                f"{peer}: round {head.round} merges {head.samples} samples from {len(head.microshards)} microshards")


def test_replayed_artifacts_count_once(adversarial_swarm: AdversarialSwarm, clean: PhaseResult) -> None:
    result, run = run_mode(adversarial_swarm, "replay")
    print(hostile_rounds(result))
    replays = [row for row in result.reported("update") if row["artifact"] != row["trained_artifact"]]
    assert replays, "the hostile peer replayed nothing"
    assert_honest_outcome(result, run, clean)
    artifact_of = {row["id"]: row["artifact"] for row in adversarial_swarm.hostile_report() if row["kind"] == "update"}
    for peer, chain in result.chains.items():
        merged = Counter(artifact_of[u] for head in chain for u in head.updates if u in artifact_of)
        twice = {artifact: n for artifact, n in merged.items() if n > 1}
        assert not twice, f"{peer}: the canonical chain merges one pseudo-gradient in several rounds: {twice}"


def test_updates_trained_on_a_stale_base(adversarial_swarm: AdversarialSwarm, clean: PhaseResult) -> None:
    result, run = run_mode(adversarial_swarm, "stale_base")
    print(hostile_rounds(result))
    assert result.reported("update"), "the hostile peer published no update"
    assert_honest_outcome(result, run, clean)


def test_x100_updates(adversarial_swarm: AdversarialSwarm, clean: PhaseResult) -> None:
    result, run = run_mode(adversarial_swarm, "x100")
    print(hostile_rounds(result))
    assert result.reported("update"), "the hostile peer published no update"
    assert_honest_outcome(result, run, clean)


def test_sign_flipped_updates(adversarial_swarm: AdversarialSwarm, clean: PhaseResult) -> None:
    result, run = run_mode(adversarial_swarm, "sign_flip")
    print(hostile_rounds(result))
    assert result.reported("update"), "the hostile peer published no update"
    assert_honest_outcome(result, run, clean)


def test_nan_updates(adversarial_swarm: AdversarialSwarm, clean: PhaseResult) -> None:
    result, run = run_mode(adversarial_swarm, "nan")
    print(hostile_rounds(result))
    assert result.reported("update"), "the hostile peer published no update"
    assert all(loss is not None and math.isfinite(loss) for loss in result.losses.values()), result.losses
    assert_honest_outcome(result, run, clean)


def test_lease_flood_claiming_every_microshard(adversarial_swarm: AdversarialSwarm, clean: PhaseResult) -> None:
    # A flooder whose lease holds an epoch's last shards and never trains them stalls the swarm
    # until it is struck out: one round deadline per strike. That bound is what this allows.
    stall_s = STRIKES_TO_EXCLUDE * (TrainingSection().min_round_deadline_s + 1.0)
    result, run = run_mode(adversarial_swarm, "lease_flood", timeout_s=PHASE_TIMEOUT_S + stall_s)
    assert result.reported("lease_flood"), "the hostile peer claimed nothing"
    assert_honest_outcome(result, run, clean)


def test_forged_ancestors_are_never_adopted(adversarial_swarm: AdversarialSwarm, clean: PhaseResult) -> None:
    result, run = run_mode(adversarial_swarm, "forged_ancestors")
    forged = result.reported("forged")
    assert forged, f"the hostile peer forged nothing: {result.reported('forge_failed')[:3]}"
    forged_ids = {row["head"] for row in forged} | {row["parent"] for row in forged}
    for peer, adopted in result.adopted.items():
        assert not adopted & forged_ids, f"{peer} adopted forged heads {sorted(adopted & forged_ids)}"
    for peer, chain in result.chains.items():
        assert not forged_ids & {h.id for h in chain}, f"{peer}'s canonical chain holds a forged head"
        assert all(h.updates for h in chain if h.parent is not None), f"{peer}: a head with no updates is canonical"
    assert_honest_outcome(result, run, clean)
