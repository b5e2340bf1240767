"""Microshard leases: the signed claim body, the rendezvous conflict rule and the book of live leases.

Every peer evaluates the same rule on the same claims, so overlapping claims
settle without a message: the claim whose peer has the higher rendezvous
weight for a shard keeps it, and expired claims hold nothing.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

import blake3

from protocol import canonical, fields
from protocol.cid import content_id
from protocol.errors import Invalid

MAX_LEASE_MICROSHARDS = 1024
MAX_LEASE_MS = 60 * 60 * 1000
_RENDEZVOUS_DOMAIN = "p2p-node/rendezvous/v1"
_LEASE_DOMAIN = "p2p-node/lease/v1"
_WIRE_KEYS = ("lease", "peer", "epoch", "round", "microshards", "issued_ms", "expires_ms")


def rendezvous_weight(microshard_id: str, peer_id: str) -> int:
    """H(shard, peer) as a 256-bit integer; the peer with the largest weight for a shard is its home."""
    digest = blake3.blake3(canonical.encode([_RENDEZVOUS_DOMAIN, microshard_id, peer_id])).digest()
    return int.from_bytes(digest, "big")


def lease_id_for(peer: str, epoch: int, round: int, issued_ms: int) -> str:
    """The stable id of a lease: renewals keep ``issued_ms`` and so keep the id."""
    return content_id(canonical.encode([_LEASE_DOMAIN, peer, epoch, round, issued_ms]))


@dataclass(frozen=True)
class LeaseClaim:
    """A peer's claim on microshards for one round, valid until ``expires_ms``.

    A renewal republishes the same lease (same peer, epoch, round and
    ``issued_ms``, hence the same ``lease_id``) with a later or equal expiry
    and a subset of the shards: leases extend and shrink, never grow.
    """

    lease_id: str
    peer: str
    epoch: int
    round: int
    microshards: tuple[str, ...]
    issued_ms: int
    expires_ms: int

    @classmethod
    def create(
        cls, peer: str, epoch: int, round: int, microshards: Iterable[str], issued_ms: int, expires_ms: int
    ) -> LeaseClaim:
        """A new claim with its derived lease id and sorted shard list."""
        return cls(
            lease_id_for(peer, epoch, round, issued_ms),
            peer, epoch, round, tuple(sorted(set(microshards))), issued_ms, expires_ms,
        )

    def renewed(self, expires_ms: int, microshards: Iterable[str] | None = None) -> LeaseClaim:
        """The same lease with a new expiry and, to yield shards, a smaller shard set."""
        kept = self.microshards if microshards is None else tuple(sorted(set(microshards)))
        return LeaseClaim(
            self.lease_id, self.peer, self.epoch, self.round, kept, self.issued_ms, expires_ms
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            "lease": self.lease_id,
            "peer": self.peer,
            "epoch": self.epoch,
            "round": self.round,
            "microshards": list(self.microshards),
            "issued_ms": self.issued_ms,
            "expires_ms": self.expires_ms,
        }

    @classmethod
    def from_wire(cls, value: Any) -> LeaseClaim:
        wire = fields.record_map(value, _WIRE_KEYS, "lease")
        claim = cls(
            lease_id=fields.cid(wire["lease"], "lease"),
            peer=fields.peer(wire["peer"], "peer"),
            epoch=fields.uint(wire["epoch"], "epoch"),
            round=fields.uint(wire["round"], "round"),
            microshards=fields.sorted_cids(
                wire["microshards"], "microshards", MAX_LEASE_MICROSHARDS, allow_empty=False
            ),
            issued_ms=fields.uint(wire["issued_ms"], "issued_ms"),
            expires_ms=fields.uint(wire["expires_ms"], "expires_ms"),
        )
        if claim.expires_ms <= claim.issued_ms:
            raise Invalid("malformed", "lease expires before it is issued")
        if claim.lease_id != lease_id_for(claim.peer, claim.epoch, claim.round, claim.issued_ms):
            raise Invalid("bad_lease_id", claim.lease_id)
        return claim


def _version_key(claim: LeaseClaim) -> tuple[int, int, tuple[str, ...]]:
    # Among versions of one lease the latest expiry is newest; at equal expiry the
    # smaller set (a yield) is newer; the shard tuple only makes the order total.
    return (claim.expires_ms, -len(claim.microshards), claim.microshards)


def _claim_key(microshard_id: str, claim: LeaseClaim) -> tuple[int, int, str]:
    # Distinct leases only tie on weight when one peer holds two leases on a shard.
    return (rendezvous_weight(microshard_id, claim.peer), claim.expires_ms, claim.lease_id)


def resolve(claims: Iterable[LeaseClaim], now_ms: int) -> dict[str, LeaseClaim]:
    """Which claim holds each shard at ``now_ms``: the same answer whatever order claims came in.

    Expired claims hold nothing; of several versions of one lease only the
    newest counts; on overlap the higher rendezvous weight keeps the shard.
    """
    newest: dict[str, LeaseClaim] = {}
    for claim in claims:
        if claim.expires_ms <= now_ms:
            continue
        held = newest.get(claim.lease_id)
        if held is None or _version_key(claim) > _version_key(held):
            newest[claim.lease_id] = claim
    winners: dict[str, LeaseClaim] = {}
    for claim in newest.values():
        for shard in claim.microshards:
            current = winners.get(shard)
            if current is None or _claim_key(shard, claim) > _claim_key(shard, current):
                winners[shard] = claim
    return winners


def home_peer(microshard_id: str, peers: Iterable[str]) -> str | None:
    """The peer with the highest rendezvous weight for a shard, or None when there are no peers."""
    return max(peers, key=lambda p: (rendezvous_weight(microshard_id, p), p), default=None)


def choose_claims(
    peer_id: str,
    candidates: Iterable[str],
    budget: int,
    taken: Collection[str] = frozenset(),
    live_peers: Iterable[str] = (),
) -> tuple[str, ...]:
    """Up to ``budget`` shards for ``peer_id`` to claim, best first.

    Peers that share a view of ``live_peers`` partition the shards without
    talking: each first takes the shards it is home to (highest weight among
    the live peers and itself). With budget to spare it then takes other
    peers' shards, starting with those their homes rank lowest, because a home
    short of budget claims its highest-weight shards first. ``taken`` (done or
    held by a live lease) is skipped; a home peer that wants a shard back can
    leave it out of ``taken`` and win it under the conflict rule.
    """
    if budget <= 0:
        return ()
    peers = set(live_peers) | {peer_id}
    own: list[tuple[int, str]] = []
    others: list[tuple[int, str]] = []
    for shard in set(candidates):
        if shard in taken:
            continue
        home = home_peer(shard, peers)
        assert home is not None
        weight = rendezvous_weight(shard, home)
        if home == peer_id:
            own.append((-weight, shard))
        else:
            others.append((weight, shard))
    own.sort()
    others.sort()
    return tuple(shard for _, shard in (own + others)[:budget])


def budget_for(speed: float, total_speed: float, remaining: int, minimum: int = 1) -> int:
    """How many of ``remaining`` shards a peer with ``speed`` of the swarm's ``total_speed`` should take."""
    if remaining <= 0:
        return 0
    if total_speed <= 0 or speed <= 0:
        return min(minimum, remaining)
    share = math.ceil(remaining * min(speed / total_speed, 1.0))
    return max(min(minimum, remaining), min(share, remaining))


