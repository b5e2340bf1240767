"""Leases and exactly-once coverage across real daemons: an epoch, a kill -9, a peer without data, a bad workload.

"Trained exactly once" is read off the canonical head chain, as invariant 8
defines it: walking parent links from the canonical head back to genesis, the
epoch-0 heads and the updates they include each name every planned
microshard exactly once.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from node.store import ContentStore
from protocol.cid import content_id
from protocol.dataset import plan_microshards
from protocol.kinds import UPDATE, record_kinds
from protocol.records import validate_record
from protocol.updates import UpdateRecord
from tests.swarm_harness import Peer, Swarm, wait_until
from workloads.tiny import Tiny

pytestmark = pytest.mark.slow

T = TypeVar("T")

PLAN = plan_microshards(Tiny().dataset())
PLANNED = frozenset(m.id for m in PLAN)
SETTLED_PHASES = {"training", "publishing", "waiting"}  # a peer past its lease's settle window

# Eight inner steps of batch 32 take four 64-example microshards: an epoch of 32 takes a few rounds.
TINY = (
    '[workload]\nname = "{name}"\n{workload_extra}\n'
    "[training]\ninner_steps = {steps}\nlease_settle_s = 1.0\nhead_reannounce_s = 2.0\nevaluate = false\n"
    'codec = "fp32"\n{training_extra}\n'
)

# Workloads a test peer loads with [workload] name = "module:create"; same schema, data and genesis as tiny.
WORKLOAD_MODULES = '''
import time
from workloads.base import config_from_options
from workloads.tiny import Tiny, TinyConfig


class Straggler(Tiny):
    """Sits out a long pause in every real round (probes pass no should_stop and run at full speed)."""

    def train(self, model, state, microshards, steps, device="cpu", should_stop=None, seed=0):
        if should_stop is not None:
            until = time.monotonic() + 60
            while time.monotonic() < until and not should_stop():
                time.sleep(0.05)
        return super().train(model, state, microshards, steps, device, should_stop, seed)


class Broken(Tiny):
    """A workload bug: every real round raises."""

    def train(self, model, state, microshards, steps, device="cpu", should_stop=None, seed=0):
        if should_stop is not None:
            raise RuntimeError("inner loop exploded")
        return super().train(model, state, microshards, steps, device, should_stop, seed)


def straggler(**options):
    return Straggler(config_from_options(TinyConfig, options))


def broken(**options):
    return Broken(config_from_options(TinyConfig, options))
'''


def tiny_toml(name: str = "tiny", steps: int = 8, workload_extra: str = "", training_extra: str = "") -> str:
    return TINY.format(name=name, steps=steps, workload_extra=workload_extra, training_extra=training_extra)


@pytest.fixture
def swarm(tmp_path):
    swarm = Swarm(tmp_path)
    yield swarm
    swarm.stop_all()


@pytest.fixture
def test_workloads(tmp_path) -> dict[str, str]:
    """Environment that makes ``testworkloads:straggler`` and ``testworkloads:broken`` importable."""
    (tmp_path / "testworkloads.py").write_text(WORKLOAD_MODULES)
    return {"PYTHONPATH": f"{tmp_path}:{Path(__file__).resolve().parents[2]}"}


# ---- reading the chain ---------------------------------------------------------------


@dataclass(frozen=True)
class Included:
    """An update a canonical epoch-0 head includes."""

    id: str
    head_round: int
    update: UpdateRecord


def head_chain(peer: Peer) -> list[dict[str, Any]]:
    """The peer's canonical chain, newest first, genesis last, as head records with their ids."""
    status = peer.get("/status")
    assert status and status["training"], f"{peer.name} has no training status"
    head_id: str | None = status["training"]["head"]
    chain = []
    while head_id is not None:
        body = peer.get(f"/heads/{head_id}")
        assert body is not None, f"{peer.name} cannot show head {head_id} of its own chain"
        chain.append({"id": head_id, **body["record"]})
        head_id = body["record"]["parent"]
    return chain


