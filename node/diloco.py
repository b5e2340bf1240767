"""The DiLoCo outer loop: lease, train H inner steps, publish the pseudo-gradient, merge, adopt.

Each round starts from the canonical head. A trainer claims microshards,
trains on them, stores its pseudo-gradient as an artifact and gossips an
update record. The round closes when every live leaseholder's update is in,
or at the deadline; then each participant merges the same updates locally
into the same head. Heads computed elsewhere are verified by recomputing
them before they count.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from node.artifacts import MissingContent, store_artifact
from node.availability import Availability
from node.config import Config
from node.exchange import Exchange, FetchFailed
from node.gossip import Gossip, now_ms
from node.heads import Heads
from node.leasing import Leasing
from node.logs import Repeats, get_logger
from node.membership import Membership
from node.merge import NothingMerged, outer_rule
from node.receipt import UNAVAILABLE, UNBOUND, Receipt, state_ids
from node.microshards import MicroshardSource, MicroshardUnavailable
from node.store import ContentStore
from node.trainer import InnerResult, Trainer
from protocol import canonical
from protocol.chunking import FixedChunking
from protocol.codecs import BF16, FP32, INT8, Codec
from protocol.coverage import EpochLedger, replay
from protocol.errors import Invalid
from protocol.evals import EVAL_KIND, EVAL_VERSION, EvalRecord
from protocol.heads import MAX_HEAD_UPDATES, AggregationRule, HeadRecord, genesis_head
from protocol.kinds import UPDATE
from protocol.records import Record
from protocol.rounds import Offer, Phase, RoundState, adaptive_deadline_ms, inner_budget, measured_speeds
from protocol.updates import InnerMetrics, UpdateRecord, update_binding

log = get_logger("diloco")

UPDATE_VERSION = 1
CODECS: dict[str, Codec] = {"fp32": FP32, "bf16": BF16, "int8": INT8}
MAX_BUFFERED_ROUNDS = 4
MAX_SET_ASIDE = 4096  # update ids kept out of their round's retries
SYNC_MAX_S = 120.0
EARLY_FETCHERS = 2  # updates fetched at once as they are announced, during the round
EARLY_FETCH_QUEUE = 256  # announced updates waiting for an early fetch; beyond, the merge fetches them
CATCH_UP_MAX_S = 30.0  # longest a trainer waits, per base, for the verdict on a head rounds ahead
# Exclusions that say the author sent something no merge can use, as opposed to arriving late or
# losing a race for shards: they strike the author as a missing update does.
UNUSABLE = frozenset({UNBOUND, "wrong_base", "undecodable", "wrong_shapes", "non_finite", "norm_outlier"})


EventSink = Callable[..., None]


def _ignore(kind: str, **data: Any) -> None:
    return None


@dataclass
class RoundView:
    round: int = 0
    phase: Phase = Phase.STARTING
    base: str | None = None
    leased: int = 0
    expected: list[str] | None = None
    waiting_for: list[str] | None = None
    deadline_in_s: float | None = None


@dataclass
class Ahead:
    """A round trained ahead (``diloco.overlap``): begun when the round before it closed, on
    shards claimed then, from the local weights; rebased onto its base head once adopted."""

    after: str  # the base of the round being merged: the base head must be its child
    round: int
    epoch: int
    steps: int
    budget_s: float | None
    shards: tuple[str, ...] = ()
    claimed: asyncio.Event = field(default_factory=asyncio.Event)
    cancel: threading.Event = field(default_factory=threading.Event)
    task: asyncio.Task[InnerResult | None] | None = None


class OuterLoop:
    """One peer's part in the swarm's training; owns the round state and the merge."""

    def __init__(
        self,
        config: Config,
        peer_id: str,
        trainer: Trainer,
        store: ContentStore,
        exchange: Exchange,
        availability: Availability,
        gossip: Gossip,
        membership: Membership,
    ) -> None:
        self.config = config
        self.peer_id = peer_id
        self.trainer = trainer
        self.workload = trainer.workload
        self.store = store
        self.exchange = exchange
        self.availability = availability
        self.gossip = gossip
        self.membership = membership
        self.is_trainer = config.training.role == "trainer"
        self.chunking = FixedChunking(config.exchange.chunk_bytes)
        self._view = RoundView()
        self.phase_seconds: dict[Phase, float] = {}  # wall time of the round loop per phase
        self._phase_since = time.monotonic()
        self.eval_seconds = 0.0
        self._eval_next: HeadRecord | None = None
        self._eval_wake = asyncio.Event()
        self.updates: dict[int, dict[str, UpdateRecord]] = {}
        self.updates_by_id: dict[str, UpdateRecord] = {}  # the last few rounds', for expecting peers
        self.update_rejections: Counter[str] = Counter()
        self.inner_step_ms: list[float] = []  # this peer's recent inner-loop time per step
        self.started = time.monotonic()
        self.speed = 1.0
        self.round_failures = 0
        self.rounds_without_head = 0  # closed rounds whose every update the merge left out
        self._set_aside_ids: dict[str, int] = {}  # update id -> round: left out of every retry of it
        self._crashes = Repeats()  # the same local fault, logged once a minute
        self.current_settings: dict[str, Any] = {}
        self._state: RoundState | None = None
        self._catch_up_base: str | None = None
        self._catch_up_given_up: str | None = None  # the base the last wait gave up on (logged once)
        self._on_other_base: set[str] = set()  # peers whose update this round has the wrong base
        self._early: asyncio.Queue[UpdateRecord] = asyncio.Queue(EARLY_FETCH_QUEUE)
        self._catch_up_since = 0.0
        self._arrived = asyncio.Event()
        self._weights_cache: tuple[str, dict[str, torch.Tensor]] | None = None  # the canonical head's only
        self._ahead: Ahead | None = None
        self.overlap: Counter[str] = Counter()  # rounds trained ahead: used, or abandoned and why
        self.source: MicroshardSource | None = None
        self.plan_sizes: dict[str, tuple[int, int]] = {}
        self.emit: EventSink = _ignore  # the daemon points this at its event bus
        self.patches_at: Callable[[dict[str, Any], int], dict[str, Any]] | None = None
        self.adopted_hooks: list[Callable[[HeadRecord, dict[str, torch.Tensor]], Awaitable[None]]] = []
        self.leasing: Leasing | None = None
        self.heads: Heads | None = None
        self.receipt: Receipt | None = None
        gossip.on(UPDATE, self._on_update)
        gossip.on(EVAL_KIND, self._on_eval)

    # ---- what the round loop is doing --------------------------------------------------

    @property
    def view(self) -> RoundView:
        return self._view

    @view.setter
    def view(self, view: RoundView) -> None:
        self._account()
        self._view = view

    def _enter(self, phase: Phase) -> None:
        """Switch the round loop to ``phase``, adding the time spent in the last one to ``phase_seconds``."""
        self._account()
        self._view.phase = phase

    def _account(self) -> None:
        now = time.monotonic()
        phase = self._view.phase
        self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + now - self._phase_since
        self._phase_since = now

    def phase_totals(self) -> dict[str, float]:
        """Seconds spent in each phase so far, the current one included."""
        self._account()
        return {phase.value: round(seconds, 3) for phase, seconds in self.phase_seconds.items()}

    # ---- start-up --------------------------------------------------------------------

    def rule(self, settings: dict[str, Any] | None = None) -> AggregationRule:
        """The aggregation rule of a round: config, with patched outer lr and momentum applied."""
        d = self.config.diloco
        lr = settings["outer_lr"] if settings else d.outer_lr
        momentum = settings["outer_momentum"] if settings else d.outer_momentum
        return outer_rule(
            d.rule, lr, momentum, d.nesterov, d.trim_fraction, d.outlier_factor, clip_tau=d.clip_tau, clip_iters=d.clip_iters
        )

    def round_settings(self, round_no: int) -> dict[str, Any]:
        """Settings in force for ``round_no``: config, then operator patches effective by then."""
        cfg = self.config
        base: dict[str, Any] = {
            "inner_steps": cfg.training.inner_steps,
            "outer_lr": cfg.diloco.outer_lr,
            "outer_momentum": cfg.diloco.outer_momentum,
            "codec": cfg.training.codec,
            "round_deadline_s": cfg.training.round_deadline_s,
        }
        lr = self.workload.settings().get("lr")
        if lr is not None:
            base["inner_lr"] = lr
        settings = self.patches_at(base, round_no) if self.patches_at is not None else base
        if settings.get("inner_lr") is not None and settings.get("inner_lr") != lr:
            self.workload.apply_settings({"lr": float(settings["inner_lr"])})
        if settings["codec"] not in CODECS:
            settings["codec"] = cfg.training.codec
        return settings

    async def start(self, data_dir: Any) -> None:
        cfg = self.config
        self.source = MicroshardSource(self.workload, self.store, self.exchange, self.availability, cfg.workload.local_data)
        # (examples, tokens) of each planned microshard: what an update can count for at most.
        self.plan_sizes = {shard_id: (m.source.examples, m.source.tokens) for shard_id, m in self.source.by_id.items()}
        initial = await asyncio.to_thread(self.trainer.initial_weights)
        weights_id = await asyncio.to_thread(store_artifact, self.store, initial, FP32, self.chunking)
        # Pinned at once: the first round ensures (and pins) it only after the sync, and GC may
        # run in between (it did, with a short gc_keep_recent_s: the swarm then lost genesis).
        await asyncio.to_thread(self.store.pin, "genesis", [weights_id])
        genesis = genesis_head(weights_id, self.workload.schema_hash(), self.source.dataset_id, self.rule())
        self.availability.add_held(weights_id)
        self.heads = Heads(
            genesis, self.gossip, self.store, self.exchange, data_dir,
            cfg.training.head_reannounce_s, cfg.training.head_retention,
            verify_ancestors=cfg.training.verify == "verify", trusted=frozenset(cfg.training.trusted_heads),
        )
        self.receipt = Receipt(
            peer_id=self.peer_id, store=self.store, exchange=self.exchange, availability=self.availability,
            gossip=self.gossip, membership=self.membership, heads=self.heads, chunking=self.chunking,
            plan_sizes=self.plan_sizes, ledger=lambda head: self._ledger(head), on_phase=self._enter,
            trust_weights=cfg.training.verify == "trust",
        )
        self.heads.verifier = self.receipt.verify
        self.heads.authors_of = self.receipt.authors
        self.heads.prefetcher = self.receipt.prefetch
        await self.heads.restore()
        self.leasing = Leasing(self.gossip, self.peer_id, self.source.ids, cfg.training.lease_s, cfg.training.lease_settle_s)
        await self.source.seed()
        if self.is_trainer:
            await self.trainer.prepare()
            capability = await asyncio.to_thread(self.workload.probe, cfg.workload.device)
            self.speed = max(capability.steps_per_second, 1e-3)
        log.info("outer_loop_ready", genesis=genesis.id, head=self.heads.adopted, dataset=self.source.dataset_id,
                 microshards=len(self.source.plan), role=cfg.training.role)

    # ---- gossip ----------------------------------------------------------------------

    async def _on_update(self, record: Record) -> None:
        update: UpdateRecord = record.body
        if update.peer != record.author:
            raise Invalid("author_mismatch", "an update speaks for its author only")
        current = self.heads.canonical().round if self.heads else 0
        if not current < update.round <= current + MAX_BUFFERED_ROUNDS:
            self.update_rejections["stale_round"] += 1
            return
        # Bounded by what an honest swarm sends: one update per author and round, at most a
        # head's worth per round, and rounds ahead of ours only from peers we hear as live.
        buffered = self.updates.get(update.round, {})
        if record.id in buffered:
            return
        if record.id in self._set_aside_ids:
            self.update_rejections["set_aside"] += 1
            return
        if update.round > current + 1 and update.peer != self.peer_id and not self.membership.table.is_live(update.peer):
            self.update_rejections["ahead_not_live"] += 1
            return
        earlier = [i for i, other in buffered.items() if other.peer == update.peer]
        if earlier:
            canonical_id = self.heads.canonical().id if self.heads else None
            if update.base != canonical_id or buffered[earlier[0]].base == canonical_id:
                self.update_rejections["second_update_of_author"] += 1
                return
            # An author that retrained on the head we hold (it switched forks): the newer one counts.
            del buffered[earlier[0]]
        if len(buffered) >= MAX_HEAD_UPDATES:
            self.update_rejections["round_full"] += 1
            return
        await asyncio.to_thread(self.store.put_record, record.raw, record.id)
        self.updates.setdefault(update.round, {})[record.id] = update
        if update.peer != self.peer_id:
            with contextlib.suppress(asyncio.QueueFull):
                self._early.put_nowait(update)
        self.updates_by_id[record.id] = update
        if self._state is not None:
            self._offer(record.id, update)

    def _offer(self, update_id: str, update: UpdateRecord) -> None:
        assert self._state is not None
        offer = self._state.offer(update_id, update)
        if offer not in (Offer.ACCEPTED, Offer.DUPLICATE):
            self.update_rejections[offer.name.lower()] += 1
        if offer == Offer.WRONG_BASE and not self._state.counted(update.peer):
            # Its author trained this round on another base: the update it owes will not come,
            # and waiting for it until the deadline would only stall the round.
            self._on_other_base.add(update.peer)
        self._arrived.set()

    async def _on_eval(self, record: Record) -> None:
        result: EvalRecord = record.body
        if self.heads is not None and not self.heads.record_eval(result.head, record.author, result.loss):
            self.update_rejections["eval_of_unknown_head"] += 1

    # ---- the loop --------------------------------------------------------------------

    async def run(self) -> None:
        """The rounds, and the fetchers that pull the round's updates in as they are announced."""
        try:
            async with asyncio.TaskGroup() as tasks:
                for _ in range(EARLY_FETCHERS):
                    tasks.create_task(self._fetch_early())
                if self.config.training.evaluate:
                    tasks.create_task(self._evaluator())
                tasks.create_task(self._rounds())
        finally:
            if self._ahead is not None:  # its training thread stops at the next step boundary
                self.trainer.abandon(self._ahead.cancel)

    async def _fetch_early(self) -> None:
        """Fetch updates of the round being trained as their records arrive, so that when the
        round closes the merge finds its inputs local instead of fetching them one by one."""
        while True:
            update = await self._early.get()
            base = self.heads.canonical() if self.heads is not None else None
            if base is None or (update.base, update.round) != (base.id, base.round + 1):
                continue  # a round already closed, or an update no merge of ours can use
            assert self.receipt is not None
            try:
                await self.receipt.fetch_update(update)
                await self.receipt.measure(update.artifact)
            except (FetchFailed, MissingContent, Invalid, ValueError):
                pass  # the merge fetches it again, or leaves it out for the reason it gives
            except Exception as exc:
                # Fetching ahead only saves the merge time: whatever fails here (a peer's stream
                # that never closes, a local fault) must not stop the fetchers, or the daemon.
                if (held := self._crashes.due(f"early fetch: {type(exc).__name__}: {exc}")) is not None:
                    log.error("early_fetch_failed", update=update.artifact, error=f"{type(exc).__name__}: {exc}",
                              repeated=held)

    async def _rounds(self) -> None:
        assert self.heads is not None
        await self._sync()
        handled: str | None = None
        while True:
            base = self.heads.canonical()
            try:
                if base.id != handled:
                    # Hooks run on every adoption (a rollback re-adopts an old head); evaluation once per head.
                    handled = base.id
                    self._enter(Phase.LOADING)
                    await self._ensure_state(base)
                    await self._retain(base)
                    if self.leasing is not None:
                        merged = (self.updates_by_id.get(update_id) for update_id in base.updates)
                        self.leasing.credit({update.peer for update in merged if update is not None})
                    self._evaluate_soon(base)
                    if self.adopted_hooks:
                        weights = await self._ensure_state(base)
                        for hook in self.adopted_hooks:
                            await hook(base, weights)
                if self.is_trainer:
                    await self._round(base)
                else:
                    await self._follow(base)
            except (FetchFailed, MissingContent, MicroshardUnavailable) as exc:
                self.round_failures += 1
                log.warning("round_failed", round=base.round + 1, error=str(exc)[:300])
                await asyncio.sleep(1.0)
            except Exception as exc:
                # A bug must be loud, but one bad round must not take the peer out of the swarm.
                # The same fault round after round (a full disk) is logged once a minute.
                self.round_failures += 1
                if (held := self._crashes.due(f"{type(exc).__name__}: {exc}")) is not None:
                    log.exception("round_crashed", round=base.round + 1, repeated=held)
                await asyncio.sleep(1.0)

    async def _sync(self) -> None:
        """Listen for the swarm's canonical head before training on a stale one."""
        assert self.heads is not None
        self._enter(Phase.SYNCING)
        listen_s = self.config.training.head_reannounce_s * 1.5
        started = time.monotonic()
        # A head that arrived is still being verified (backfill, fetch, recompute): wait for the
        # verdict, within bounds, rather than start a fork of our own from genesis meanwhile.
        while not self.heads.changed.is_set():
            elapsed = time.monotonic() - started
            if elapsed >= SYNC_MAX_S or (elapsed >= listen_s and not self.heads.verifying):
                return
            try:
                await asyncio.wait_for(self.heads.changed.wait(), 0.25)
            except TimeoutError:
                pass

    async def _follow(self, base: HeadRecord) -> None:
        assert self.heads is not None
        self.view = RoundView(round=base.round, phase=Phase.FOLLOWING, base=base.id)
        await self._ensure_state(base)
        self.heads.changed.clear()
        await self.heads.changed.wait()

    async def _round(self, base: HeadRecord) -> None:
        if await self._catching_up(base):
            return
        # A round trained ahead is this one's when it was begun on a head of which ``base`` is the child.
        ahead, self._ahead = self._ahead, None
        if ahead is not None and (ahead.after, ahead.round) != (base.parent, base.round + 1):
            await self._abandon(ahead, "other_base")
            ahead = None
        try:
            await self._run_round(base, ahead)
        finally:
            if ahead is not None and ahead.task is not None and not ahead.task.done():
                await self._abandon(ahead, "round_failed")  # never leave the trainer waiting for a base

    async def _run_round(self, base: HeadRecord, ahead: Ahead | None) -> None:
        assert self.heads is not None and self.leasing is not None and self.source is not None
        cfg = self.config.training
        round_no = base.round + 1
        settings = self.round_settings(round_no)
        self.current_settings = settings
        ledger = self._ledger(base)
        self.view = RoundView(round=round_no, phase=Phase.LEASING, base=base.id)
        live_trainers = [p for p in self.membership.table.live()
                         if self._is_trainer_peer(p) and not self.leasing.excluded(p)]
        speeds = self._swarm_speeds(base, live_trainers)
        steps, budget_s = inner_budget(self.config.training.inner_budget, settings["inner_steps"], speeds, self.peer_id)
        state = RoundState(round_no, base.id, (), now_ms() + self._deadline_ms(settings["inner_steps"], budget_s))
        self._state = state
        self._on_other_base = set()
        for update_id, update in self.updates.get(round_no, {}).items():
            self._offer(update_id, update)
        weights = await self._ensure_state(base)
        wanted = max(1, math.ceil(steps * self._batch_size() / max(self.source.examples_per_microshard, 1)))
        total_speed = sum(speeds.values())
        # Peers that trained last round will most likely train this one: wait for their
        # claims for a short window even if their claims reach us after ours settled.
        claim_window_ms = now_ms() + int(max(2 * cfg.lease_settle_s, 1.0) * 1000)
        for update_id in base.updates:
            previous = self.updates_by_id.get(update_id)
            if previous is not None and self.membership.table.is_live(previous.peer):
                state.expect(previous.peer)
        if ahead is not None:
            await ahead.claimed.wait()
        shards = await self.leasing.claim(
            ledger.epoch, round_no, ledger.remaining, wanted, speeds[self.peer_id], total_speed, live_trainers
        )
        self.view.leased = len(shards)
        if ahead is not None and (not ahead.shards or ahead.epoch != ledger.epoch or frozenset(ahead.shards) != shards):
            # Nothing was claimed ahead, the head left some of its shards out of the pool, or a rival
            # won some: its data is not all ours to train on. What is held is trained from the head.
            reason = "nothing_claimed" if not ahead.shards else "epoch_moved" if ahead.epoch != ledger.epoch else "shards_lost"
            await self._abandon(ahead, reason)
            ahead = None
        published = False
        if shards and self.heads.adopted == base.id:
            if ahead is not None:
                published = await self._finish_ahead(base, ahead, weights)
            else:
                published = await self._train_and_publish(base, ledger.epoch, sorted(shards), weights, steps, budget_s)
        await self._wait_for_close(base, state, claim_window_ms)
        self.leasing.release_own()
        self._state = None
        if self.heads.adopted != base.id:
            return
        result = state.close(now_ms())
        # A peer that trained on a sibling of the base is not struck while the round has others'
        # updates to merge; when it has none, it is, or a peer holding the last shards could keep
        # answering on a head of its own and the epoch would never end.
        elsewhere = self._on_other_base & result.missing if result.updates else set()
        self.leasing.drop_unfinished(result.missing - elsewhere, elsewhere)
        log.info("round_closed", round=round_no, updates=len(result.updates), reason=result.reason.name.lower(),
                 missing=sorted(result.missing))
        self.emit("round_closed", round=round_no, updates=len(result.updates), reason=result.reason.name.lower(),
                  missing=sorted(result.missing))
        if result.updates and published and self.config.diloco.overlap:
            self._start_ahead(base, ledger, list(result.updates), steps, budget_s, wanted, speeds, live_trainers)
        if result.updates:
            try:
                head = await self._merge_unless_superseded(base, list(result.updates), self.rule(settings))
            except NothingMerged as exc:
                head = None
                self._set_aside(round_no, exc.excluded)
            if head is not None and base.id in (self.heads.adopted, self.heads.canonical().parent):
                # Ours, or a sibling of the head adopted meanwhile: fork choice keeps the heavier.
                self._enter(Phase.ADOPTING)
                await self.heads.add_own(head)
            if head is not None:
                # Updates no merge can use count against their authors like updates that never came.
                unusable = {self.updates_by_id[u].peer for u, reason in head.excluded
                            if reason in UNUSABLE and u in self.updates_by_id}
                self.leasing.drop_unfinished(unusable)
        self._forget_rounds(round_no)
        if self.heads.adopted == base.id:
            # Nothing merged (or we lost the race): give the swarm a moment to move on.
            self.heads.changed.clear()
            try:
                await asyncio.wait_for(self.heads.changed.wait(), 1.0)
            except TimeoutError:
                pass

    async def _merge_unless_superseded(
        self, base: HeadRecord, update_ids: list[str], rule: AggregationRule
    ) -> HeadRecord | None:
        """This round's merge, given up (None) once the swarm adopted a head that makes it moot:
        waiting on an input this peer cannot fetch must not hold the next round. A sibling head
        that left out some of these updates does not: this merge may make the heavier head."""
        assert self.receipt is not None and self.heads is not None
        merging = asyncio.create_task(self.receipt.compute(base, update_ids, rule, own_round=True))
        try:
            while not merging.done():
                self.heads.changed.clear()
                if self._superseded(base, update_ids):
                    merging.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await merging
                    return None
                changed = asyncio.ensure_future(self.heads.changed.wait())
                try:
                    await asyncio.wait({merging, changed}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    changed.cancel()
            return merging.result()
        finally:
            merging.cancel()  # when this peer stops mid-merge

    def _superseded(self, base: HeadRecord, update_ids: list[str]) -> bool:
        """Whether the adopted head leaves nothing for a merge of ``update_ids`` onto ``base`` to add."""
        assert self.heads is not None
        adopted = self.heads.canonical()
        if adopted.id == base.id:
            return False
        if adopted.parent != base.id:
            return True  # the swarm is past this round, or on another branch
        settled = {*adopted.updates, *(u for u, reason in adopted.excluded if reason != UNAVAILABLE)}
        return set(update_ids) <= settled

    async def _catching_up(self, base: HeadRecord) -> bool:
        """Wait (bounded) while a head two or more rounds ahead is being verified: training on a
        base the swarm has left behind is wasted work, and it slows the verification down.
        Only heads from authors with no rejected head count, and the wait per base is bounded,
        so a forger cannot hold training up for long."""
        assert self.heads is not None
        if self._catch_up_base != base.id:
            self._catch_up_base, self._catch_up_since = base.id, time.monotonic()
        if not (self.heads.verifying and self.heads.heard_round >= base.round + 2):
            return False
        if time.monotonic() - self._catch_up_since > CATCH_UP_MAX_S:
            if self._catch_up_given_up != base.id:
                self._catch_up_given_up = base.id
                log.warning("catch_up_gave_up", base_round=base.round, heard_round=self.heads.heard_round,
                            waited_s=round(time.monotonic() - self._catch_up_since, 1))
            return False
        self.view = RoundView(round=base.round + 1, phase=Phase.CATCHING_UP, base=base.id)
        self.heads.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.heads.changed.wait(), 1.0)
        return True

    def _swarm_speeds(self, base: HeadRecord, live_trainers: list[str]) -> dict[str, float]:
        """Inner steps per second of this peer and each live trainer, as every peer sees them.

        A peer whose update was merged into the base head is credited with that update's measured
        steps per second of inner time: every peer holds those records, so every peer computes
        the same shares of the data and the same time budget, and an epoch's last microshards
        are split in one round instead of trickling out over several. Other peers (first round,
        newcomers) count at the speed their heartbeats announce."""
        merged = (self.updates_by_id.get(update_id) for update_id in base.updates)
        measured = measured_speeds((u.peer, u.metrics.steps, u.metrics.inner_ms) for u in merged if u is not None)
        speeds = {peer: measured.get(peer) or self._peer_speed(peer) for peer in live_trainers}
        speeds[self.peer_id] = measured.get(self.peer_id) or self.speed
        return {peer: max(speed, 1e-3) for peer, speed in speeds.items()}

    def _observe_speed(self, metrics: Any) -> None:
        """Fold a round's measured inner steps per second into ``speed`` (what heartbeats announce)."""
        if metrics.steps >= 2 and metrics.seconds > 0:
            observed = metrics.steps / metrics.seconds
            self.speed = max(0.5 * self.speed + 0.5 * observed, 1e-3)

    async def _train_and_publish(
        self,
        base: HeadRecord,
        epoch: int,
        shards: list[str],
        weights: dict[str, torch.Tensor],
        max_steps: int,
        budget_s: float | None,
    ) -> bool:
        """Train the round on ``shards`` from ``base`` and publish the update; whether it was published."""
        assert self.source is not None and self.leasing is not None
        self._enter(Phase.TRAINING)
        try:
            data = await self.source.bytes_of(shards)
        except MicroshardUnavailable as exc:
            log.warning("microshards_unavailable", error=str(exc))
            self.leasing.back_off()
            return False
        steps = self._steps_for(shards, max_steps)
        seed = int.from_bytes(canonical.encode([base.id, self.peer_id])[-8:], "big") % (2**31)
        done = asyncio.Event()
        watcher = asyncio.create_task(self._abort_if_superseded(base, done))
        renewer = asyncio.create_task(self.leasing.renew_while(done))
        try:
            result = await self.trainer.train_round(
                weights, data, steps, seed, time_budget_s=budget_s, keep_local=self.config.diloco.overlap
            )
        except Exception as exc:  # a workload bug must not take the peer out of the swarm
            self._training_failed(exc)
            return False
        finally:
            done.set()
            await asyncio.gather(watcher, renewer, return_exceptions=True)
        return await self._publish_update(base, epoch, shards, result)

    def _training_failed(self, exc: Exception) -> None:
        # The same fault round after round (a full disk) is logged once a minute.
        assert self.leasing is not None
        if (held := self._crashes.due(f"training: {type(exc).__name__}: {exc}")) is not None:
            log.error("training_failed", error=f"{type(exc).__name__}: {exc}", exc_info=True, repeated=held)
        self.round_failures += 1
        self.leasing.back_off()

    async def _publish_update(self, base: HeadRecord, epoch: int, shards: list[str], result: InnerResult) -> bool:
        """Store the round's pseudo-gradient and gossip its update record; whether it was published."""
        assert self.leasing is not None
        self.leasing.recovered()
        if self.trainer.interrupted or self.heads.adopted != base.id:  # type: ignore[union-attr]
            return False
        settings = self.current_settings
        self._observe_speed(result.metrics)
        if result.metrics.steps:
            self.inner_step_ms.append(result.metrics.seconds * 1000 / result.metrics.steps)
            del self.inner_step_ms[:-20]
        codec = CODECS[settings["codec"]]
        binding = update_binding(self.peer_id, base.id, base.round + 1)
        artifact = await asyncio.to_thread(store_artifact, self.store, result.delta, codec, self.chunking, binding)
        self.availability.add_held(artifact)
        update = UpdateRecord(
            round=base.round + 1, base=base.id, artifact=artifact, codec=settings["codec"],
            samples=result.metrics.examples, tokens=result.metrics.tokens, microshards=tuple(sorted(shards)),
            epoch=epoch,
            metrics=InnerMetrics(loss=float(result.metrics.loss_mean), steps=result.metrics.steps,
                                 inner_ms=int(result.metrics.seconds * 1000)),
            peer=self.peer_id,
        )
        self._enter(Phase.PUBLISHING)
        raw = await self.gossip.publish(UPDATE, UPDATE_VERSION, update.to_wire())
        if raw is not None:
            record = self.gossip.validate(raw)
            await self._on_update(record)
        log.info("update_published", round=update.round, loss=round(update.metrics.loss, 4), samples=update.samples,
                 microshards=len(shards), steps=result.metrics.steps, seconds=round(result.metrics.seconds, 2),
                 stopped_early=result.metrics.stopped_early)
        with contextlib.suppress(MissingContent, Invalid, ValueError):
            await self.receipt.measure(artifact)  # type: ignore[union-attr]  # while the others' updates are still coming in
        return True

    def _steps_for(self, shards: list[str], max_steps: int) -> int:
        """Inner steps for ``shards``: at most ``max_steps``, and no more than their examples fill."""
        assert self.source is not None
        examples = sum(self.source.by_id[s].source.examples for s in shards)
        return max(1, min(max_steps, math.ceil(examples / max(self._batch_size(), 1))))

    # ---- overlap: the next round trained while this one's head is merged -------------

    def _start_ahead(
        self,
        base: HeadRecord,
        ledger: EpochLedger,
        update_ids: list[str],
        steps: int,
        budget_s: float | None,
        wanted: int,
        speeds: dict[str, float],
        live_trainers: list[str],
    ) -> None:
        """Begin the round after ``base``'s child while that child is merged: claim the shards its
        pool will most likely hold (this pool less the closed round's updates' and leases' shards,
        or a new epoch's when that empties it) and train them from the local weights."""
        assert self.leasing is not None
        consumed = set(self.leasing.book.leased())
        for update_id in update_ids:
            update = self.updates_by_id.get(update_id)
            if update is not None:
                consumed.update(update.microshards)
        epoch, free = ledger.next_pool(consumed)
        ahead = Ahead(after=base.id, round=base.round + 2, epoch=epoch, steps=steps, budget_s=budget_s)
        ahead.task = asyncio.create_task(self._train_ahead(ahead, base, free, wanted, speeds, live_trainers))
        self._ahead = ahead

    async def _train_ahead(
        self,
        ahead: Ahead,
        base: HeadRecord,
        free: frozenset[str],
        wanted: int,
        speeds: dict[str, float],
        live_trainers: list[str],
    ) -> InnerResult | None:
        assert self.leasing is not None and self.source is not None
        shards: frozenset[str] = frozenset()
        try:
            if ahead.cancel.is_set():
                return None
            shards = await self.leasing.claim_ahead(
                ahead.epoch, ahead.round, free, wanted, speeds[self.peer_id], sum(speeds.values()), live_trainers
            )
            ahead.shards = tuple(sorted(shards))
        finally:
            ahead.claimed.set()
        if not shards:
            return None
        try:
            data = await self.source.bytes_of(list(ahead.shards))
        except MicroshardUnavailable as exc:
            log.warning("microshards_unavailable", error=str(exc), ahead=True)
            return None
        seed = int.from_bytes(canonical.encode([base.id, self.peer_id, "ahead"])[-8:], "big") % (2**31)
        done = asyncio.Event()
        renewer = asyncio.create_task(self.leasing.renew_while(done))
        try:
            return await self.trainer.train_ahead(
                data, self._steps_for(list(ahead.shards), ahead.steps), seed, ahead.budget_s, cancel=ahead.cancel
            )
        finally:
            done.set()
            await asyncio.gather(renewer, return_exceptions=True)

    async def _finish_ahead(self, base: HeadRecord, ahead: Ahead, weights: dict[str, torch.Tensor]) -> bool:
        """Rebase the round trained ahead onto ``base`` (its base head), let it finish, publish it."""
        assert ahead.task is not None and self.leasing is not None
        self._enter(Phase.TRAINING)
        self.trainer.rebase(weights)
        done = asyncio.Event()
        watcher = asyncio.create_task(self._abort_if_superseded(base, done))
        renewer = asyncio.create_task(self.leasing.renew_while(done))
        try:
            result = await ahead.task
        except Exception as exc:  # a workload bug must not take the peer out of the swarm
            self._training_failed(exc)
            self.overlap["abandoned_failed"] += 1
            return False
        finally:
            done.set()
            await asyncio.gather(watcher, renewer, return_exceptions=True)
        if result is None:
            self.overlap["abandoned_superseded"] += 1
            return False
        self.overlap["used"] += 1
        return await self._publish_update(base, ahead.epoch, list(ahead.shards), result)

    async def _abandon(self, ahead: Ahead, reason: str) -> None:
        """Stop a round trained ahead that cannot be used; its claim is dropped (it expires)."""
        assert self.leasing is not None
        self.overlap[f"abandoned_{reason}"] += 1
        self.trainer.abandon(ahead.cancel)
        if ahead.task is not None:
            with contextlib.suppress(Exception):
                await ahead.task
        if self.leasing.ahead is not None and self.leasing.ahead.round == ahead.round:
            self.leasing.drop_ahead()
        log.info("ahead_abandoned", round=ahead.round, reason=reason)

    async def _abort_if_superseded(self, base: HeadRecord, done: asyncio.Event) -> None:
        assert self.heads is not None
        while not done.is_set():
            self.heads.changed.clear()
            if self.heads.adopted != base.id:
                self.trainer.request_stop()
                return
            waiter = asyncio.ensure_future(self.heads.changed.wait())
            finisher = asyncio.ensure_future(done.wait())
            await asyncio.wait({waiter, finisher}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            finisher.cancel()

    async def _wait_for_close(self, base: HeadRecord, state: RoundState, claim_window_ms: int) -> None:
        assert self.heads is not None and self.leasing is not None
        self._enter(Phase.WAITING)
        while self.heads.adopted == base.id:
            claimants = self.leasing.participants()
            for peer in claimants:
                state.expect(peer)
            for peer in list(state.expected):
                no_claim = now_ms() > claim_window_ms and peer not in claimants
                alive = peer == self.peer_id or self.membership.table.is_live(peer)
                # A peer whose leases kept ending without a usable update is not waited for.
                struck = peer != self.peer_id and self.leasing.excluded(peer)
                unusable = peer in self._on_other_base
                state.set_live(peer, alive and not no_claim and not struck and not unusable)
            if state.should_close(now_ms()):
                return
            if not state.updates and not state.waiting_for and not self.leasing.own and now_ms() > claim_window_ms:
                # Nothing arrived and no live peer owes anything (the leaseholders died): waiting
                # for the deadline would only delay the retry with the dead peers' shards freed.
                return
            self.view.expected = sorted(state.expected)
            self.view.waiting_for = sorted(state.waiting_for)
            self.view.deadline_in_s = round((state.deadline_ms - now_ms()) / 1000, 1)
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), 0.25)
            except TimeoutError:
                pass

    def _set_aside(self, round_no: int, excluded: Sequence[tuple[str, str]]) -> None:
        """Every update of the round was left out of its merge: keep them out of its retries.

        Otherwise the retry closes on the same updates and merges nothing again, for ever, and
        the shards they hold are never trained by anyone else: a peer that wins an epoch's last
        shards and answers with an update no merge can use would stall the swarm. Their authors
        are struck, so their leases are released now and, struck again, ignored for a while.
        """
        assert self.leasing is not None
        self.rounds_without_head += 1
        buffered = self.updates.get(round_no, {})
        authors = set()
        for update_id, reason in excluded:
            self._set_aside_ids[update_id] = round_no
            update = buffered.pop(update_id, None) or self.updates_by_id.get(update_id)
            if update is not None and (reason in UNUSABLE or reason == UNAVAILABLE):
                authors.add(update.peer)
        while len(self._set_aside_ids) > MAX_SET_ASIDE:
            del self._set_aside_ids[next(iter(self._set_aside_ids))]
        self.leasing.drop_unfinished(authors)
        log.warning("round_merged_nothing", round=round_no, excluded=dict(excluded), struck=sorted(authors))

    def _forget_rounds(self, closed_round: int) -> None:
        for update_id in [i for i, r in self._set_aside_ids.items() if r < closed_round]:
            del self._set_aside_ids[update_id]
        for round_no in [r for r in self.updates if r < closed_round]:
            del self.updates[round_no]
        keep = {i for updates in self.updates.values() for i in updates}
        for update_id in [i for i, u in self.updates_by_id.items() if u.round < closed_round - 2 and i not in keep]:
            del self.updates_by_id[update_id]

    # ---- merge and verification ------------------------------------------------------

    def _ledger(self, base: HeadRecord) -> EpochLedger:
        assert self.heads is not None and self.source is not None
        chain = [h for h in self.heads.index.chain(base.id) if h.parent is not None]
        epoch_start = [h for h in chain if h.epoch == base.epoch]
        ledger = replay(self.source.ids, epoch_start) if epoch_start else EpochLedger.start(self.source.ids, base.epoch)
        return ledger.rolled() if ledger.complete else ledger

    async def _ensure_state(self, head: HeadRecord) -> dict[str, torch.Tensor]:
        """The head's weights as fp32 tensors, its weights and momentum fetched from peers if we lack them.

        Only the weights are held in memory, and only one head's: the momentum is read slice by
        slice from the store by the merge.
        """
        cached = self._weights_cache
        if cached is not None and cached[0] == head.id:
            return cached[1]
        self._weights_cache = None  # the old head's tensors go before the new ones come
        assert self.receipt is not None
        if head.momentum is not None:
            await self.receipt.stored(head.momentum)
        weights = await self.receipt.load(head.weights)
        self._weights_cache = (head.id, weights)
        return weights

    async def _retain(self, head: HeadRecord) -> None:
        """Pin what the swarm needs of the adopted ``head``; GC collects the rest.

        Kept: the head's and its parent's weights and momentum (what this peer builds on and
        what a peer one round behind fetches), the update records and artifacts merged in the
        last ``store.keep_update_rounds`` rounds (what a peer that far behind recomputes to
        verify its way here), and every ``store.checkpoint_every`` rounds a checkpoint, of
        which the newest ``store.keep_checkpoints`` stay.
        """
        assert self.heads is not None
        cfg = self.config.store
        chain = list(itertools.islice(self.heads.index.ancestors(head.id), max(cfg.keep_update_rounds, 2)))
        pins: dict[str, list[str]] = {"head": state_ids(chain[0]), "head-parent": []}
        if len(chain) > 1:
            pins["head-parent"] = state_ids(chain[1])
        updates: list[str] = []
        for kept in chain[: cfg.keep_update_rounds]:
            for update_id in kept.updates:
                update = self.updates_by_id.get(update_id) or await asyncio.to_thread(self.receipt.stored_update, update_id)  # type: ignore[union-attr]
                updates.extend([update_id, update.artifact] if update is not None else [update_id])
        pins["updates"] = updates
        if cfg.checkpoint_every and head.round and head.round % cfg.checkpoint_every == 0 and cfg.keep_checkpoints:
            pins[f"checkpoint-{head.round:012d}"] = state_ids(head)
        await asyncio.to_thread(self._pin_all, pins, cfg.keep_checkpoints)

    def _pin_all(self, pins: dict[str, list[str]], keep_checkpoints: int) -> None:
        for name, ids in pins.items():
            self.store.pin(name, ids)
        names = self.store.pins()
        for name in names:
            if name.startswith("head-") and name[5:].isdigit():
                self.store.unpin(name)  # a pin per head of older versions, kept 200 heads' weights
        checkpoints = sorted(name for name in names if name.startswith("checkpoint-"))
        for name in checkpoints[: max(len(checkpoints) - keep_checkpoints, 0)]:
            self.store.unpin(name)

    def _evaluate_soon(self, head: HeadRecord) -> None:
        """Ask the evaluator for ``head``'s validation loss; a newer head asked for replaces it."""
        assert self.heads is not None
        if self.config.training.evaluate and self.peer_id not in self.heads.eval.get(head.id, {}):
            self._eval_next = head
            self._eval_wake.set()

    async def _evaluator(self) -> None:
        """Evaluate adopted heads off the round's path, one at a time, the newest asked for first;
        a head that is no longer canonical when its turn comes is skipped."""
        assert self.heads is not None
        while True:
            await self._eval_wake.wait()
            self._eval_wake.clear()
            head, self._eval_next = self._eval_next, None
            if head is None or head.id != self.heads.canonical().id:
                continue
            started = time.monotonic()
            try:
                await self._evaluate(head)
            except Exception as exc:  # a workload bug in evaluation must not stop the evaluator
                if (held := self._crashes.due(f"evaluation: {type(exc).__name__}: {exc}")) is not None:
                    log.error("evaluation_failed", error=f"{type(exc).__name__}: {exc}", exc_info=True, repeated=held)
            finally:
                self.eval_seconds += time.monotonic() - started

    async def _evaluate(self, head: HeadRecord) -> None:
        # The round's cached weights when they are this head's; otherwise read, and not cached
        # in their place: the round may have moved on to another head already.
        cached = self._weights_cache
        try:
            weights = cached[1] if cached is not None and cached[0] == head.id else await self.receipt.load(head.weights)  # type: ignore[union-attr]
        except (FetchFailed, MissingContent):
            return
        metrics = await self.trainer.evaluate(weights)
        assert self.heads is not None
        self.heads.record_eval(head.id, self.peer_id, metrics.loss)
        log.info("head_evaluated", head=head.id, round=head.round, val_loss=round(metrics.loss, 4))
        await self.gossip.publish(EVAL_KIND, EVAL_VERSION, EvalRecord(head.id, "val", metrics.loss, metrics.examples).to_wire())

    # ---- helpers ---------------------------------------------------------------------

    def _deadline_ms(self, inner_steps: int, budget_s: float | None) -> int:
        """How long this round waits for updates: a patched or configured deadline, or else 1.5x
        the expected inner loop (H steps at the observed time per step, or the time budget) plus
        a margin. Per step, so a short round at an epoch's end does not shrink the next one's."""
        cfg = self.config.training
        patched = self.current_settings.get("round_deadline_s", cfg.round_deadline_s)
        if patched and patched > 0:
            return int(patched * 1000)
        if budget_s is not None:
            expected = [int(budget_s * 1000)]
        else:
            per_step = self.inner_step_ms[-20:] + [
                u.metrics.inner_ms / u.metrics.steps
                for updates in self.updates.values() for u in updates.values() if u.metrics.steps > 0
            ]
            expected = [int(ms * inner_steps) for ms in per_step] or [int(inner_steps / self.speed * 1000)]
        return adaptive_deadline_ms(
            expected, min_ms=int(cfg.min_round_deadline_s * 1000), max_ms=int(cfg.max_round_deadline_s * 1000),
            margin_ms=int(cfg.lease_settle_s * 1000) + 2000,
        )

    def _batch_size(self) -> int:
        return int(self.workload.settings().get("batch_size", 1))

    def _is_trainer_peer(self, peer: str) -> bool:
        state = self.membership.table.peers.get(peer)
        return state is not None and state.heartbeat.role == "trainer"

    def _peer_speed(self, peer: str) -> float:
        state = self.membership.table.peers.get(peer)
        if state is None:
            return 0.0
        milli = dict(state.heartbeat.capabilities).get("steps_per_s_milli", 0)
        return milli / 1000 if isinstance(milli, int) and milli > 0 else self.speed

    def heartbeat_fields(self) -> dict[str, Any]:
        head = self.heads.canonical() if self.heads else None
        return {
            "head": head.id if head else None,
            "round": head.round if head else 0,
            "device": self.config.workload.device,
            "capabilities": {"steps_per_s_milli": int(self.speed * 1000), "phase": self.view.phase.value},
        }

    def utilisation(self) -> float:
        return self.trainer.inner_seconds / max(time.monotonic() - self.started, 1e-6)
