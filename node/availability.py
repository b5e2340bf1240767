"""Who holds which artifact: our announcements on gossip and the index built from everyone else's."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass

from node.gossip import Gossip, now_ms
from node.logs import get_logger
from protocol.availability import ANNOUNCE_KIND, ANNOUNCE_VERSION, MAX_FETCHING, MAX_HOLDS, Announce
from protocol.membership import PeerDied, PeerEvent
from protocol.records import Record

log = get_logger("availability")


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
        # manifest -> peer -> (complete?, last announced ms)
        self._index: dict[str, dict[str, tuple[bool, int]]] = {}
        self._changed = asyncio.Event()
        gossip.on(ANNOUNCE_KIND, self._on_announce)

    # ---- our side --------------------------------------------------------------------

    def add_held(self, manifest_id: str) -> None:
        self._holds.pop(manifest_id, None)
        self._holds[manifest_id] = None
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
        for entries in self._index.values():
            entries.pop(record.author, None)
        for manifest_id in announce.holds:
            self._index.setdefault(manifest_id, {})[record.author] = (True, seen)
        for manifest_id in announce.fetching:
            self._index.setdefault(manifest_id, {})[record.author] = (False, seen)
        for manifest_id in [m for m, entries in self._index.items() if not entries]:
            del self._index[manifest_id]

    def on_peer_event(self, event: PeerEvent) -> None:
        if isinstance(event, PeerDied):
            self.forget(event.peer)

    def forget(self, peer: str) -> None:
        for entries in self._index.values():
            entries.pop(peer, None)

    def providers(self, manifest_id: str) -> Providers:
        """Peers whose latest announcement still stands (three intervals) for ``manifest_id``."""
        horizon = now_ms() - int(3 * self._interval_s * 1000)
        entries = self._index.get(manifest_id, {})
        full = sorted(p for p, (complete, seen) in entries.items() if complete and seen >= horizon)
        partial = sorted(p for p, (complete, seen) in entries.items() if not complete and seen >= horizon)
        return Providers(tuple(full), tuple(partial))

    def holders(self, manifest_id: str) -> list[str]:
        return list(self.providers(manifest_id).full)