def epoch_heads(chain: list[dict[str, Any]], epoch: int = 0) -> list[tuple[str, int]]:
    return [(h["id"], h["round"]) for h in chain if h["parent"] is not None and h["epoch"] == epoch]


def read_update(peers: Iterable[Peer], update_id: str) -> UpdateRecord:
    """An update record from any peer's store, with its signature and content id checked."""
    for peer in peers:
        raw = ContentStore(peer.data_dir / "store").get_record(update_id)
        if raw is None:
            continue
        record = validate_record(raw, swarm="test", kinds=record_kinds(), now_ms=int(time.time() * 1000))
        assert record.kind == UPDATE and record.id == update_id and record.body.peer == record.author
        return record.body  # type: ignore[no-any-return]
    raise AssertionError(f"no peer stores update {update_id}")


def assert_epoch_covered_exactly_once(peers: list[Peer], stores: list[Peer] | None = None) -> list[Included]:
    """Every peer agrees on epoch 0's heads, which cover each planned microshard exactly once."""
    chains = {p.name: head_chain(p) for p in peers}
    segments = {name: epoch_heads(chain) for name, chain in chains.items()}
    assert len({tuple(s) for s in segments.values()}) == 1, f"peers disagree on epoch 0: {segments}"
    chain = next(iter(chains.values()))
    heads = [h for h in chain if h["parent"] is not None and h["epoch"] == 0]
    assert heads, "no epoch-0 head on the chain"
    rounds = sorted(h["round"] for h in heads)
    assert rounds == list(range(1, len(rounds) + 1)), f"epoch 0 rounds are not 1..n: {rounds}"

    by_head = Counter(s for h in heads for s in h["microshards"])
    assert set(by_head) == PLANNED, f"{len(PLANNED - set(by_head))} microshards missing, {len(set(by_head) - PLANNED)} unplanned"
    assert max(by_head.values()) == 1, f"microshards in two heads: {[s for s, n in by_head.items() if n > 1]}"

    included: list[Included] = []
    for head in heads:
        updates = [Included(u, head["round"], read_update(stores or peers, u)) for u in head["updates"]]
        for item in updates:
            assert item.update.epoch == 0 and item.update.round == head["round"] and item.update.base == head["parent"]
        assert {s for item in updates for s in item.update.microshards} == set(head["microshards"]), head["id"]
        included.extend(updates)
    by_update = Counter(s for item in included for s in item.update.microshards)
    assert set(by_update) == PLANNED and max(by_update.values()) == 1, "an included update double-counts"
    return included


# ---- watching leases -----------------------------------------------------------------


class LeaseWatch:
    """Polls every peer's /leases and fails on a microshard held by two peers for the same round.

    Only samples taken while a peer is past its settle window count (its phase
    before and after the /leases read says so). A double hold must persist
    for ``grace_s``: two settled views can differ for as long as a lease
    record takes to cross gossip.
    """

    def __init__(self, peers: list[Peer], grace_s: float = 2.0) -> None:
        self.peers = peers
        self.grace_s = grace_s
        self.samples = 0
        self.rounds_seen: set[tuple[int, int]] = set()
        self._first_seen: dict[tuple[int, int, str, frozenset[str]], float] = {}

    def settled_holdings(self, peer: Peer) -> tuple[tuple[int, int], frozenset[str]] | None:
        before = peer.get("/status")
        leases = peer.get("/leases")
        after = peer.get("/status")
        if not (before and leases and after and before["training"] and after["training"]):
            return None
        b, a = before["training"], after["training"]
        if not (b["phase"] in SETTLED_PHASES and a["phase"] in SETTLED_PHASES and b["round"] == a["round"] == leases["round"]):
            return None
        return (leases["epoch"], leases["round"]), frozenset(leases["own"])

    def poll(self) -> None:
        held: dict[tuple[int, int], dict[str, frozenset[str]]] = {}
        for peer in self.peers:
            if peer.process is None or peer.process.poll() is not None:
                continue
            sample = self.settled_holdings(peer)
            if sample is not None and sample[1]:
                held.setdefault(sample[0], {})[peer.name] = sample[1]
                self.samples += 1
                self.rounds_seen.add(sample[0])
        now = time.monotonic()
        for key, holders in held.items():
            for shard in set().union(*holders.values()):
                owners = frozenset(name for name, shards in holders.items() if shard in shards)
                if len(owners) < 2:
                    continue
                first = self._first_seen.setdefault((*key, shard, owners), now)
                assert now - first < self.grace_s, f"epoch/round {key}: {shard} held by {sorted(owners)} for {now - first:.1f} s"


