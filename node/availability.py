"""Who holds which artifact: our announcements on gossip and the index built from everyone else's."""

from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict
from dataclasses import dataclass

from node.gossip import Gossip, now_ms
from node.logs import get_logger
from protocol.availability import ANNOUNCE_KIND, ANNOUNCE_VERSION, MAX_FETCHING, MAX_HOLDS, Announce
from protocol.membership import PeerDied, PeerEvent
from protocol.records import Record

log = get_logger("availability")

# Peers whose announcements are indexed. Anyone can make keys, so the index is capped; 2048 is
# far above a swarm's size. An announcement names up to MAX_HOLDS + MAX_FETCHING manifests, so
# the cap on pairs below usually binds first.
MAX_ANNOUNCERS = 2048
# (manifest, peer) pairs indexed, at ~200 bytes each (~13 MB at most): an honest peer announces
# tens of manifests, so this holds a thousand such peers with room to spare.
MAX_ANNOUNCED = 65_536
# Manifests this peer remembers holding, newest last. Every fetched update adds one and store GC
# does not report removals, so the oldest go first; only the newest MAX_HOLDS are announced.
MAX_HELD = 4 * MAX_HOLDS


@dataclass(frozen=True)
class Providers:
    full: tuple[str, ...]
    partial: tuple[str, ...]


class Availability:
    """Announces our holdings (periodically, since gossip is lossy) and indexes the swarm's."""

    def __init__(self, gossip: Gossip, self_peer: str, interval_s: float) -> None:
        self._gossip = gossip
        self._self = self_peer
        self._interval_s = interval_s
        self._holds: OrderedDict[str, None] = OrderedDict()
        self._fetching: set[str] = set()
        # peer -> (manifests of its latest announcement, when heard), least recently heard first.
        # Bounded by MAX_ANNOUNCERS and MAX_ANNOUNCED, evicting the least recently heard, and by
        # age: an announcement older than three intervals names no provider (``providers``).
        self._announced: OrderedDict[str, tuple[tuple[str, ...], int]] = OrderedDict()
        self._pairs = 0  # entries across ``_announced``
        # manifest -> peer -> complete?, for the peers in ``_announced``
        self._index: dict[str, dict[str, bool]] = {}
        self.dropped: Counter[str] = Counter()  # announcers and our oldest holdings forgotten
        self._changed = asyncio.Event()
        gossip.on(ANNOUNCE_KIND, self._on_announce)

    # ---- our side --------------------------------------------------------------------

    def add_held(self, manifest_id: str) -> None:
        self._holds.pop(manifest_id, None)
        self._holds[manifest_id] = None
        while len(self._holds) > MAX_HELD:
            self._holds.popitem(last=False)
            self.dropped["held"] += 1
        self._fetching.discard(manifest_id)
        self._changed.set()

    def remove_held(self, manifest_id: str) -> None:
        if self._holds.pop(manifest_id, 0) is None:
            self._changed.set()

    def set_fetching(self, manifest_id: str, active: bool) -> None:
        if active:
            self._fetching.add(manifest_id)
        else:
            self._fetching.discard(manifest_id)
        self._changed.set()

    def holds(self, manifest_id: str) -> bool:
        return manifest_id in self._holds

    def announcement(self) -> Announce:
        newest = list(self._holds)[-MAX_HOLDS:]
        fetching = sorted(self._fetching)[:MAX_FETCHING]
        return Announce(tuple(newest), tuple(fetching))

    async def run(self) -> None:
        while True:
            await self._gossip.publish(ANNOUNCE_KIND, ANNOUNCE_VERSION, self.announcement().to_wire())
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), self._interval_s)
                await asyncio.sleep(0.2)  # debounce bursts of changes into one record
            except TimeoutError:
                pass

    # ---- the swarm's side ------------------------------------------------------------

    async def _on_announce(self, record: Record) -> None:
        if record.author == self._self:
            return
        announce: Announce = record.body
        seen = now_ms()
        self.forget(record.author)
        for manifest_id in announce.holds:
            self._index.setdefault(manifest_id, {})[record.author] = True
        for manifest_id in announce.fetching:
            self._index.setdefault(manifest_id, {})[record.author] = False
        manifests = tuple(dict.fromkeys((*announce.holds, *announce.fetching)))
        self._announced[record.author] = (manifests, seen)
        self._pairs += len(manifests)
        self._evict(seen)

    def _evict(self, now: int) -> None:
        """Forget announcements too old to name a provider, then the least recently heard over the caps."""
        horizon = now - self._horizon_ms()
        while self._announced:
            peer, (_, seen) = next(iter(self._announced.items()))
            if seen >= horizon and len(self._announced) <= MAX_ANNOUNCERS and self._pairs <= MAX_ANNOUNCED:
                return
            self.dropped["expired" if seen < horizon else "full"] += 1
            self.forget(peer)

    def _horizon_ms(self) -> int:
        return int(3 * self._interval_s * 1000)

    def on_peer_event(self, event: PeerEvent) -> None:
        if isinstance(event, PeerDied):
            self.forget(event.peer)

    def forget(self, peer: str) -> None:
        manifests, _ = self._announced.pop(peer, ((), 0))
        self._pairs -= len(manifests)
        for manifest_id in manifests:
            entries = self._index[manifest_id]
            del entries[peer]
            if not entries:
                del self._index[manifest_id]

    def providers(self, manifest_id: str) -> Providers:
        """Peers whose latest announcement still stands (three intervals) for ``manifest_id``."""
        horizon = now_ms() - self._horizon_ms()
        entries = self._index.get(manifest_id, {})
        current = [(p, complete) for p, complete in entries.items() if self._announced[p][1] >= horizon]
        full = sorted(p for p, complete in current if complete)
        partial = sorted(p for p, complete in current if not complete)
        return Providers(tuple(full), tuple(partial))

    @property
    def indexed_pairs(self) -> int:
        """(manifest, peer) pairs indexed now: at most MAX_ANNOUNCED."""
        return self._pairs

    def holders(self, manifest_id: str) -> list[str]:
        return list(self.providers(manifest_id).full)