class LeaseBook:
    """The live leases of one epoch as this peer has observed them, with the rule applied.

    Feed it every validated lease claim with ``observe``, drop the finished
    ones with ``release`` and ``expire``; ask who holds what and which of a
    peer's shards it has lost so the node can yield them and claim others.
    """

    def __init__(
        self,
        epoch: int,
        planned: Iterable[str],
        *,
        round: int = 0,
        max_microshards: int = MAX_LEASE_MICROSHARDS,
        max_lease_ms: int = MAX_LEASE_MS,
    ) -> None:
        self.epoch = epoch
        self.round = round
        self.planned = frozenset(planned)
        self.max_microshards = max_microshards
        self.max_lease_ms = max_lease_ms
        self._leases: dict[str, LeaseClaim] = {}
        self._claimants: dict[str, set[str]] = {}

    def observe(self, claim: LeaseClaim, now_ms: int) -> bool:
        """Record a claim or a renewal; False for a repeat of what is held; Invalid when refused."""
        if claim.epoch != self.epoch:
            raise Invalid("wrong_epoch", f"{claim.epoch} != {self.epoch}")
        if claim.round < self.round:
            raise Invalid("stale_round", f"{claim.round} < {self.round}")
        if claim.expires_ms <= now_ms:
            raise Invalid("expired", claim.lease_id)
        if claim.expires_ms - now_ms > self.max_lease_ms:
            raise Invalid("lease_too_long", f"{claim.expires_ms - now_ms} ms")
        if len(claim.microshards) > self.max_microshards:
            raise Invalid("too_many", f"{len(claim.microshards)} microshards")
        if not self.planned.issuperset(claim.microshards):
            raise Invalid("unknown_microshard", claim.lease_id)
        held = self._leases.get(claim.lease_id)
        if held is not None:
            if claim == held:
                return False
            if not set(claim.microshards) <= set(held.microshards):
                raise Invalid("renewal_grows", claim.lease_id)
            if _version_key(claim) < _version_key(held):
                raise Invalid("stale_renewal", claim.lease_id)
            self._forget(held)
        self._leases[claim.lease_id] = claim
        for shard in claim.microshards:
            self._claimants.setdefault(shard, set()).add(claim.lease_id)
        return True

    def release(self, lease_id: str) -> LeaseClaim | None:
        """Drop a lease (its update was merged, or its peer left); the dropped claim, if held."""
        held = self._leases.pop(lease_id, None)
        if held is not None:
            self._forget(held)
        return held

    def expire(self, now_ms: int) -> tuple[LeaseClaim, ...]:
        """Drop every lease expired at ``now_ms``; the dropped claims."""
        gone = tuple(c for c in self._leases.values() if c.expires_ms <= now_ms)
        for claim in gone:
            self.release(claim.lease_id)
        return gone

    def advance_round(self, round: int) -> tuple[LeaseClaim, ...]:
        """Move to ``round``, dropping leases taken for earlier rounds; the dropped claims."""
        self.round = max(self.round, round)
        gone = tuple(c for c in self._leases.values() if c.round < self.round)
        for claim in gone:
            self.release(claim.lease_id)
        return gone

    def owner_of(self, microshard_id: str) -> LeaseClaim | None:
        """The claim that holds a shard under the rendezvous rule, if any."""
        claimants = self._claimants.get(microshard_id)
        if not claimants:
            return None
        return max(
            (self._leases[lease_id] for lease_id in claimants),
            key=lambda claim: _claim_key(microshard_id, claim),
        )

    def owners(self) -> dict[str, LeaseClaim]:
        """Every held shard and the claim that holds it (``resolve`` over the live leases)."""
        return {shard: owner for shard in self._claimants if (owner := self.owner_of(shard))}

    def leased(self) -> frozenset[str]:
        return frozenset(self._claimants)

    def leases_of(self, peer_id: str) -> tuple[LeaseClaim, ...]:
        mine = (claim for claim in self._leases.values() if claim.peer == peer_id)
        return tuple(sorted(mine, key=lambda claim: claim.lease_id))

    def holdings_of(self, peer_id: str) -> frozenset[str]:
        """The shards a peer's claims actually hold after conflicts."""
        return frozenset(
            shard for claim in self.leases_of(peer_id) for shard in claim.microshards
            if self._holder(shard) == peer_id
        )

    def losses_of(self, peer_id: str) -> frozenset[str]:
        """Shards a peer claimed but lost to a higher-weight claim; it should yield them."""
        return frozenset(
            shard for claim in self.leases_of(peer_id) for shard in claim.microshards
            if self._holder(shard) != peer_id
        )

    def get(self, lease_id: str) -> LeaseClaim | None:
        return self._leases.get(lease_id)

    def __len__(self) -> int:
        return len(self._leases)

    def _holder(self, microshard_id: str) -> str | None:
        owner = self.owner_of(microshard_id)
        return None if owner is None else owner.peer

    def _forget(self, claim: LeaseClaim) -> None:
        for shard in claim.microshards:
            claimants = self._claimants.get(shard)
            if claimants is not None:
                claimants.discard(claim.lease_id)
                if not claimants:
                    del self._claimants[shard]

