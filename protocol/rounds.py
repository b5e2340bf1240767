"""The round close rule: wait for every live expected peer's update, or for the deadline, never longer."""

from __future__ import annotations

import enum
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from protocol.updates import UpdateRecord


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
