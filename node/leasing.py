"""Leases on gossip: claim microshards for a round, settle conflicts under the admission rule, strike no-shows."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable
from typing import Any

from node.gossip import Gossip, now_ms
from node.logs import get_logger
from protocol.errors import Invalid
from protocol.kinds import LEASE
from protocol.leases import Admission, LeaseBook, LeaseClaim, Standing, budget_for, choose_claims, resolve
from protocol.records import Record

log = get_logger("leases")

LEASE_VERSION = 1
BACK_OFF_BASE_S = 5.0
# A claim for a later round than ours waits only this many rounds ahead (a peer a head or two ahead of us).
MAX_ROUNDS_AHEAD = 2
# Peers whose one claim for a later round waits; more are refused as pending_full.
MAX_PENDING_FUTURE = 256
# Peers whose strikes are remembered; past it the longest-known standing is dropped.
MAX_STANDINGS = 1024


class Leasing:
    """This peer's view of the epoch's leases and its own claims."""

    def __init__(self, gossip: Gossip, peer_id: str, planned: tuple[str, ...], lease_s: float, settle_s: float) -> None:
        self._gossip = gossip
        self._peer = peer_id
        self._planned = planned
        self._lease_ms = int(lease_s * 1000)
        self._settle_s = settle_s
        self.book = LeaseBook(0, planned)
        self.rejected: Counter[str] = Counter()
        self.own: LeaseClaim | None = None
        # Our claim for the round after the book's, made while that round's head is being merged
        # (overlap); the book takes it in when it gets to that round (``claim``).
        self.ahead: LeaseClaim | None = None
        # One claim per peer (its latest), for rounds at most MAX_ROUNDS_AHEAD ahead, at most MAX_PENDING_FUTURE peers.
        self._pending_future: dict[str, LeaseClaim] = {}
        self._failures_in_a_row = 0
        self._benched_until_ms = 0
        # Other peers' strikes, at most MAX_STANDINGS. Exclusions count in rounds this peer has run
        # (retries included); ``_struck`` and ``_answered`` are the outcomes of the round now closing.
        self._standing: dict[str, Standing] = {}
        self._rounds_run = 0
        self._closed = False
        self._struck: set[str] = set()
        self._answered: set[str] = set()
        gossip.on(LEASE, self._on_lease)

    async def _on_lease(self, record: Record) -> None:
        claim: LeaseClaim = record.body
        if claim.peer != record.author:
            raise Invalid("author_mismatch", "a lease speaks for its author only")
        if claim.peer == self._peer:
            return  # our own claims enter the book when we make them
        try:
            if (claim.epoch, claim.round) > (self.book.epoch, self.book.round):
                self._hold_for_later(claim)
            else:
                self.book.observe(claim, now_ms())
        except Invalid as exc:
            self.rejected[exc.reason] += 1
            raise

    def _hold_for_later(self, claim: LeaseClaim) -> None:
        """Keep the claim of a peer a little ahead of us: it still counts once we get there."""
        if claim.round - self.book.round > MAX_ROUNDS_AHEAD or claim.epoch - self.book.epoch > 1:
            raise Invalid("too_far_ahead", f"round {claim.round}, ours {self.book.round}")
        held = self._pending_future.get(claim.peer)
        if held is not None:
            if _pending_key(claim) <= _pending_key(held):
                raise Invalid("superseded", claim.lease_id)
        elif len(self._pending_future) >= MAX_PENDING_FUTURE:
            raise Invalid("pending_full", f"{len(self._pending_future)} peers")
        self._pending_future[claim.peer] = claim

    def start_round(self, epoch: int, round: int) -> None:
        """Move the book to ``(epoch, round)``: older rounds' leases no longer hold anything."""
        self._rounds_run += 1
        self._closed = False
        for peer in self._answered:
            self._standing.pop(peer, None)
        self._answered.clear()
        self._struck.clear()
        if epoch != self.book.epoch:
            self.book = LeaseBook(epoch, self._planned, round=round)
        else:
            self.book.advance_round(round)
        self.book.expire(now_ms())
        early, self._pending_future = self._pending_future, {}
        for peer, claim in early.items():
            try:
                if (claim.epoch, claim.round) == (epoch, round):
                    self.book.observe(claim, now_ms())
                elif (claim.epoch, claim.round) > (epoch, round):
                    self._pending_future[peer] = claim
            except Invalid as exc:
                self.rejected[exc.reason] += 1

    async def claim(
        self,
        epoch: int,
        round: int,
        free: frozenset[str],
        wanted: int,
        speed: float,
        total_speed: float,
        live_peers: list[str],
    ) -> frozenset[str]:
        """Claim up to ``wanted`` free microshards, wait for rivals' claims, keep what we win.

        Only claims of ``live_peers`` not excluded for strikes count, each within
        its cap (``Admission``): a dead peer's lease frees its shards at once (the
        head chain counts each shard once), and a flood holds nothing past its cap.
        """
        self.start_round(epoch, round)
        admission = self._admission(free, live_peers)
        self.book.admit(admission)
        ahead, self.ahead = self.ahead, None
        if ahead is not None and (ahead.epoch, ahead.round) == (epoch, round):
            return await self._take_ahead(ahead)
        if now_ms() < self._benched_until_ms:
            return frozenset()  # backed off (``back_off``): the shards go to peers that can train them
        claim = self._draft(epoch, round, free, free - self.book.leased(), admission, wanted, speed, total_speed)
        if claim is None:
            return frozenset()
        await self._publish(claim)
        await asyncio.sleep(self._settle_s)
        return await self._yield_losses(claim)

    def _admission(self, free: frozenset[str], live_peers: list[str]) -> Admission:
        """Whose claims count on ``free``: this peer and the live peers not excluded for strikes."""
        admitted = frozenset({self._peer, *(p for p in live_peers if not self.excluded(p))})
        return Admission(admitted, frozenset(free))

    def _draft(
        self,
        epoch: int,
        round: int,
        free: frozenset[str],
        available: frozenset[str],
        admission: Admission,
        wanted: int,
        speed: float,
        total_speed: float,
    ) -> LeaseClaim | None:
        """A new claim on ``available`` shards of the pool ``free``, or None when there is nothing to claim."""
        # Our share of the whole pool, not of what is still unclaimed: peers start a round a few
        # milliseconds apart, and shares of a shrinking remainder would leave the end of an
        # epoch to trickle out over several short rounds. Within the cap, or others would cut it.
        budget = min(wanted, budget_for(speed, total_speed, len(free)), admission.cap)
        chosen = choose_claims(self._peer, available, budget, frozenset(), admission.peers)
        if not chosen:
            return None
        issued = now_ms()
        return LeaseClaim.create(self._peer, epoch, round, chosen, issued, issued + self._lease_ms)

    async def _yield_losses(self, claim: LeaseClaim, ahead: bool = False) -> frozenset[str]:
        """Yield the shards of our ``claim`` the book gives to others; what we hold."""
        lost = self.book.losses_of(self._peer)
        if lost:
            kept = frozenset(claim.microshards) - lost
            log.info("lease_conflict", round=claim.round, lost=len(lost), kept=len(kept), ahead=ahead)
            if not kept:
                self.book.release(claim.lease_id)
                self.own = None
                return frozenset()
            await self._publish(claim.renewed(claim.expires_ms, kept))
        return self.book.holdings_of(self._peer)

    async def _take_ahead(self, claim: LeaseClaim) -> frozenset[str]:
        """Hold the claim made ahead for this round, as far as the rule and admission let it:
        shards won by a rival's higher weight, or no longer free, are yielded."""
        try:
            self.book.observe(claim, now_ms())
        except Invalid as exc:  # expired while the head was merged: nothing held
            log.info("lease_ahead_dropped", round=claim.round, reason=exc.reason)
            return frozenset()
        self.own = claim
        return await self._yield_losses(claim, ahead=True)

    async def claim_ahead(
        self,
        epoch: int,
        round: int,
        free: frozenset[str],
        wanted: int,
        speed: float,
        total_speed: float,
        live_peers: list[str],
    ) -> frozenset[str]:
        """Claim shards for ``(epoch, round)``, the round after the book's, before this peer gets there.

        ``free`` is what this peer expects that round's pool to be. Rivals' claims for that round
        wait with the other early claims; after the settle window the same rule as ``claim`` (on
        the claims known so far) decides what this claim keeps. The book checks it again when the
        round starts (``claim``), against the claims that came in meanwhile and the actual pool.
        """
        self.ahead = None
        if now_ms() < self._benched_until_ms:
            return frozenset()
        admission = self._admission(free, live_peers)
        rivals = [c for c in self._pending_future.values() if (c.epoch, c.round) == (epoch, round)]
        available = free - frozenset(resolve(rivals, now_ms(), admission))
        claim = self._draft(epoch, round, free, available, admission, wanted, speed, total_speed)
        if claim is None:
            return frozenset()
        self.ahead = claim
        await self._gossip.publish(LEASE, LEASE_VERSION, claim.to_wire())
        await asyncio.sleep(self._settle_s)
        if self.ahead is None or self.ahead.lease_id != claim.lease_id:
            return frozenset()  # taken over by ``claim`` or dropped meanwhile
        rivals = [c for c in self._pending_future.values() if (c.epoch, c.round) == (epoch, round)]
        winners = resolve([claim, *rivals], now_ms(), admission)
        kept = frozenset(shard for shard, owner in winners.items() if owner.lease_id == claim.lease_id)
        if kept != frozenset(claim.microshards):
            log.info("lease_conflict", round=round, lost=len(claim.microshards) - len(kept), kept=len(kept), ahead=True)
            if not kept:
                self.ahead = None
                return frozenset()
            self.ahead = claim.renewed(claim.expires_ms, kept)
            await self._gossip.publish(LEASE, LEASE_VERSION, self.ahead.to_wire())
        return kept

    def drop_ahead(self) -> None:
        """Forget the claim made ahead (its training was abandoned); it expires on other peers."""
        self.ahead = None

    async def _publish(self, claim: LeaseClaim) -> None:
        self.book.observe(claim, now_ms())
        self.own = claim
        await self._gossip.publish(LEASE, LEASE_VERSION, claim.to_wire())

    async def renew_while(self, done: asyncio.Event) -> None:
        """Extend our lease at half its life until ``done`` is set (training outlasting a lease)."""
        while not done.is_set():
            claim = self.own
            wait_s = self._lease_ms / 2000 if claim is None else max(0.5, (claim.expires_ms - now_ms()) / 2000)
            try:
                await asyncio.wait_for(done.wait(), wait_s)
                return
            except TimeoutError:
                pass
            if self.own is not None:
                await self._publish(self.own.renewed(now_ms() + self._lease_ms))
            if self.ahead is not None:
                self.ahead = self.ahead.renewed(now_ms() + self._lease_ms)
                await self._gossip.publish(LEASE, LEASE_VERSION, self.ahead.to_wire())

    def release_own(self) -> None:
        if self.own is not None:
            self.book.release(self.own.lease_id)
            self.own = None

    def back_off(self) -> float:
        """Drop our lease and claim nothing for a while, doubling with each failure in a row.

        A peer that cannot train (a workload bug, data nobody serves) would
        otherwise reclaim the shards it is home to every round, win them under
        the rendezvous rule and never finish them: the epoch would stall.
        """
        self.release_own()
        delay_s = min(BACK_OFF_BASE_S * 2.0**self._failures_in_a_row, max(self._lease_ms / 1000, BACK_OFF_BASE_S))
        self._failures_in_a_row += 1
        self._benched_until_ms = now_ms() + int(delay_s * 1000)
        log.warning("leases_backed_off", seconds=delay_s, failures_in_a_row=self._failures_in_a_row)
        return delay_s

    def recovered(self) -> None:
        """A round trained fine: the next failure backs off from the shortest pause again."""
        self._failures_in_a_row = 0

    def drop_unfinished(self, peers: Iterable[str], elsewhere: Iterable[str] = ()) -> None:
        """Forget this round's leases of ``peers``, whose updates the round closed without, and strike them.

        ``elsewhere`` are holders that answered on another head of the same round (a sibling of
        this round's base): their leases are forgotten too, but they are not struck. They trained;
        the swarm had two heads for a moment, and the fork choice settles which counts. Striking
        them would, after a few such rounds, stop each side waiting for the other, and every
        round after would fork again.

        Without this a peer that claimed and then failed keeps its shards for
        the whole lease lifetime whenever the round is retried on the same base
        (nothing else merged), and every retry waits for it again. A peer that
        held shards this round is struck once per round however often it is
        named; after ``STRIKES_TO_EXCLUDE`` in a row its claims count for nothing
        for a while (``excluded``). The other holders answered: their strikes
        clear when the next round starts, unless they are named before then (an
        update the merge could not use).
        """
        named = set(peers) - {self._peer}
        holders = self.participants()
        self._closed = True
        for peer in (named & holders) - self._struck - set(elsewhere):
            self._strike(peer)
        self._answered = (self._answered | holders) - self._struck
        for peer in named | set(elsewhere):
            for claim in self.book.leases_of(peer):
                if claim.round == self.book.round:
                    self.book.release(claim.lease_id)

    def credit(self, peers: Iterable[str]) -> None:
        """``peers``' updates were merged into an adopted head: their strikes are cleared."""
        for peer in peers:
            self._standing.pop(peer, None)

    def excluded(self, peer: str) -> bool:
        """Whether ``peer``'s claims count for nothing now, for its strikes; a round need not wait for it."""
        standing = self._standing.get(peer)
        return standing is not None and standing.excluded(self._round_now())

    def _round_now(self) -> int:
        # Once a round closed, questions are about the next one: the outer loop asks before it claims.
        return self._rounds_run + 1 if self._closed else self._rounds_run

    def _strike(self, peer: str) -> None:
        self._struck.add(peer)
        standing = self._standing.pop(peer, Standing()).struck(self._rounds_run)
        self._standing[peer] = standing
        while len(self._standing) > MAX_STANDINGS:
            del self._standing[next(iter(self._standing))]
        if standing.excluded(self._rounds_run + 1):
            log.warning("lease_peer_excluded", peer=peer, strikes=standing.strikes,
                        rounds=standing.excluded_until - self._rounds_run - 1)

    def participants(self) -> set[str]:
        """Peers whose updates the current round waits for: those holding microshards, and claimants left
        out of the live set this round's claim began with (they may be live by now: the outer loop checks
        liveness itself); never a peer excluded for strikes."""
        holders = {claim.peer for claim in self.book.owners().values() if claim.round == self.book.round}
        admission = self.book.admission
        if admission is not None:
            holders |= self.book.claimants(self.book.round) - admission.peers
        return {peer for peer in holders if not self.excluded(peer)}

    def view(self) -> dict[str, Any]:
        owners = self.book.owners()
        return {
            "epoch": self.book.epoch,
            "round": self.book.round,
            "own": sorted(self.book.holdings_of(self._peer)),
            "leases": [
                {
                    "lease_id": claim.lease_id,
                    "peer": claim.peer,
                    "round": claim.round,
                    "microshards": len(claim.microshards),
                    "holding": sum(1 for owner in owners.values() if owner.lease_id == claim.lease_id),
                    "expires_in_s": round((claim.expires_ms - now_ms()) / 1000, 1),
                }
                for claim in sorted({c.lease_id: c for c in owners.values()}.values(), key=lambda c: c.lease_id)
            ],
            "rejected": dict(self.rejected),
            "benched_s": round(max(self._benched_until_ms - now_ms(), 0) / 1000, 1),
            "pending_future": len(self._pending_future),
            "excluded": {
                peer: {"strikes": standing.strikes, "rounds_left": standing.excluded_until - self._round_now()}
                for peer, standing in sorted(self._standing.items()) if standing.excluded(self._round_now())
            },
        }


def _pending_key(claim: LeaseClaim) -> tuple[int, int, int, int, int]:
    # A peer's later round first; within a lease, the newer version (later expiry, then the smaller set).
    return (claim.epoch, claim.round, claim.issued_ms, claim.expires_ms, -len(claim.microshards))
