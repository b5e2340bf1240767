"""The rules of a round every peer computes alike: when it closes (every live expected peer's
update, or the deadline, never longer), how long it waits, and each peer's inner budget."""

from __future__ import annotations

import enum
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from protocol.updates import UpdateRecord


class Phase(enum.StrEnum):
    """What a peer's round loop is doing, as ``/status`` and heartbeats name it (the value)."""

    STARTING = "starting"  # the daemon is starting
    SYNCING = "syncing"  # listening for the swarm's canonical head before training
    LOADING = "loading"  # reading a head's weights
    FOLLOWING = "following"  # a peer that does not train: adopting heads as they come
    CATCHING_UP = "catching_up"  # waiting for the verdict on a head rounds ahead
    LEASING = "leasing"  # claiming the round's microshards
    TRAINING = "training"  # the inner loop
    PUBLISHING = "publishing"  # storing and announcing the round's update
    WAITING = "waiting"  # for the other peers' updates
    FETCHING = "fetching"  # the round's updates
    MERGING = "merging"  # the outer step
    ADOPTING = "adopting"  # linking the merged head


class Offer(enum.Enum):
    """What became of an update offered to a round."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"  # this very update was already accepted
    WRONG_ROUND = "wrong_round"
    WRONG_BASE = "wrong_base"
    PEER_COUNTED = "peer_counted"  # its peer already has another update in this round
    LATE = "late"  # the round is closed


class CloseReason(enum.Enum):
    COMPLETE = "complete"
    DEADLINE = "deadline"


@dataclass(frozen=True)
class RoundResult:
    """A closed round: the updates to merge (sorted ids) and the expected peers that never sent one."""

    round: int
    base_head: str
    updates: tuple[str, ...]
    missing: frozenset[str]
    reason: CloseReason


class RoundState:
    """One round seen from one peer: which updates arrived, who is still owed, when to stop waiting.

    ``expected`` are the peers that took leases this round; of those only the
    ones currently live are waited for, so a dead peer or a straggler past
    the deadline cannot hold the round open.
    """

    def __init__(self, round: int, base_head: str, expected: Iterable[str], deadline_ms: int) -> None:
        self.round = round
        self.base_head = base_head
        self.deadline_ms = deadline_ms
        self.expected: set[str] = set(expected)
        self.dead: set[str] = set()
        self._by_peer: dict[str, str] = {}
        self._result: RoundResult | None = None

    @property
    def closed(self) -> bool:
        return self._result is not None

    @property
    def result(self) -> RoundResult | None:
        return self._result

    def offer(self, update_id: str, update: UpdateRecord) -> Offer:
        """Count an update for this round, or say why it is not counted."""
        if self._result is not None:
            return Offer.LATE
        if update.round != self.round:
            return Offer.WRONG_ROUND
        if update.base != self.base_head:
            return Offer.WRONG_BASE
        counted = self._by_peer.get(update.peer)
        if counted == update_id:
            return Offer.DUPLICATE
        if counted is not None:
            return Offer.PEER_COUNTED
        self._by_peer[update.peer] = update_id
        return Offer.ACCEPTED

    def expect(self, peer: str) -> None:
        """A peer took a lease for this round after the round began."""
        self.expected.add(peer)

    def set_live(self, peer: str, live: bool) -> None:
        """Membership changed: dead peers are not waited for; a peer back in time is again."""
        if live:
            self.dead.discard(peer)
        else:
            self.dead.add(peer)

    def counted(self, peer: str) -> bool:
        """Whether an update of ``peer`` counts for this round."""
        return peer in self._by_peer

    @property
    def waiting_for(self) -> frozenset[str]:
        """Live expected peers whose update has not arrived."""
        return frozenset(self.expected - self.dead - self._by_peer.keys())

    @property
    def updates(self) -> tuple[str, ...]:
        return tuple(sorted(self._by_peer.values()))

    def should_close(self, now_ms: int) -> bool:
        """True at the deadline, or once at least one update arrived and no live expected peer is owed one."""
        return now_ms >= self.deadline_ms or (bool(self._by_peer) and not self.waiting_for)

    def close(self, now_ms: int) -> RoundResult:
        """Close the round (idempotent); later offers are LATE."""
        if self._result is None:
            complete = bool(self._by_peer) and not self.waiting_for
            self._result = RoundResult(
                round=self.round,
                base_head=self.base_head,
                updates=self.updates,
                missing=frozenset(self.expected - self._by_peer.keys()),
                reason=CloseReason.COMPLETE if complete else CloseReason.DEADLINE,
            )
        return self._result


def adaptive_deadline_ms(
    inner_durations_ms: Sequence[int],
    *,
    factor: float = 1.5,
    margin_ms: int = 10_000,
    min_ms: int = 30_000,
    max_ms: int = 3_600_000,
) -> int:
    """How long a round should wait: median observed inner-loop time * factor + margin, within bounds.

    With nothing observed yet the round waits the longest allowed.
    """
    if not inner_durations_ms:
        return max_ms
    wanted = statistics.median(inner_durations_ms) * factor + margin_ms
    return int(min(max(wanted, min_ms), max_ms))


def measured_speeds(merged: Iterable[tuple[str, int, int]]) -> dict[str, float]:
    """Inner steps per second of inner time, by peer, from the (peer, steps, inner_ms) of the
    updates merged into a head: what every peer holding that head computes alike. Updates of
    fewer than two steps measure too little to count."""
    return {peer: steps * 1000 / inner_ms for peer, steps, inner_ms in merged if steps >= 2 and inner_ms > 0}


def inner_budget(mode: str, inner_steps: int, speeds: Mapping[str, float], peer: str) -> tuple[int, float | None]:
    """Most inner steps ``peer`` runs in a round, and its training time budget (None: no limit).

    ``mode == "time"``: the budget is what ``inner_steps`` take the median trainer, so every
    trainer stops at about the same moment; a peer faster than the median leases data for (and
    may run) more steps, up to twice as many, a slower one runs fewer. ``"steps"``: every peer
    runs ``inner_steps``.
    """
    if mode != "time":
        return inner_steps, None
    reference = statistics.median(speeds.values())
    steps = min(2 * inner_steps, math.ceil(inner_steps * max(1.0, speeds[peer] / reference)))
    return steps, inner_steps / reference

