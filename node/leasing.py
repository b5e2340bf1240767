"""Leases on gossip: claim microshards for a round, settle conflicts by rendezvous weight, renew, release."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable
from typing import Any

from node.gossip import Gossip, now_ms
from node.logs import get_logger
from protocol.errors import Invalid
from protocol.kinds import LEASE
from protocol.leases import LeaseBook, LeaseClaim, budget_for, choose_claims
from protocol.records import Record

log = get_logger("leases")

LEASE_VERSION = 1
BACK_OFF_BASE_S = 5.0


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
        self._pending_future: list[LeaseClaim] = []
        self._failures_in_a_row = 0
        self._benched_until_ms = 0
        gossip.on(LEASE, self._on_lease)

    async def _on_lease(self, record: Record) -> None:
        claim: LeaseClaim = record.body
        if claim.peer != record.author:
            raise Invalid("author_mismatch", "a lease speaks for its author only")
        if claim.peer == self._peer:
            return  # our own claims enter the book when we make them
        if claim.epoch > self.book.epoch or (claim.epoch == self.book.epoch and claim.round > self.book.round):
            # A peer a little ahead of us: its claim still counts once we get there.
            self._pending_future.append(claim)
            return
        try:
            self.book.observe(claim, now_ms())
        except Invalid as exc:
            self.rejected[exc.reason] += 1
            raise

    def start_round(self, epoch: int, round: int) -> None:
        """Move the book to ``(epoch, round)``: older rounds' leases no longer hold anything."""
        if epoch != self.book.epoch:
            self.book = LeaseBook(epoch, self._planned, round=round)
        else:
            self.book.advance_round(round)
        self.book.expire(now_ms())
        early, self._pending_future = self._pending_future, []
        for claim in early:
            try:
                if (claim.epoch, claim.round) == (epoch, round):
                    self.book.observe(claim, now_ms())
                elif (claim.epoch, claim.round) > (epoch, round):
                    self._pending_future.append(claim)
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
        """Claim up to ``wanted`` free microshards, wait for rivals' claims, keep what we win."""
        self.start_round(epoch, round)
        # A peer that died holding a lease would keep its shards out of the pool for lease_s;
        # taking them back is safe because the head chain counts each shard once.
        for peer in {claim.peer for claim in self.book.owners().values()} - {*live_peers, self._peer}:
            for lease in self.book.leases_of(peer):
                self.book.release(lease.lease_id)
        available = free - self.book.leased()
        # Our share of the whole pool, not of what is still unclaimed: peers start a round a few
        # milliseconds apart, and shares of a shrinking remainder would leave the end of an
        # epoch to trickle out over several short rounds.
        budget = min(wanted, budget_for(speed, total_speed, len(free)))
        chosen = choose_claims(self._peer, available, budget, frozenset(), live_peers)
        if not chosen:
            return frozenset()
        issued = now_ms()
        claim = LeaseClaim.create(self._peer, epoch, round, chosen, issued, issued + self._lease_ms)
        await self._publish(claim)
        await asyncio.sleep(self._settle_s)
        lost = self.book.losses_of(self._peer)
        if lost:
            kept = frozenset(claim.microshards) - lost
            log.info("lease_conflict", round=round, lost=len(lost), kept=len(kept))
            if not kept:
                self.book.release(claim.lease_id)
                self.own = None
                return frozenset()
            await self._publish(claim.renewed(claim.expires_ms, kept))
        return self.book.holdings_of(self._peer)

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

    def drop_unfinished(self, peers: Iterable[str]) -> None:
        """Forget this round's leases of ``peers``, whose updates the round closed without.

        Without this a peer that claimed and then failed keeps its shards for
        the whole lease lifetime whenever the round is retried on the same base
        (nothing else merged), and every retry waits for it again.
        """
        for peer in set(peers) - {self._peer}:
            for claim in self.book.leases_of(peer):
                if claim.round == self.book.round:
                    self.book.release(claim.lease_id)

    def participants(self) -> set[str]:
        """Peers that hold microshards in the current round: whose updates a round waits for."""
        return {claim.peer for claim in self.book.owners().values() if claim.round == self.book.round}

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
        }