def run_until_epoch_done(peers: list[Peer], watch: LeaseWatch | None, timeout: float, swarm: Swarm) -> None:
    """Poll until every peer's canonical head is past epoch 0, checking leases on the way."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if watch is not None:
            watch.poll()
        statuses = [p.get("/status") for p in peers]
        if all(s and s["training"] and s["training"]["epoch"] >= 1 for s in statuses):
            return
        time.sleep(0.2)
    rows = [(p.name, (p.get("/status") or {}).get("training"), p.get("/leases")) for p in peers]
    raise AssertionError(f"epoch 0 not done in {timeout} s: {rows}\n{swarm.logs()}")


def eventually(check: Callable[[], T], timeout: float, what: str) -> T:
    """``check()``'s result once it stops failing; peers may lag a head behind for a moment."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} still failing after {timeout} s: {exc}") from exc
        time.sleep(0.5)


def start(peers: list[Peer], env: dict[str, dict[str, str]] | None = None) -> None:
    """Start ``peers`` together (``env`` adds variables by peer name) and wait for their status ports."""
    for peer in peers:
        peer.start((env or {}).get(peer.name))
    for peer in peers:
        peer.wait_healthy(60)


# ---- the tests -----------------------------------------------------------------------


def test_four_peers_train_one_epoch_each_microshard_exactly_once(swarm):
    peers = [swarm.add(tiny_toml()) for _ in range(4)]
    start(peers)
    try:
        watch = LeaseWatch(peers)
        run_until_epoch_done(peers, watch, 90, swarm)
        included = eventually(lambda: assert_epoch_covered_exactly_once(peers), 20, "agreement on epoch 0")
        assert watch.samples > 0, "never caught a settled peer holding a lease"
        trainers = {item.update.peer for item in included}
        assert len(trainers) >= 2, f"only {trainers} trained in epoch 0"
        for peer in peers:
            # Claims of a round a peer has already left are dropped as stale; anything else is a protocol fault.
            rejected = set((peer.get("/leases") or {}).get("rejected", {}))
            assert rejected <= {"stale_round", "wrong_epoch", "expired"}, f"{peer.name} rejected leases: {rejected}"
    except AssertionError:
        print(swarm.logs())
        raise


