"""Heartbeat records and the peer table: who is in the swarm, and who is alive."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from protocol.cid import is_content_id
from protocol.errors import Invalid

HEARTBEAT_KIND = "heartbeat"
HEARTBEAT_VERSION = 1
MAX_ADDRS = 16
MAX_TEXT = 200
MAX_CAPABILITIES = 32
# A heartbeat capability: set (to 1) in the last heartbeat of a peer that is shutting down, so the
# others count it out at once instead of after ``dead_after_missed`` silent intervals.
LEAVING = "leaving"
ROLES = frozenset({"trainer", "consumer", "bootstrap"})
# Peers the table holds. A swarm is open to new keys, so without a cap anyone could grow it with
# fresh ones; 2048 is far above the tens of peers a swarm runs, and a peer's state costs 1-2 KB
# for a usual heartbeat (17 KB at the wire limits above), so the table stays under ~35 MB.
MAX_PEERS = 2048


def _text(value: Any, name: str, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise Invalid("malformed", f"{name} must be a string of at most {limit} characters")
    return value


def _count(value: Any, name: str) -> int:
    if type(value) is not int or value < 0:
        raise Invalid("malformed", f"{name} must be a non-negative integer")
    return value


@dataclass(frozen=True)
class Heartbeat:
    """What a peer says about itself every few seconds."""

    peer: str
    addrs: tuple[str, ...]
    software: str
    protocol_version: int
    role: str
    interval_ms: int
    head: str | None = None
    round: int = 0
    device: str = "cpu"
    capabilities: tuple[tuple[str, int | str], ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {
            "peer": self.peer,
            "addrs": list(self.addrs),
            "software": self.software,
            "protocol_version": self.protocol_version,
            "role": self.role,
            "interval_ms": self.interval_ms,
            "head": self.head,
            "round": self.round,
            "device": self.device,
            "capabilities": {key: value for key, value in self.capabilities},
        }

    @classmethod
    def from_wire(cls, value: Any) -> Heartbeat:
        expected = {
            "peer", "addrs", "software", "protocol_version", "role", "interval_ms",
            "head", "round", "device", "capabilities",
        }
        if not isinstance(value, dict) or set(value) != expected:
            raise Invalid("malformed", "heartbeat fields")
        addrs = value["addrs"]
        if not isinstance(addrs, list) or len(addrs) > MAX_ADDRS:
            raise Invalid("malformed", f"addrs must be a list of at most {MAX_ADDRS}")
        head = value["head"]
        if head is not None and not is_content_id(head):
            raise Invalid("malformed", "head must be a content id or nil")
        role = _text(value["role"], "role")
        if role not in ROLES:
            raise Invalid("malformed", f"unknown role {role!r}")
        capabilities = value["capabilities"]
        if not isinstance(capabilities, dict) or len(capabilities) > MAX_CAPABILITIES:
            raise Invalid("malformed", "capabilities must be a small map")
        for key, item in capabilities.items():
            _text(key, "capability name", 40)
            if not (type(item) is int or (isinstance(item, str) and len(item) <= MAX_TEXT)):
                raise Invalid("malformed", f"capability {key} must be an integer or short text")
        interval_ms = _count(value["interval_ms"], "interval_ms")
        if not 100 <= interval_ms <= 600_000:
            raise Invalid("malformed", "interval_ms out of range")
        return cls(
            peer=_text(value["peer"], "peer", 100),
            addrs=tuple(_text(a, "addr", 300) for a in addrs),
            software=_text(value["software"], "software"),
            protocol_version=_count(value["protocol_version"], "protocol_version"),
            role=role,
            interval_ms=interval_ms,
            head=head,
            round=_count(value["round"], "round"),
            device=_text(value["device"], "device"),
            capabilities=tuple(sorted(capabilities.items())),
        )


@dataclass(frozen=True)
class PeerState:
    """What the table knows of one peer."""

    peer: str
    heartbeat: Heartbeat
    first_seen_ms: int
    last_seen_ms: int
    last_created_ms: int
    alive: bool = True
    deaths: int = 0


@dataclass(frozen=True)
class PeerJoined:
    peer: str


@dataclass(frozen=True)
class PeerRevived:
    peer: str


@dataclass(frozen=True)
class PeerDied:
    peer: str
    silent_ms: int
    left: bool = False  # it said goodbye (LEAVING) rather than fall silent


PeerEvent = PeerJoined | PeerRevived | PeerDied


@dataclass
class PeerTable:
    """Liveness by heartbeat: a peer is dead after ``dead_after_missed`` of its own intervals.

    At most ``capacity`` peers. A newcomer to a full table takes the place of the dead peer
    heard from least recently; while every peer is alive it is refused (Invalid
    ``peer_table_full``): fresh keys cannot push out the peers a round counts on.
    ``dropped`` counts refusals and evictions by reason.
    """

    self_peer: str
    dead_after_missed: int = 3
    # Ordered from the least to the most recently heard: the first dead peer is the one to evict.
    peers: dict[str, PeerState] = field(default_factory=dict)
    capacity: int = MAX_PEERS
    dropped: Counter[str] = field(default_factory=Counter)

    def observe(self, author: str, created_ms: int, heartbeat: Heartbeat, now_ms: int) -> list[PeerEvent]:
        """Record a validated heartbeat; stale or replayed heartbeats change nothing."""
        if author == self.self_peer:
            return []
        if heartbeat.peer != author:
            raise Invalid("peer_mismatch", "heartbeat names another peer than its author")
        known = self.peers.get(author)
        leaving = bool(dict(heartbeat.capabilities).get(LEAVING))
        if known is None:
            if leaving:
                return []  # a goodbye from a peer we never knew: nothing to forget
            self._make_room()
            self.peers[author] = PeerState(author, heartbeat, now_ms, now_ms, created_ms)
            return [PeerJoined(author)]
        if created_ms <= known.last_created_ms:
            return []
        del self.peers[author]  # re-inserted last: the most recently heard
        if leaving:
            self.peers[author] = replace(
                known, heartbeat=heartbeat, last_seen_ms=now_ms, last_created_ms=created_ms, alive=False,
                deaths=known.deaths + 1 if known.alive else known.deaths,
            )
            return [PeerDied(author, 0, left=True)] if known.alive else []
        revived = not known.alive
        self.peers[author] = replace(
            known, heartbeat=heartbeat, last_seen_ms=now_ms, last_created_ms=created_ms, alive=True
        )
        return [PeerRevived(author)] if revived else []

    def _make_room(self) -> None:
        """Evict dead peers, least recently heard first, until a newcomer fits; Invalid if none can go."""
        while len(self.peers) >= self.capacity:
            dead = next((peer for peer, state in self.peers.items() if not state.alive), None)
            if dead is None:
                self.dropped["table_full"] += 1
                raise Invalid("peer_table_full", f"{len(self.peers)} live peers")
            del self.peers[dead]
            self.dropped["dead_evicted"] += 1

    def tick(self, now_ms: int) -> list[PeerEvent]:
        """Mark peers dead whose heartbeats stopped; return who died."""
        events: list[PeerEvent] = []
        for peer, state in list(self.peers.items()):
            silent = now_ms - state.last_seen_ms
            if state.alive and silent > self.dead_after_missed * state.heartbeat.interval_ms:
                self.peers[peer] = replace(state, alive=False, deaths=state.deaths + 1)
                events.append(PeerDied(peer, silent))
        return events

    def live(self) -> list[str]:
        return sorted(p for p, s in self.peers.items() if s.alive)

    def is_live(self, peer: str) -> bool:
        state = self.peers.get(peer)
        return state is not None and state.alive
