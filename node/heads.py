"""Heads: the index of known heads, fork choice, gossip of head records, verification and persistence."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from node.exchange import Exchange
from node.gossip import Gossip
from node.logs import Repeats, get_logger
from node.store import ContentStore, write_atomic
from protocol import canonical
from protocol.cid import matches
from protocol.errors import Invalid
from protocol.control import RollbackRecord
from protocol.heads import HeadIndex, HeadRecord, fork_rank
from protocol.kinds import HEAD
from protocol.records import Record

log = get_logger("heads")

HEAD_VERSION = 1
STATE_FILE = "heads.json"
MAX_BACKFILL = 10_000
MAX_ROLLBACKS = 1024  # operator rollbacks remembered (and saved); the earliest issued go first
MAX_PENALISED = 4096  # authors whose rejected heads are counted; the oldest is forgotten first
MAX_PENDING_VERIFY = 512  # heads heard and waiting for verification; the least promising go first
MAX_OUTWEIGHED = 4096  # heads remembered as unable to outweigh the canonical one; the oldest is forgotten first
MAX_REJECTED_IDS = 4096  # heads remembered as invalid; the oldest is forgotten first
# Rejections that may not hold later: the inputs or ancestors could not be had this time.
TRANSIENT = frozenset({"inputs_unavailable", "unknown_parent", "ancestor_inputs_unavailable", "weights_unavailable",
                       "ancestor_weights_unavailable"})
SLOW_VERIFY_S = 5.0  # a verification taking longer is logged
MAX_EVAL_REPORTS = 1024  # peers' evaluations kept per head; a head's evaluators are its swarm's peers

Verifier = Callable[[HeadRecord], Awaitable[str | None]]  # None: valid; else the reason it is not


class Heads:
    """Known heads and the canonical one; heads we did not compute are verified before they count."""

    def __init__(
        self,
        genesis: HeadRecord,
        gossip: Gossip,
        store: ContentStore,
        exchange: Exchange,
        data_dir: Path,
        reannounce_s: float,
        retention: int,
        verify_ancestors: bool = True,
        trusted: frozenset[str] = frozenset(),
    ) -> None:
        self.index = HeadIndex(genesis)
        self._gossip = gossip
        self._store = store
        self._exchange = exchange
        self._state_path = data_dir / STATE_FILE
        self._reannounce_s = reannounce_s
        self._retention = retention
        self._verify_ancestors = verify_ancestors
        self._trusted = trusted
        self.verifier: Verifier | None = None
        # The peers whose updates a head merged, from the update records this peer holds: what
        # the fork choice weighs. Called in a thread; empty when the records are not here.
        self.authors_of: Callable[[HeadRecord], frozenset[str]] = lambda head: frozenset()
        self.prefetcher: Callable[[list[HeadRecord]], Awaitable[None]] | None = None
        self._heard: dict[str, int] = {}  # round of each head waiting for its verdict, from unpenalised authors
        self.emit: Callable[..., None] = lambda kind, **data: None  # the daemon's event bus
        self.adopted: str = genesis.id
        self.changed = asyncio.Event()
        self.rejected: Counter[str] = Counter()
        self._verify_faults = Repeats()  # the same local fault, logged once a minute
        self.penalties: Counter[str] = Counter()
        self.eval: dict[str, dict[str, Any]] = {}  # validation loss by head, then by peer: heads in the index only
        self.rollbacks: dict[str, RollbackRecord] = {}
        self._verifying: set[str] = set()
        self._outweighed: dict[str, int] = {}  # heads set aside as unable to win: the most each could weigh
        self._rejected_ids: dict[str, None] = {}  # heads found invalid: their re-announcements are not verified again
        self._candidates: asyncio.Queue[tuple[HeadRecord, str]] = asyncio.Queue(256)
        self._lock = asyncio.Lock()
        gossip.on(HEAD, self._on_head)
        self._put_body(genesis)

    # ---- persistence -----------------------------------------------------------------

    def _put_body(self, head: HeadRecord) -> None:
        self._store.put_record(canonical.encode(head.to_wire()), head.id)

    def _load_body(self, head_id: str) -> HeadRecord | None:
        raw = self._store.get_record(head_id)
        if raw is None:
            return None
        try:
            return HeadRecord.from_wire(canonical.decode(raw, canonical.Limits(max_size=2 << 20)))
        except Invalid:
            return None

    async def restore(self) -> None:
        """Re-adopt the head this peer held when it stopped (and the chain that leads to it)."""
        try:
            state = json.loads(self._state_path.read_text())
            adopted = state["adopted"]
            rollbacks = [RollbackRecord.from_wire(r) for r in state.get("rollbacks", [])]
        except (OSError, ValueError, KeyError, TypeError, Invalid):
            return
        for rollback in rollbacks:
            self.rollbacks[rollback.id] = rollback
            self.index.pin(rollback)
        chain: list[HeadRecord] = []
        current = await asyncio.to_thread(self._load_body, adopted) if isinstance(adopted, str) else None
        while current is not None and current.id not in self.index:
            chain.append(current)
            current = await asyncio.to_thread(self._load_body, current.parent) if current.parent else None
        for head in reversed(chain):
            try:
                self.index.add(head, await asyncio.to_thread(self.authors_of, head))
            except Invalid as exc:
                log.warning("restore_failed", head=head.id, reason=exc.reason)
                return
        if adopted in self.index:
            self.adopted = adopted
            log.info("head_restored", head=adopted, round=self.index.get(adopted).round)  # type: ignore[union-attr]

    def _save(self) -> None:
        state = {"adopted": self.adopted, "rollbacks": [r.to_wire() for r in self.rollbacks.values()]}
        write_atomic(self._state_path, json.dumps(state).encode())

    # ---- heads we make ---------------------------------------------------------------

    async def add_own(self, head: HeadRecord) -> None:
        """A head this peer computed itself: no verification needed."""
        await asyncio.to_thread(self._put_body, head)
        authors = await asyncio.to_thread(self.authors_of, head)
        async with self._lock:
            self.index.add(head, authors)
        await self.publish(head)
        await self._reconsider()

    async def publish(self, head: HeadRecord) -> None:
        await self._gossip.publish(HEAD, HEAD_VERSION, head.to_wire())

    async def run(self) -> None:
        """Verify candidate heads one at a time, and re-announce the canonical head."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._reannounce_loop())
            tasks.create_task(self._verify_loop())

    async def _reannounce_loop(self) -> None:
        # Late joiners and lossy gossip both need the canonical head said again.
        while True:
            await asyncio.sleep(self._reannounce_s)
            head = self.index.get(self.adopted)
            if head is not None and head.parent is not None:
                await self.publish(head)

    def _verify_order(self, item: tuple[HeadRecord, str]) -> tuple[bool, tuple[int, int, str]]:
        head, author = item
        return self.penalties.get(author, 0) > 0, fork_rank(head)

    async def _verify_loop(self) -> None:
        pending: dict[str, tuple[HeadRecord, str]] = {}
        while True:
            if not pending:
                head, author = await self._candidates.get()
                pending[head.id] = (head, author)
            while not self._candidates.empty():
                head, author = self._candidates.get_nowait()
                pending[head.id] = (head, author)
            while len(pending) > MAX_PENDING_VERIFY:
                # Heads arrive faster than they are verified: the least promising wait no more
                # (the same rank as below; a head dropped is verified when it is announced again).
                worst = max(pending.values(), key=self._verify_order)[0].id
                del pending[worst]
                self._verifying.discard(worst)
                self._heard.pop(worst, None)
                self.rejected["verify_backlog_full"] += 1
            # Best first: a peer far behind verifies the swarm's tip, not every head on the way to
            # it. A head of a lower round is verified too: the fork choice weighs a branch by its
            # authors, so a lone peer's longer branch may be adopted first and the swarm's after.
            # Heads of authors with a head rejected come last: a peer on a branch of its own
            # announces a head of a higher round every round, and each can take a fetch timeout
            # to fail, which would starve the verification of the swarm's heads.
            head, author = pending.pop(min(pending.values(), key=self._verify_order)[0].id)
            started = time.monotonic()
            try:
                if head.id not in self.index and head.round > self.index.root.round:
                    await self._accept(head, author)
                    if (took := time.monotonic() - started) > SLOW_VERIFY_S:
                        # Heads heard meanwhile wait behind this one: the clue when a peer falls behind.
                        log.info("head_verify_slow", head=head.id, round=head.round, author=author,
                                 seconds=round(took, 1), adopted=head.id == self.adopted, waiting=len(pending))
            except Exception as exc:
                # A fault of this peer's (a full disk, an I/O error), not of the head: it is not
                # held against the author, and the head is verified again when it is announced
                # again. The loop, and so the daemon, keeps running.
                self.rejected["local_error"] += 1
                error = f"{type(exc).__name__}: {exc}"
                if (held := self._verify_faults.due(error)) is not None:
                    log.error("head_verify_failed", head=head.id, author=author, error=error, repeated=held)
            finally:
                self._verifying.discard(head.id)
                self._heard.pop(head.id, None)

    # ---- heads others make -----------------------------------------------------------

    async def _on_head(self, record: Record) -> None:
        # Verification can take seconds (fetching inputs, merging): it runs in ``run``, not here,
        # so the gossip loop never waits on it.
        head: HeadRecord = record.body
        if head.id in self.index or head.id in self._verifying:
            return
        if head.id in self._rejected_ids:
            self.rejected["rejected_before"] += 1
            return
        try:
            self._candidates.put_nowait((head, record.author))
        except asyncio.QueueFull:
            self.rejected["verify_queue_full"] += 1
            return
        self._verifying.add(head.id)
        if not self.penalties.get(record.author):
            self._heard[head.id] = head.round

    async def _accept(self, head: HeadRecord, author: str) -> None:
        # Set aside before (its author re-announces it every few seconds), or built on a head that
        # was: weighed from the bound remembered, without fetching its ancestors again.
        remembered = self._outweighed.get(head.id)
        if remembered is None and head.parent is not None and (base := self._outweighed.get(head.parent)) is not None:
            remembered = base + len(set(head.updates))
        if head.id not in self._trusted and remembered is not None and self._outweighed_now(head, remembered):
            return
        ancestors, missing = await self._unknown_ancestors(head)
        if missing is not None:
            # Its author announced a head whose history it does not serve: held against it like
            # any rejection, so its later heads do not hold a catching-up peer's training.
            self._reject(head, author, "unknown_parent")
            log.info("head_parent_unavailable", head=head.id, missing=missing)
            return
        chain = [*ancestors, head]
        if not any(h.id in self._trusted for h in chain):
            parent = chain[0].parent
            bound = (self.index.weight(parent) if parent is not None else 0) + sum(len(set(h.updates)) for h in chain)
            if self._outweighed_now(head, bound):
                return
        # A head the operator named in ``training.trusted_heads`` is linked with its ancestors
        # unverified: the operator's word stands in for the history a peer far behind can no
        # longer recompute (the swarm keeps only recent rounds' updates).
        anchor = max((i for i, h in enumerate(chain) if h.id in self._trusted), default=-1)
        trusted, checked = chain[: anchor + 1], chain[anchor + 1 :]
        for known in trusted:
            if not await self._add_verified(known, head, author):
                return
            log.info("head_trusted", head=known.id, round=known.round)
        # Their inputs are fetched meanwhile, all at once, so a peer far behind catches up at the
        # pace of its merges rather than of one fetch after another.
        prefetch = (asyncio.ensure_future(self.prefetcher(checked))
                    if self.prefetcher is not None and len(checked) > 1 and self._verify_ancestors else None)
        try:
            if not await self._verify_chain(checked, head, author):
                return
        finally:
            if prefetch is not None:
                prefetch.cancel()
                await asyncio.gather(prefetch, return_exceptions=True)
        await self._reconsider()
        if self.adopted != head.id and not self.index.is_ancestor(head.id, self.adopted):
            # A valid head on another branch that weighs less (or ties and ranks lower): the
            # operator's clue when peers keep building on branches of their own.
            log.info("head_not_adopted", head=head.id, round=head.round, weight=self.index.weight(head.id),
                     authors=len(self.index.authors(head.id)), canonical=self.adopted,
                     canonical_weight=self.index.weight(self.adopted))

    def _outweighed_now(self, head: HeadRecord, bound: int) -> bool:
        """Whether a branch whose tip can weigh at most ``bound`` loses to the canonical head
        whatever its verification says; such a head is set aside unverified (and remembered with
        its bound, so a head built on it is weighed without a fetch).

        A head weighs the distinct authors of its updates, so no more than its update count:
        summed along the branch that bounds the branch. Verifying heads that cannot win (a lone
        peer's branch, one head per round) is what kept a peer back from a freeze from ever
        reaching the swarm's tip: each took seconds, and there were more every second.
        """
        if bound >= self.index.weight(self.adopted):
            return False  # a tie may still win on rank
        self.rejected["cannot_outweigh"] += 1
        self._outweighed[head.id] = bound
        while len(self._outweighed) > MAX_OUTWEIGHED:
            del self._outweighed[next(iter(self._outweighed))]
        return True

    async def _verify_chain(self, chain: list[HeadRecord], tip: HeadRecord, author: str) -> bool:
        """Verify and link ``chain`` (oldest first, ending at ``tip`` unless the tip is trusted);
        False once one fails.

        Each is verified against its parent before the next: a head is only as good as its
        history, and an ancestor that was never announced (so never checked) could otherwise
        carry any weights into the chain under a tip that recomputes correctly.
        """
        for head in chain:
            if head is tip or self._verify_ancestors:
                reason = await self._verify(head)
                if reason is not None:
                    if head is not tip:
                        log.warning("ancestor_rejected", head=tip.id, ancestor=head.id, round=head.round, reason=reason)
                        reason = f"ancestor_{reason}"
                    self._reject(tip, author, reason)
                    return False
            if not await self._add_verified(head, tip, author):
                return False
        return True

    async def _verify(self, head: HeadRecord) -> str | None:
        return await self.verifier(head) if self.verifier is not None else None

    async def _add_verified(self, head: HeadRecord, tip: HeadRecord, author: str) -> bool:
        """Link a verified head into the index and store its body; False (rejected) on a bad link."""
        authors = await asyncio.to_thread(self.authors_of, head)
        async with self._lock:
            try:
                self.index.add(head, authors)
            except Invalid as exc:
                self._reject(tip, author, exc.reason)
                return False
        await asyncio.to_thread(self._put_body, head)
        return True

    def _reject(self, head: HeadRecord, author: str, reason: str) -> None:
        """Count, penalise and report a head this peer will not adopt."""
        self.rejected[reason] += 1
        if reason not in TRANSIENT:
            self._rejected_ids[head.id] = None
            while len(self._rejected_ids) > MAX_REJECTED_IDS:
                del self._rejected_ids[next(iter(self._rejected_ids))]
        self.penalties[author] += 1
        while len(self.penalties) > MAX_PENALISED:
            del self.penalties[next(iter(self.penalties))]
        log.warning("head_rejected", head=head.id, author=author, reason=reason)
        self.emit("head_rejected", head=head.id, author=author, reason=reason)

    async def _unknown_ancestors(self, head: HeadRecord) -> tuple[list[HeadRecord], str | None]:
        """The head's ancestors missing from the index, oldest first, and the id of the first one
        that could not be had (None when the chain reaches a known head)."""
        pending: list[HeadRecord] = []
        parent_id = head.parent
        while parent_id is not None and parent_id not in self.index and len(pending) < MAX_BACKFILL:
            parent = await asyncio.to_thread(self._load_body, parent_id) or await self._fetch_body(parent_id)
            if parent is None:
                return [], parent_id
            pending.append(parent)
            parent_id = parent.parent
        if parent_id is not None and parent_id not in self.index:
            return [], parent_id
        if parent_id is None and pending and pending[-1].id != self.index.root.id:
            return [], pending[-1].id  # a chain from another genesis
        return pending[::-1], None

    async def _link_trusted(self, head: HeadRecord) -> str | None:
        """Link ``head`` and its unknown ancestors without recomputing them (an operator vouched
        for ``head``); the id that could not be had or linked, else None."""
        ancestors, missing = await self._unknown_ancestors(head)
        if missing is not None:
            return missing
        authors = [await asyncio.to_thread(self.authors_of, h) for h in [*ancestors, head]]
        async with self._lock:
            for ancestor, merged in zip([*ancestors, head], authors, strict=True):
                try:
                    self.index.add(ancestor, merged)
                except Invalid as exc:
                    return f"{ancestor.id} ({exc.reason})"
                await asyncio.to_thread(self._put_body, ancestor)
        return None

    async def _fetch_body(self, head_id: str) -> HeadRecord | None:
        raw = await self._exchange.fetch_record(head_id)
        if raw is None or not matches(head_id, raw):
            return None
        try:
            return HeadRecord.from_wire(canonical.decode(raw, canonical.Limits(max_size=2 << 20)))
        except Invalid:
            return None

    # ---- operator rollbacks ----------------------------------------------------------

    async def apply_rollback(self, rollback: RollbackRecord) -> None:
        """Pin the canonical chain to ``rollback.target`` (fetching its record if we lack it)."""
        if rollback.target not in self.index:
            target = await asyncio.to_thread(self._load_body, rollback.target) or await self._fetch_body(rollback.target)
            failed = "unknown" if target is None else await self._link_trusted(target)
            if failed is not None:
                self.rejected["rollback_target_unknown"] += 1
                log.warning("rollback_target_unknown", target=rollback.target, missing=failed)
                return
        async with self._lock:
            self.index.pin(rollback)
        self.rollbacks[rollback.id] = rollback
        while len(self.rollbacks) > MAX_ROLLBACKS:  # only operator keys sign these; a runaway one is bounded too
            del self.rollbacks[min(self.rollbacks.values(), key=lambda r: (r.issued_ms, r.id)).id]
        log.info("rollback_applied", target=rollback.target, rollback=rollback.id)
        await self._reconsider()
        await asyncio.to_thread(self._save)

    def marker_for(self, base: HeadRecord) -> str | None:
        """The rollback marker a head built on ``base`` carries: a new rollback starts at its target."""
        order = self.index.rollback
        if order is not None and order.target == base.id:
            return order.id
        return base.rollback

    # ---- the canonical head ----------------------------------------------------------

    async def _reconsider(self) -> None:
        tip = self.index.tip()
        if tip is None or tip == self.adopted:
            return
        self.adopted = tip
        head = self.index.get(tip)
        assert head is not None
        await asyncio.to_thread(self._store.pin, "heads", [h.id for h in self.index.heads()])
        log.info("head_adopted", head=tip, round=head.round, samples_total=head.samples_total)
        self.emit("head_adopted", head=tip, round=head.round, epoch=head.epoch, samples_total=head.samples_total,
                  updates=len(head.updates), excluded=len(head.excluded))
        await asyncio.to_thread(self._save)
        if self._retention > 0:
            for dropped in self.index.prune(self._retention):
                self.eval.pop(dropped, None)
        self.changed.set()

    def record_eval(self, head_id: str, peer: str, loss: float) -> bool:
        """Keep a peer's validation loss of a known head; False (ignored) for a head not in the
        index, so evaluations of made-up heads cannot grow the map."""
        if head_id not in self.index:
            return False
        reports = self.eval.setdefault(head_id, {})
        if peer not in reports and len(reports) >= MAX_EVAL_REPORTS:
            return False
        reports[peer] = loss
        return True

    @property
    def heard_round(self) -> int:
        """The highest round among heads waiting for their verdict whose authors have none rejected."""
        return max(self._heard.values(), default=0)

    @property
    def verifying(self) -> bool:
        """True while some head heard from the swarm waits for, or is in, verification."""
        return bool(self._verifying)

    def canonical(self) -> HeadRecord:
        head = self.index.get(self.adopted)
        assert head is not None
        return head

    def recent(self, limit: int = 50) -> list[HeadRecord]:
        heads = self.index.heads()
        heads.sort(key=lambda h: (-h.round, h.id))
        return heads[:limit]