def test_kill9_mid_round_leaseholder_its_microshards_move_to_others(swarm, test_workloads):
    extra = tiny_toml(training_extra="round_deadline_s = 40\n")
    peers = [swarm.add(extra) for _ in range(3)]
    victim = swarm.add(tiny_toml(name="testworkloads:straggler", training_extra="round_deadline_s = 40\n"))
    start([*peers, victim], {victim.name: test_workloads})
    try:
        def victim_holding() -> tuple[int, frozenset[str]] | None:
            sample = LeaseWatch([victim]).settled_holdings(victim)
            status = victim.get("/status")
            if sample is None or not sample[1] or not status or status["training"]["phase"] != "training":
                return None
            return sample[0][1], sample[1]

        round_no, victim_shards = wait_until(victim_holding, 60, what="the victim training on a lease")
        victim.kill9()
        killed_at = time.monotonic()
        wait_until(
            lambda: all((p.get("/status") or {"training": {"head_round": -1}})["training"]["head_round"] >= round_no for p in peers),
            30, what=f"round {round_no} closing without the victim",
        )
        closed_after = time.monotonic() - killed_at
        # The deadline is 40 s: closing well before it means the victim was seen dead.
        assert closed_after < 25, f"round {round_no} took {closed_after:.1f} s to close"

        run_until_epoch_done(peers, LeaseWatch(peers), 90, swarm)
        included = eventually(lambda: assert_epoch_covered_exactly_once(peers, [*peers, victim]), 20, "agreement on epoch 0")
        trained_by = {s: item.update.peer for item in included for s in item.update.microshards}
        assert all(trained_by[s] != victim.peer_id for s in victim_shards), "the dead victim's lease was merged"
        assert {trained_by[s] for s in victim_shards} <= {p.peer_id for p in peers}
    except AssertionError:
        print(swarm.logs())
        raise


def test_peer_without_local_data_trains_on_fetched_verified_microshards(swarm):
    seeder = swarm.add(tiny_toml())
    leecher = swarm.add(tiny_toml(workload_extra="local_data = false\n"))
    start([seeder, leecher])
    try:
        run_until_epoch_done([seeder, leecher], LeaseWatch([seeder, leecher]), 90, swarm)
        included = eventually(lambda: assert_epoch_covered_exactly_once([seeder, leecher]), 20, "agreement on epoch 0")
        fetched_and_merged = {s for item in included if item.update.peer == leecher.peer_id for s in item.update.microshards}
        assert fetched_and_merged, "none of the leecher's updates made it into epoch 0"

        exchange = leecher.get("/exchange")
        assert exchange["chunks_verified"] > 0 and not exchange["rejected_chunks_by_peer"], exchange
        store_dir = leecher.data_dir / "store"
        by_id = {m.id: m for m in PLAN}
        tiny = Tiny()
        for shard in fetched_and_merged:
            source = by_id[shard]
            path = store_dir / "chunks" / source.source.data_cid[3:5] / source.source.data_cid[3:]
            data = path.read_bytes()
            assert content_id(data) == source.source.data_cid and data == tiny.microshard_bytes(source.index)
        assert "microshards_fetched" in leecher.log()
        assert "dataset_seeded" not in leecher.log()
    except AssertionError:
        print(swarm.logs())
        raise


def test_failing_workload_is_reported_drops_its_leases_and_stays(swarm, test_workloads):
    healthy = swarm.add(tiny_toml(steps=16, training_extra="round_deadline_s = 4\n"))
    broken = swarm.add(tiny_toml(name="testworkloads:broken", steps=16, training_extra="round_deadline_s = 4\n"))
    start([healthy, broken], {broken.name: test_workloads})
    try:
        status = wait_until(
            lambda: (s := broken.get("/status")) and s["training"]["last_error"] and s, 60, what="the failure in /status"
        )
        assert status["training"]["last_error"] == "RuntimeError: inner loop exploded"
        assert status["training"]["round_failures"] >= 1
        assert '"training_failed"' in broken.log()
        # It lets go of its shards and sits out a while, so the shards it is home to go to others.
        wait_until(
            lambda: (leases := broken.get("/leases")) and leases["benched_s"] > 0 and not leases["own"], 30,
            what="the broken peer benched without leases",
        )

        run_until_epoch_done([healthy, broken], None, 90, swarm)
        included = assert_epoch_covered_exactly_once([healthy, broken])
        assert {item.update.peer for item in included} == {healthy.peer_id}
        assert broken.process is not None and broken.process.poll() is None, "the broken peer exited"
        assert broken.peer_id in healthy.live_peers(), "the broken peer left the swarm"
    except AssertionError:
        print(swarm.logs())
        raise


