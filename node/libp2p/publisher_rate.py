"""Gossip relay rate limiting: a token bucket per publishing peer, and its verdict."""

from __future__ import annotations

import collections
import enum
import time
from collections.abc import Callable, Hashable

MAX_RATED_PUBLISHERS = 10_000  # publishers whose token buckets are kept; the least recently heard go first
FLOOD_FACTOR = 5  # a publisher held back for this many bursts' worth beyond its rate is banned for a while
FLOOD_BAN_S = 60.0  # how long a flooding publisher's gossip is refused and its pubsub link closed


class Verdict(enum.Enum):
    """What the relay check says of one gossip message."""

    ALLOWED = "allowed"
    HELD_BACK = "held_back"
    FLOODING = "flooding"


class PublisherRate:
    """Token buckets per publishing peer, checked before gossipsub relays a message.

    Checked where the message enters, so a peer publishing faster than ``per_s`` (bursts of
    twice that) does not have its excess relayed by anyone: a flood stays at its source
    instead of filling every peer's gossip queues, where honest records would be dropped.
    """

    def __init__(self, per_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._per_s = per_s
        self._clock = clock
        # publisher -> (tokens, excess, last refill); excess drains at ``per_s`` and grows by
        # each message held back, so it measures how far above its rate a publisher keeps going.
        self._buckets: collections.OrderedDict[Hashable, tuple[float, float, float]] = collections.OrderedDict()
        self.dropped = 0

    def allow(self, publisher: Hashable) -> bool:
        return self.check(publisher) is Verdict.ALLOWED

    def check(self, publisher: Hashable) -> Verdict:
        """ALLOWED, HELD_BACK (over the rate), or FLOODING: held back while sustaining several
        times the rate for seconds, which no honest peer does (it sends a few a second)."""
        now = self._clock()
        capacity = 2 * self._per_s
        tokens, excess, last = self._buckets.pop(publisher, (capacity, 0.0, now))
        elapsed = now - last
        tokens = min(capacity, tokens + elapsed * self._per_s)
        excess = max(0.0, excess - elapsed * self._per_s)
        allowed = tokens >= 1
        if allowed:
            tokens -= 1
        else:
            excess += 1
            self.dropped += 1
        self._buckets[publisher] = (tokens, excess, now)
        while len(self._buckets) > MAX_RATED_PUBLISHERS:
            self._buckets.popitem(last=False)
        if allowed:
            return Verdict.ALLOWED
        return Verdict.FLOODING if excess > FLOOD_FACTOR * capacity else Verdict.HELD_BACK
