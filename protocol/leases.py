"""Microshard leases: the signed claim body, the conflict rule and its admission limits, strikes, and the lease book.

Every peer applies the same rule to the same claims and plain values, so overlapping claims settle without a message.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import blake3

from protocol import canonical, fields
from protocol.cid import content_id
from protocol.errors import Invalid

MAX_LEASE_MICROSHARDS = 1024
MAX_LEASE_MS = 60 * 60 * 1000
# A claimant keeps at most this many times its equal share of the pool (see ``claim_cap``).
CAP_SLACK = 2
# Leases one book holds at once: one per peer and round, so this is room for this many peers.
MAX_BOOK_LEASES = 4096
STRIKES_TO_EXCLUDE = 3
MAX_EXCLUDED_ROUNDS = 64
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


def _issue_key(claim: LeaseClaim) -> tuple[int, str]:
    # A peer holds one lease per round: its latest issued (a retry of the round replaces the last try's).
    return (claim.issued_ms, claim.lease_id)


def _claim_key(microshard_id: str, claim: LeaseClaim) -> tuple[int, int, str]:
    # Distinct leases only tie on weight when one peer holds two leases on a shard.
    return (rendezvous_weight(microshard_id, claim.peer), claim.expires_ms, claim.lease_id)


def claim_cap(pool: int, claimants: int) -> int:
    """The most of ``pool`` shards one of ``claimants`` admitted peers keeps: ``CAP_SLACK`` times an equal share.

    Honest peers size a claim by their speed's share of the pool and by the data
    for at most 2H inner steps (twice a median peer's), so with data to spare no
    honest claim passes twice the equal share; near an epoch's end only a peer
    faster than the rest together would, and it still keeps its home shards.
    """
    if pool <= 0:
        return 0
    return min(pool, math.ceil(CAP_SLACK * pool / max(claimants, 1)))


@dataclass(frozen=True)
class Admission:
    """Whose claims count in a round and how many shards each keeps: plain values every peer feeds the rule.

    ``peers`` are the claimants that count (live, not excluded for strikes): a
    claim of anyone else holds nothing. ``pool`` are the shards up for claiming;
    claimed shards outside it hold nothing. A claim of at most ``cap`` pool
    shards keeps them (conflicts aside). A larger claim is one no honest peer
    makes, since honest peers size claims to the cap; it keeps only the shards
    its peer is home to among ``peers``, at most ``cap`` of them, highest weight
    first. Claiming everything so wins a flooder nothing it would not win
    against every admitted peer anyway, and leaves the other peers' home shards
    to them; an honest fast peer whose claim a stricter view (one more live
    peer) finds too large still keeps every shard it is home to.
    """

    peers: frozenset[str]
    pool: frozenset[str]

    @property
    def cap(self) -> int:
        return claim_cap(len(self.pool), len(self.peers))

    @cached_property
    def homes(self) -> dict[str, str]:
        """The home peer of each pool shard among ``peers``."""
        return {shard: home for shard in self.pool if (home := home_peer(shard, self.peers)) is not None}

    def kept(self, claim: LeaseClaim) -> tuple[str, ...]:
        """The shards of ``claim`` that it may hold under this admission."""
        if claim.peer not in self.peers:
            return ()
        shards = tuple(shard for shard in claim.microshards if shard in self.pool)
        if len(shards) <= self.cap:
            return shards
        home = sorted(
            ((rendezvous_weight(shard, claim.peer), shard) for shard in shards if self.homes.get(shard) == claim.peer),
            reverse=True,
        )
        return tuple(sorted(shard for _, shard in home[: self.cap]))


def resolve(claims: Iterable[LeaseClaim], now_ms: int, admission: Admission | None = None) -> dict[str, LeaseClaim]:
    """Which claim holds each shard at ``now_ms``: the same answer whatever order claims came in.

    Expired claims hold nothing; of several versions of one lease only the
    newest counts, and of a peer's leases for one round only the latest issued;
    with an ``admission`` each claim holds only what it keeps under it; on
    overlap the higher rendezvous weight keeps the shard.
    """
    newest: dict[str, LeaseClaim] = {}
    for claim in claims:
        if claim.expires_ms <= now_ms:
            continue
        held = newest.get(claim.lease_id)
        if held is None or _version_key(claim) > _version_key(held):
            newest[claim.lease_id] = claim
    latest: dict[tuple[str, int, int], LeaseClaim] = {}
    for claim in newest.values():
        key = (claim.peer, claim.epoch, claim.round)
        held = latest.get(key)
        if held is None or _issue_key(claim) > _issue_key(held):
            latest[key] = claim
    winners: dict[str, LeaseClaim] = {}
    for claim in latest.values():
        for shard in claim.microshards if admission is None else admission.kept(claim):
            current = winners.get(shard)
            if current is None or _claim_key(shard, claim) > _claim_key(shard, current):
                winners[shard] = claim
    return winners


def exclusion_rounds(strikes: int) -> int:
    """Rounds a peer's claims are ignored after its ``strikes``-th strike in a row: none below
    ``STRIKES_TO_EXCLUDE``, then 1, 2, 4, ... up to ``MAX_EXCLUDED_ROUNDS``."""
    if strikes < STRIKES_TO_EXCLUDE:
        return 0
    return min(MAX_EXCLUDED_ROUNDS, 1 << min(strikes - STRIKES_TO_EXCLUDE, 30))


@dataclass(frozen=True)
class Standing:
    """A peer's strikes in a row (its leases ended without a usable update) and the first round its claims count again.

    Rounds are numbered as the caller counts them; the node counts every round
    it runs, retries of an unmerged round included, so an exclusion does not
    outlast a swarm that keeps retrying one round. A usable update clears the
    standing (``Standing()``).
    """

    strikes: int = 0
    excluded_until: int = 0

    def struck(self, round: int) -> Standing:
        """The standing after its leases of ``round`` ended without a usable update."""
        strikes = self.strikes + 1
        return Standing(strikes, max(self.excluded_until, round + 1 + exclusion_rounds(strikes)))

    def excluded(self, round: int) -> bool:
        return round < self.excluded_until


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
    With an ``admission`` (``admit``) claims hold only what they keep under it.
    It holds one lease per peer and round and at most ``max_leases`` in all.
    """

    def __init__(
        self,
        epoch: int,
        planned: Iterable[str],
        *,
        round: int = 0,
        max_microshards: int = MAX_LEASE_MICROSHARDS,
        max_lease_ms: int = MAX_LEASE_MS,
        max_leases: int = MAX_BOOK_LEASES,
    ) -> None:
        self.epoch = epoch
        self.round = round
        self.planned = frozenset(planned)
        self.max_microshards = max_microshards
        self.max_lease_ms = max_lease_ms
        self.max_leases = max_leases
        self.admission: Admission | None = None
        # Capped at max_leases, one per (peer, epoch, round): a peer cannot grow it with leases of one round.
        self._leases: dict[str, LeaseClaim] = {}
        self._by_round: dict[tuple[str, int, int], str] = {}
        self._claimants: dict[str, set[str]] = {}
        self._kept: dict[str, tuple[LeaseClaim, frozenset[str]]] = {}

    def admit(self, admission: Admission | None) -> None:
        """Apply ``admission`` from now on (None: every claim keeps all it claims)."""
        self.admission = admission
        self._kept.clear()

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
        else:
            rival_id = self._by_round.get((claim.peer, claim.epoch, claim.round))
            rival = None if rival_id is None else self._leases[rival_id]
            if rival is not None and _issue_key(claim) < _issue_key(rival):
                raise Invalid("superseded", claim.lease_id)
            if rival is not None:
                self.release(rival.lease_id)
            elif len(self._leases) >= self.max_leases:
                self._make_room()
        self._leases[claim.lease_id] = claim
        self._by_round[(claim.peer, claim.epoch, claim.round)] = claim.lease_id
        for shard in claim.microshards:
            self._claimants.setdefault(shard, set()).add(claim.lease_id)
        return True

    def release(self, lease_id: str) -> LeaseClaim | None:
        """Drop a lease (its update was merged, or its peer left); the dropped claim, if held."""
        held = self._leases.pop(lease_id, None)
        if held is not None:
            self._forget(held)
            key = (held.peer, held.epoch, held.round)
            if self._by_round.get(key) == lease_id:
                del self._by_round[key]
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

    def kept(self, claim: LeaseClaim) -> frozenset[str]:
        """The shards ``claim`` may hold under the book's admission."""
        cached = self._kept.get(claim.lease_id)
        if cached is not None and cached[0] == claim:
            return cached[1]
        kept = frozenset(claim.microshards if self.admission is None else self.admission.kept(claim))
        self._kept[claim.lease_id] = (claim, kept)
        return kept

    def owner_of(self, microshard_id: str) -> LeaseClaim | None:
        """The claim that holds a shard under the rule, if any."""
        claimants = self._claimants.get(microshard_id)
        if not claimants:
            return None
        holding = (claim for claim in map(self._leases.__getitem__, claimants) if microshard_id in self.kept(claim))
        return max(holding, key=lambda claim: _claim_key(microshard_id, claim), default=None)

    def owners(self) -> dict[str, LeaseClaim]:
        """Every held shard and the claim that holds it (``resolve`` over the live leases)."""
        return {shard: owner for shard in self._claimants if (owner := self.owner_of(shard))}

    def leased(self) -> frozenset[str]:
        """The shards some claim holds under the rule."""
        return frozenset(self.owners())

    def claimants(self, round: int) -> frozenset[str]:
        """Peers with a lease for ``round`` in the book, whether or not it holds anything."""
        return frozenset(claim.peer for claim in self._leases.values() if claim.round == round)

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
        """Shards a peer claimed but does not hold (a higher-weight claim, or beyond its cap); it should yield them."""
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

    def _make_room(self) -> None:
        """Drop the leases of peers the admission leaves out (they hold nothing); Invalid if that frees no room."""
        if self.admission is not None:
            for claim in [c for c in self._leases.values() if c.peer not in self.admission.peers]:
                self.release(claim.lease_id)
        if len(self._leases) >= self.max_leases:
            raise Invalid("book_full", f"{len(self._leases)} leases")

    def _forget(self, claim: LeaseClaim) -> None:
        self._kept.pop(claim.lease_id, None)
        for shard in claim.microshards:
            claimants = self._claimants.get(shard)
            if claimants is not None:
                claimants.discard(claim.lease_id)
                if not claimants:
                    del self._claimants[shard]
