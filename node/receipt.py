"""The merge receipt: the head a set of updates gives on a parent, computed and verified alike.

``compute`` merges a round's updates into a head, streaming from the store; ``verify``
checks a head another peer announced by computing it again from the same inputs (or, when
this peer merged those very inputs itself, by comparing ids). Both fetch what they lack.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch

from node.artifacts import MissingContent, load_artifact
from node.availability import Availability
from node.exchange import Exchange, FetchFailed
from node.gossip import Gossip
from node.heads import Heads
from node.logs import get_logger
from node.membership import Membership
from node.merge import NothingMerged, rule_problem
from node.store import ContentStore
from node.streaming_merge import StoredUpdate, merge_from_store, update_norm
from protocol import canonical
from protocol.chunking import Chunking
from protocol.coverage import EpochLedger, select_updates
from protocol.errors import Invalid
from protocol.heads import AggregationRule, HeadRecord, reference_norm
from protocol.kinds import UPDATE
from protocol.rounds import Phase
from protocol.updates import UpdateRecord, credit, update_binding

log = get_logger("diloco")

UPDATE_AUTHORS = 8192  # update records' authors remembered for the fork choice, the oldest forgotten first
PREFETCH_PARALLEL = 8  # update inputs of unknown ancestors fetched at once ahead of their recompute
KNOWN_NORMS = 512  # norms of fetched update artifacts, measured while the round trains
JOIN_OWN_MERGE_S = 10.0  # longest a verification waits for this peer's own merge of the same inputs
COMPUTED_HEADS = 64  # heads this peer merged itself, by their inputs: an announced twin is adopted by id
UNAVAILABLE = "unavailable"  # an exclusion reason that records what the merger could fetch, not the inputs
UNBOUND = "unbound_artifact"  # the artifact was made for another peer, base or round (a replay or a copy)


class UnboundArtifact(Exception):
    """An update's artifact names another author, base or round than its record."""


def state_ids(head: HeadRecord) -> list[str]:
    """The manifests a peer builds on ``head`` from: its weights and momentum."""
    return [head.weights] + ([head.momentum] if head.momentum is not None else [])


def _merge_key(parent: str | None, rule: AggregationRule, inputs: Iterable[str]) -> tuple[Any, ...]:
    """The inputs of a merge as its caller knows them before fetching: parent, rule, update ids."""
    return (parent, canonical.encode(rule.to_wire()), tuple(sorted(set(inputs))))


def _inputs_key(head: HeadRecord) -> tuple[Any, ...]:
    """What a head is computed from: its merge's inputs and those the merger took as unavailable."""
    absent = sorted(update_id for update_id, reason in head.excluded if reason == UNAVAILABLE)
    inputs = [*head.updates, *(update_id for update_id, _ in head.excluded)]
    return (*_merge_key(head.parent, head.rule, inputs), tuple(absent))


