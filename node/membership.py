"""Membership: our heartbeats, the peer table, and keeping connections to live peers."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

from node.gossip import Gossip, now_ms
from node.libp2p import BridgeError, Libp2pBridge
from node.logs import get_logger
from protocol.errors import Invalid
from protocol.membership import (
    HEARTBEAT_KIND,
    HEARTBEAT_VERSION,
    LEAVING,
    MAX_PEERS,
    Heartbeat,
    PeerDied,
    PeerEvent,
    PeerJoined,
    PeerRevived,
    PeerTable,
)
from protocol.records import Record

log = get_logger("membership")

SOFTWARE = "p2p-node/0.1.0"
PROTOCOL_VERSION = 1
DIAL_TIMEOUT_S = 10.0
MAX_DIALS_PER_PASS = 8

HeartbeatFields = Callable[[], dict[str, Any]]
PeerListener = Callable[[PeerEvent], None]


class Membership:
    """Publishes our heartbeat, tracks everyone else's, and dials peers we hear about."""

    def __init__(
        self,
        bridge: Libp2pBridge,
        gossip: Gossip,
        *,
        role: str,
        interval_s: float,
        dead_after_missed: int,
        bootstrap: list[str],
        dial_timeout_s: float = DIAL_TIMEOUT_S,
        fields: HeartbeatFields = dict,
        max_peers: int = MAX_PEERS,
    ) -> None:
        self._bridge = bridge
        self._gossip = gossip
        self._role = role
        self._interval_s = interval_s
        self._bootstrap = list(bootstrap)
        self._dial_timeout_s = dial_timeout_s
        self._fields = fields
        # Capped (``MAX_PEERS``): a heartbeat that finds it full of live peers is rejected, and
        # gossip counts it as ``peer_table_full``.
        self.table = PeerTable(bridge.peer_id, dead_after_missed, capacity=max_peers)
        self._listeners: list[PeerListener] = []
        self._dialing: set[str] = set()
        self.heartbeats_sent = 0
        gossip.on(HEARTBEAT_KIND, self._on_heartbeat)

    def set_fields(self, fields: HeartbeatFields) -> None:
        """Where the heartbeat's head, round, device and capabilities come from."""
        self._fields = fields

    def subscribe(self, listener: PeerListener) -> None:
        self._listeners.append(listener)

    def heartbeat(self, leaving: bool = False) -> Heartbeat:
        """This peer's heartbeat; ``leaving``: its last, marked LEAVING."""
        extra = self._fields()
        capabilities = {**extra.get("capabilities", {}), **({LEAVING: 1} if leaving else {})}
        return Heartbeat(
            peer=self._bridge.peer_id,
            addrs=tuple(self._bridge.listen_addrs()[:16]),
            software=SOFTWARE,
            protocol_version=PROTOCOL_VERSION,
            role=self._role,
            interval_ms=int(self._interval_s * 1000),
            head=extra.get("head"),
            round=extra.get("round", 0),
            device=extra.get("device", "cpu"),
            capabilities=tuple(sorted(capabilities.items())),
        )

    async def _on_heartbeat(self, record: Record) -> None:
        heartbeat: Heartbeat = record.body
        if heartbeat.peer != record.author:
            raise Invalid("peer_mismatch", "heartbeat names another peer than its author")
        self._emit(self.table.observe(record.author, record.created_ms, heartbeat, now_ms()))

    def _emit(self, events: list[PeerEvent]) -> None:
        for event in events:
            if isinstance(event, PeerJoined):
                log.info("peer_joined", peer=event.peer)
            elif isinstance(event, PeerRevived):
                log.info("peer_revived", peer=event.peer)
            elif isinstance(event, PeerDied) and event.left:
                log.info("peer_left", peer=event.peer)
            elif isinstance(event, PeerDied):
                log.info("peer_dead", peer=event.peer, silent_s=round(event.silent_ms / 1000, 1))
            for listener in self._listeners:
                listener(event)

    async def leave(self, timeout: float) -> bool:
        """Publish a last heartbeat marked LEAVING: the swarm counts this peer out now, not
        after ``dead_after_missed`` silent intervals. Best effort; whether it went out."""
        try:
            async with asyncio.timeout(timeout):
                last = self.heartbeat(leaving=True).to_wire()
                return bool(await self._gossip.publish(HEARTBEAT_KIND, HEARTBEAT_VERSION, last))
        except Exception as exc:  # noqa: BLE001 - shutting down either way
            log.debug("leave_not_announced", error=f"{type(exc).__name__}: {exc}")
            return False

    async def run(self) -> None:
        """Heartbeat, liveness and connection upkeep, forever."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._publish_loop())
            tasks.create_task(self._liveness_loop())
            tasks.create_task(self._connect_loop())

    async def _publish_loop(self) -> None:
        while True:
            if await self._gossip.publish(HEARTBEAT_KIND, HEARTBEAT_VERSION, self.heartbeat().to_wire()):
                self.heartbeats_sent += 1
            # Jitter keeps a swarm started at once from publishing in lockstep.
            await asyncio.sleep(self._interval_s * random.uniform(0.9, 1.1))

    async def _liveness_loop(self) -> None:
        while True:
            await asyncio.sleep(min(0.5, self._interval_s / 2))
            self._emit(self.table.tick(now_ms()))

    async def _connect_loop(self) -> None:
        passes = 0
        while True:
            await self._connect_pass(refresh_dht=passes % 5 == 1)
            passes += 1
            await asyncio.sleep(1.0 if passes < 10 else 5.0)

    async def _connect_pass(self, refresh_dht: bool) -> None:
        connected = set(self._bridge.connected_peers())
        targets: dict[str, list[str]] = {}
        for address in self._bootstrap:
            peer = address.rsplit("/p2p/", 1)[-1] if "/p2p/" in address else ""
            if peer and peer != self._bridge.peer_id and peer not in connected:
                targets[peer] = [address.rsplit("/p2p/", 1)[0]]
        for peer in self.table.live():
            if peer not in connected:
                targets.setdefault(peer, [a.rsplit("/p2p/", 1)[0] for a in self.table.peers[peer].heartbeat.addrs])
        if refresh_dht:
            try:
                await self._bridge.refresh_routing()
            except (BridgeError, TimeoutError) as exc:
                log.debug("dht_refresh_failed", error=str(exc))
            for peer, addrs in self._bridge.known_peer_addrs().items():
                if peer not in connected and peer not in targets and not self.table.peers.get(peer):
                    targets[peer] = addrs
        chosen = [p for p in targets if p not in self._dialing][:MAX_DIALS_PER_PASS]
        if chosen:
            async with asyncio.TaskGroup() as tasks:
                for peer in chosen:
                    tasks.create_task(self._dial(peer, targets[peer]))

    async def _dial(self, peer: str, addrs: list[str]) -> None:
        if not addrs:
            return
        self._dialing.add(peer)
        try:
            await self._bridge.connect_peer(peer, addrs, self._dial_timeout_s)
            log.debug("dialed", peer=peer)
        except (BridgeError, TimeoutError, ValueError) as exc:
            log.debug("dial_failed", peer=peer, error=str(exc)[:200])
        finally:
            self._dialing.discard(peer)

    def peers_view(self) -> list[dict[str, Any]]:
        now = now_ms()
        connected = set(self._bridge.connected_peers())
        rows = []
        for peer, state in sorted(self.table.peers.items()):
            hb = state.heartbeat
            rows.append(
                {
                    "peer_id": peer,
                    "alive": state.alive,
                    "connected": peer in connected,
                    "last_seen_s_ago": round((now - state.last_seen_ms) / 1000, 2),
                    "first_seen_ms": state.first_seen_ms,
                    "deaths": state.deaths,
                    "addrs": list(hb.addrs),
                    "role": hb.role,
                    "software": hb.software,
                    "protocol_version": hb.protocol_version,
                    "head": hb.head,
                    "round": hb.round,
                    "device": hb.device,
                    "capabilities": dict(hb.capabilities),
                }
            )
        return rows
