"""Epoch coverage derived from the head chain: a microshard is done once a canonical head includes it.

The ledger is an immutable value, one per head, so switching forks just means
taking the ledger of the other branch; nothing is ever counted twice.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from protocol.errors import Invalid

ALREADY_DONE = "already_done"
OVERLAP = "overlap"
UNPLANNED = "unplanned_microshard"
WRONG_EPOCH = "wrong_epoch"


class CoversShards(Protocol):
    """Anything that names an epoch and the microshards it covers (heads and updates do)."""

    @property
    def epoch(self) -> int: ...

    @property
    def microshards(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class Inclusion:
    """What counting a set of shards would do: which are new, which are double, which unplanned."""

    new: frozenset[str]
    duplicate: frozenset[str]
    unplanned: frozenset[str]

    @property
    def clean(self) -> bool:
        return not self.duplicate and not self.unplanned


@dataclass(frozen=True)
class Coverage:
    """One epoch's shards split three ways; ``free`` is what peers may claim next."""

    epoch: int
    done: frozenset[str]
    leased: frozenset[str]
    free: frozenset[str]

    @property
    def complete(self) -> bool:
        return not self.leased and not self.free


@dataclass(frozen=True)
class Selection:
    """The updates a round's head may include, and why the others are excluded."""

    included: tuple[str, ...]
    excluded: tuple[tuple[str, str], ...]
    microshards: tuple[str, ...]


@dataclass(frozen=True)
class EpochLedger:
    """The shards of ``epoch`` done as of some head; ``after(head)`` gives the child's ledger."""

    epoch: int
    planned: frozenset[str]
    done: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not self.planned:
            raise ValueError("an epoch needs at least one planned microshard")

    @classmethod
    def start(cls, planned: Iterable[str], epoch: int = 0) -> EpochLedger:
        return cls(epoch, frozenset(planned))

    @property
    def complete(self) -> bool:
        return self.done == self.planned

    @property
    def remaining(self) -> frozenset[str]:
        return self.planned - self.done

    def rolled(self) -> EpochLedger:
        """The ledger the next round works against: a fresh epoch once this one is complete."""
        return EpochLedger(self.epoch + 1, self.planned) if self.complete else self

    def check(self, microshards: Iterable[str]) -> Inclusion:
        shards = frozenset(microshards)
        unplanned = shards - self.planned
        duplicate = (shards & self.done)
        return Inclusion(shards - unplanned - duplicate, duplicate, unplanned)

    def after(self, head: CoversShards) -> EpochLedger:
        """The ledger once ``head`` is on the chain; Invalid if it double-counts or misnumbers the epoch."""
        base = self.rolled()
        if head.epoch != base.epoch:
            raise Invalid(WRONG_EPOCH, f"head epoch {head.epoch}, chain is in epoch {base.epoch}")
        inclusion = base.check(head.microshards)
        if inclusion.unplanned:
            raise Invalid(UNPLANNED, f"{len(inclusion.unplanned)} shards")
        if inclusion.duplicate:
            raise Invalid("double_coverage", f"{len(inclusion.duplicate)} shards already done")
        return EpochLedger(base.epoch, self.planned, base.done | inclusion.new)

    def next_pool(self, consumed: Collection[str]) -> tuple[int, frozenset[str]]:
        """The epoch and free shards of the round after one that takes ``consumed``: what is left of
        this epoch, or the whole plan of the next epoch when ``consumed`` finishes this one."""
        free = self.remaining - frozenset(consumed)
        if free:
            return self.epoch, free
        return self.epoch + 1, self.planned

    def coverage(self, leased: Collection[str] = frozenset()) -> Coverage:
        """Done, leased and free for this epoch; leases on done shards do not count."""
        held = frozenset(leased) & self.remaining
        return Coverage(self.epoch, self.done, held, self.remaining - held)


def replay(planned: Iterable[str], heads: Iterable[CoversShards]) -> EpochLedger:
    """The ledger at the end of a chain given oldest first (from genesis or an epoch's first head)."""
    ledger: EpochLedger | None = None
    for head in heads:
        if ledger is None:
            ledger = EpochLedger.start(planned, head.epoch)
        ledger = ledger.after(head)
    if ledger is None:
        raise ValueError("replay needs at least one head")
    return ledger


def select_updates(ledger: EpochLedger, updates: Mapping[str, CoversShards]) -> Selection:
    """Which of a round's updates the next head includes, given the parent head's ledger.

    Updates are taken in sorted-id order so every peer selects the same way;
    one is excluded when it is for another epoch, names unplanned shards, lists
    a shard already done (double inclusion) or overlaps an update taken before
    it. Excluded updates count nothing, so their shards stay free.
    """
    base = ledger.rolled()
    included: list[str] = []
    excluded: list[tuple[str, str]] = []
    taken: set[str] = set()
    for update_id in sorted(updates):
        update = updates[update_id]
        inclusion = base.check(update.microshards)
        if update.epoch != base.epoch:
            reason: str | None = WRONG_EPOCH
        elif inclusion.unplanned:
            reason = UNPLANNED
        elif inclusion.duplicate:
            reason = ALREADY_DONE
        elif not taken.isdisjoint(inclusion.new):
            reason = OVERLAP
        else:
            reason = None
        if reason is None:
            included.append(update_id)
            taken.update(inclusion.new)
        else:
            excluded.append((update_id, reason))
    return Selection(tuple(included), tuple(excluded), tuple(sorted(taken)))