class Receipt:
    """Computes heads from updates and verifies heads from their inputs, for one peer."""

    def __init__(
        self,
        *,
        peer_id: str,
        store: ContentStore,
        exchange: Exchange,
        availability: Availability,
        gossip: Gossip,
        membership: Membership,
        heads: Heads,
        chunking: Chunking,
        plan_sizes: dict[str, tuple[int, int]],
        ledger: Callable[[HeadRecord], EpochLedger],
        on_phase: Callable[[Phase], None],
        trust_weights: bool = False,
    ) -> None:
        """``ledger`` gives the epoch's coverage as of a head; ``on_phase`` hears the round
        loop's own merge move from fetching to merging; ``trust_weights`` (``training.verify =
        "trust"``) accepts a head whose weights can be fetched without recomputing it."""
        self.peer_id = peer_id
        self.store = store
        self.exchange = exchange
        self.availability = availability
        self.gossip = gossip
        self.membership = membership
        self._heads = heads
        self.chunking = chunking
        self.plan_sizes = plan_sizes
        self._ledger = ledger
        self._on_phase = on_phase
        self._trust_weights = trust_weights
        self.verifications: Counter[str] = Counter()  # how announced heads were checked
        self.merges = 0  # merges run, own rounds' and recomputes alike
        self._computed: OrderedDict[tuple[Any, ...], str] = OrderedDict()
        self._merging: dict[tuple[Any, ...], asyncio.Future[None]] = {}  # own rounds' merges in progress
        self._norms: OrderedDict[str, float] = OrderedDict()  # by artifact id: content-addressed, so exact
        self._update_authors: dict[str, str] = {}  # update record id -> its author: the fork choice's input

    async def compute(
        self,
        base: HeadRecord,
        update_ids: list[str],
        rule: AggregationRule,
        absent: frozenset[str] = frozenset(),
        strict: bool = False,
        own_round: bool = False,
    ) -> HeadRecord:
        """The head that merging ``update_ids`` onto ``base`` under ``rule`` gives: a pure function of
        them. NothingMerged, naming every update and why it was left out, when none can go in.

        An update whose record or artifact cannot be had is excluded as ``unavailable``; that is
        the merger's observation, not a function of the inputs, so a verifier takes the head's
        word for it (``absent``) and, with ``strict``, raises FetchFailed for any other input it
        cannot get rather than compute a different head. ``own_round``: this is the round loop's
        merge, whose phases (fetching, merging) the round's view shows.

        The merge streams from the store (``merge_from_store``): the parent's weights and
        momentum and every update are read a slice at a time and the new weights and momentum
        written as they are computed, so memory does not grow with the model or the swarm.
        """
        if not own_round:
            return await self._compute(base, update_ids, rule, absent, strict, own_round)
        # An announced head with these inputs waits for this merge instead of running its own.
        key = _merge_key(base.id, rule, update_ids)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._merging[key] = done
        try:
            return await self._compute(base, update_ids, rule, absent, strict, own_round)
        finally:
            done.set_result(None)
            if self._merging.get(key) is done:
                del self._merging[key]

    async def _compute(
        self,
        base: HeadRecord,
        update_ids: list[str],
        rule: AggregationRule,
        absent: frozenset[str],
        strict: bool,
        own_round: bool,
    ) -> HeadRecord:
        records: dict[str, UpdateRecord] = {}
        dropped: list[tuple[str, str]] = []
        for update_id in sorted(set(update_ids)):
            update = None if update_id in absent else await self.update_record(update_id)
            if update is None and strict and update_id not in absent:
                raise FetchFailed(f"update record {update_id} is unavailable")
            if update is None:
                dropped.append((update_id, UNAVAILABLE))
            elif (update.base, update.round) != (base.id, base.round + 1):
                dropped.append((update_id, "wrong_base"))
            else:
                records[update_id] = update
        ledger = self._ledger(base)
        if own_round:
            self._on_phase(Phase.FETCHING)
        while True:
            # Select as a verifier will: without the updates found unavailable, whose shards stay free.
            selection = select_updates(ledger, records)
            inputs: list[StoredUpdate] = []
            for update_id in selection.included:
                update = records[update_id]
                try:
                    await self._ready_update(update)
                except UnboundArtifact:
                    # A function of the inputs (the record and the artifact's manifest): a
                    # verifier finds the same, and its shards stay free for an honest peer.
                    dropped.append((update_id, UNBOUND))
                    del records[update_id]
                    break
                except FetchFailed as exc:
                    if strict:
                        raise
                    log.warning("update_unavailable", update=update_id, error=str(exc)[:200])
                    dropped.append((update_id, UNAVAILABLE))
                    del records[update_id]
                    break
                samples, _ = credit(update, self.plan_sizes)
                inputs.append(StoredUpdate(update_id, samples, update.artifact))
            else:
                break
        for state_id in state_ids(base):
            await self.stored(state_id)
        bound = reference_norm(self._heads.index.ancestors(base.id))
        if own_round:
            self._on_phase(Phase.MERGING)
        self.merges += 1
        try:
            result = await asyncio.to_thread(
                merge_from_store, self.store, base.weights, base.momentum, inputs, rule,
                reference_norm=bound, chunking=self.chunking,
                norms={u.artifact: self._norms[u.artifact] for u in inputs if u.artifact in self._norms},
            )
        except NothingMerged as exc:
            raise NothingMerged([*dropped, *selection.excluded, *exc.excluded]) from None
        included = [records[i] for i in result.included]
        credited = [credit(u, self.plan_sizes) for u in included]
        samples = sum(c[0] for c in credited)
        tokens = sum(c[1] for c in credited)
        head = HeadRecord(
            parent=base.id, round=base.round + 1, epoch=ledger.epoch,
            updates=result.included,
            excluded=tuple(sorted((*dropped, *selection.excluded, *result.excluded))),
            rule=rule, weights=result.weights_id, momentum=result.momentum_id,
            samples_total=base.samples_total + samples, tokens_total=base.tokens_total + tokens,
            samples=samples, tokens=tokens,
            microshards=tuple(sorted({s for u in included for s in u.microshards})),
            eval=None, workload=base.workload, dataset=base.dataset, rollback=self._heads.marker_for(base),
            update_norm=result.median_norm,
        )
        self.availability.add_held(result.weights_id)
        self.availability.add_held(result.momentum_id)
        self._computed[_inputs_key(head)] = head.id
        while len(self._computed) > COMPUTED_HEADS:
            self._computed.popitem(last=False)
        return head

    async def verify(self, head: HeadRecord) -> str | None:
        """None if ``head`` is what its inputs give; otherwise why it is rejected."""
        parent = self._heads.index.get(head.parent) if head.parent else None
        if parent is None:
            return "unknown_parent"
        problem = rule_problem(head.rule)
        if problem is not None:
            return problem
        if self._trust_weights:
            try:
                for state_id in state_ids(head):
                    await self.stored(state_id)
            except (FetchFailed, MissingContent):
                return "weights_unavailable"
            return None
        inputs = [*head.updates, *(update_id for update_id, _ in head.excluded)]
        absent = frozenset(update_id for update_id, reason in head.excluded if reason == UNAVAILABLE)
        running = self._merging.get(_merge_key(head.parent, head.rule, inputs))
        if running is not None and not absent:
            # This peer is merging the same inputs itself: compare with that, unless it takes long
            # (it may be waiting on an input the announcer could fetch and this peer cannot, yet).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(running), JOIN_OWN_MERGE_S)
        if self._computed.get(_inputs_key(head)) == head.id:
            # This peer merged the same inputs onto the same parent itself and got this very head.
            self.verifications["matched_own_merge"] += 1
            return None
        self.verifications["recomputed"] += 1
        try:
            recomputed = await self.compute(parent, inputs, head.rule, absent, strict=True)
        except (FetchFailed, MissingContent) as exc:
            log.info("verify_inputs_unavailable", head=head.id, error=str(exc)[:200])
            return "inputs_unavailable"
        except NothingMerged:
            return "recompute_mismatch"  # its inputs give no head at all
        if recomputed.id != head.id:
            return "recompute_mismatch"
        return None

    async def prefetch(self, heads: list[HeadRecord]) -> None:
        """Fetch the update records and artifacts ``heads`` merged, a few at a time, ahead of the
        recomputes that need them; what cannot be had now is left for the recompute to report."""
        gate = asyncio.Semaphore(PREFETCH_PARALLEL)

        async def one(update_id: str) -> None:
            async with gate:
                update = await self.update_record(update_id)
                if update is not None:
                    with contextlib.suppress(FetchFailed, MissingContent):
                        await self.fetch_update(update)

        async with asyncio.TaskGroup() as tasks:
            for head in heads:
                for update_id in head.updates:
                    tasks.create_task(one(update_id))

    async def _ready_update(self, update: UpdateRecord) -> None:
        """Have an update's artifact in the store for the merge. FetchFailed when unavailable,
        UnboundArtifact when its artifact was made for another update. Bytes that do not
        parse are left for the merge's screen, which excludes the update as undecodable."""
        try:
            await self.fetch_update(update)
        except (MissingContent, Invalid, ValueError) as exc:
            log.warning("update_undecodable", artifact=update.artifact, error=str(exc)[:200])
            return
        manifest = await asyncio.to_thread(self.store.get_manifest, update.artifact)
        if manifest is not None and manifest.binding != update_binding(update.peer, update.base, update.round):
            raise UnboundArtifact(update.artifact)

    async def fetch_update(self, update: UpdateRecord) -> None:
        """Fetch an update's artifact; FetchFailed early once its author is dead and no one else holds it.

        Without the early end a peer killed right after publishing would hold every merge of
        its round for the exchange's whole stall timeout.
        """
        # Always through the exchange: a fetch of this artifact may be half done right now,
        # and joining it is what waits for the remaining chunks. The fetch itself is shielded
        # in the exchange; cancelling ``waiter`` only ends our wait.
        waiter = asyncio.ensure_future(self.exchange.fetch(update.artifact, hints=(update.peer,)))
        try:
            while True:
                done, _ = await asyncio.wait({waiter}, timeout=0.5)
                if done:
                    waiter.result()
                    return
                holders = [p for p in self.availability.providers(update.artifact).full if p != self.peer_id]
                if update.peer != self.peer_id and not self.membership.table.is_live(update.peer) and not holders:
                    raise FetchFailed(f"{update.artifact}: its author left and no one else holds it")
        finally:
            waiter.cancel()

    async def update_record(self, update_id: str) -> UpdateRecord | None:
        raw = await asyncio.to_thread(self.store.get_record, update_id)
        if raw is None:
            raw = await self.exchange.fetch_record(update_id)
        return None if raw is None else self._parse_update(raw, update_id)

    def stored_update(self, update_id: str) -> UpdateRecord | None:
        raw = self.store.get_record(update_id)
        return None if raw is None else self._parse_update(raw, update_id)

    def authors(self, head: HeadRecord) -> frozenset[str]:
        """The peers whose updates ``head`` merged, from the signed update records seen or stored here."""
        found = set()
        for update_id in head.updates:
            peer = self._update_authors.get(update_id)
            if peer is None and (update := self.stored_update(update_id)) is not None:
                peer = update.peer
            if peer is not None:
                found.add(peer)
        return frozenset(found)

    def _parse_update(self, raw: bytes, update_id: str) -> UpdateRecord | None:
        """The update a stored or fetched signed record carries; None for anything else."""
        try:
            record = self.gossip.validate_stored(raw)
        except Invalid:
            return None
        if record.kind != UPDATE or record.body.peer != record.author or record.id != update_id:
            return None
        self._update_authors[update_id] = record.author
        while len(self._update_authors) > UPDATE_AUTHORS:
            del self._update_authors[next(iter(self._update_authors))]
        return record.body  # type: ignore[no-any-return]

    async def measure(self, artifact: str) -> None:
        """Measure a fetched update's norm now, so that the merge's screen need not read it twice."""
        if artifact in self._norms:
            return
        norm = await asyncio.to_thread(update_norm, self.store, artifact)
        self._norms[artifact] = norm
        while len(self._norms) > KNOWN_NORMS:
            self._norms.popitem(last=False)

    async def stored(self, manifest_id: str) -> None:
        """Make sure an artifact is whole in the store, fetching what is missing from peers."""
        manifest = await asyncio.to_thread(self.store.get_manifest, manifest_id)
        missing = [] if manifest is None else await asyncio.to_thread(self.store.missing, [c.cid for c in manifest.chunks])
        if manifest is None or missing:
            await self.exchange.fetch(manifest_id)
            self.availability.add_held(manifest_id)

    async def load(self, manifest_id: str) -> dict[str, torch.Tensor]:
        try:
            return await asyncio.to_thread(load_artifact, self.store, manifest_id)
        except MissingContent:
            await self.exchange.fetch(manifest_id)
            self.availability.add_held(manifest_id)
            return await asyncio.to_thread(load_artifact, self.store, manifest_id)
