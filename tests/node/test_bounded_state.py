"""Bounded state: signed records from any number of fresh keys cannot grow a peer's tables past their caps."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from node.availability import MAX_ANNOUNCED, MAX_HELD, Availability
from node.daemon import NODE_RECORDS
from node.distribution import MAX_VARIANT_ANNOUNCERS, MAX_VARIANT_HEADS, MAX_VARIANT_MANIFESTS, Distribution
from node.exchange import MAX_PEER_STATS, ExchangeStats
from node.gossip import Gossip, now_ms
from node.libp2p import GossipSettings, Libp2pBridge
from node.membership import Membership
from node.operator import MAX_OPERATOR_RECORDS, Operations
from node.store import ContentStore
from protocol.availability import ANNOUNCE_KIND, MAX_HOLDS, Announce
from protocol.cid import content_id
from protocol.control import PatchRecord, RollbackRecord, latest_rollback
from protocol.identity import SigningKey
from protocol.kinds import PATCH, ROLLBACK, record_kinds
from protocol.membership import HEARTBEAT_KIND, MAX_PEERS, Heartbeat
from protocol.records import sign_record
from protocol.variants import VARIANT_KIND, VariantRecord

SWARM = "bounded"
ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def _cid(text: str) -> str:
    return content_id(text.encode())


def _heartbeat(key: SigningKey, created_ms: int | None = None) -> bytes:
    beat = Heartbeat(key.peer_id, ("/ip4/127.0.0.1/tcp/1",), "t", 1, "trainer", 1000)
    return sign_record(key, HEARTBEAT_KIND, 1, SWARM, beat.to_wire(), created_ms or now_ms())


def _with_gossip(body: Callable[[Libp2pBridge, Gossip], Awaitable[T]], **gossip_args: object) -> T:
    """Run ``body`` with a real host and its gossip (no rate limit: the caps are what is tested)."""

    async def run() -> T:
        key = SigningKey.generate()
        bridge = Libp2pBridge(key.seed, ["/ip4/127.0.0.1/tcp/0"], kademlia=False)
        await bridge.start()
        try:
            gossip = Gossip(bridge, key, SWARM, record_kinds(NODE_RECORDS), **gossip_args)  # type: ignore[arg-type]
            await gossip.start()
            return await body(bridge, gossip)
        finally:
            await bridge.stop()

    return asyncio.run(run())


def test_fresh_keys_cannot_grow_the_peer_table_or_push_out_live_peers() -> None:
    flood = [SigningKey.generate() for _ in range(MAX_PEERS + 300)]
    honest = flood[0]

    async def body(bridge: Libp2pBridge, gossip: Gossip) -> None:
        membership = Membership(bridge, gossip, role="trainer", interval_s=1.0, dead_after_missed=3, bootstrap=[])
        table = membership.table
        for key in flood:
            await gossip.handle_message(_heartbeat(key), key.peer_id)
        assert len(table.peers) == MAX_PEERS
        assert table.dropped["table_full"] == 300
        assert gossip.rejected["peer_table_full"] == 300
        assert all(key.peer_id not in table.peers for key in flood[MAX_PEERS:])
        # A peer already in the table is still heard while it is full.
        await gossip.handle_message(_heartbeat(honest, now_ms() + 1), honest.peer_id)
        assert table.is_live(honest.peer_id) and gossip.rejected["peer_table_full"] == 300

        # Once peers fall silent, a newcomer takes the place of the one heard from least recently.
        table.tick(now_ms() + 60_000)
        newcomer = SigningKey.generate()
        await gossip.handle_message(_heartbeat(newcomer), newcomer.peer_id)
        assert table.is_live(newcomer.peer_id) and len(table.peers) == MAX_PEERS
        assert table.dropped["dead_evicted"] == 1
        assert flood[1].peer_id not in table.peers and honest.peer_id in table.peers

    _with_gossip(body)


def test_announcements_from_fresh_keys_stay_within_the_index_caps() -> None:
    announcers = MAX_ANNOUNCED // MAX_HOLDS + 40
    keys = [SigningKey.generate() for _ in range(announcers)]

    def announce(key: SigningKey) -> bytes:
        holds = sorted(_cid(f"{key.peer_id}/{i}") for i in range(MAX_HOLDS))
        return sign_record(key, ANNOUNCE_KIND, 1, SWARM, Announce(tuple(holds)).to_wire(), now_ms())

    async def body(bridge: Libp2pBridge, gossip: Gossip) -> None:
        availability = Availability(gossip, bridge.peer_id, interval_s=60.0)
        for key in keys:
            await gossip.handle_message(announce(key), key.peer_id)
        assert availability.holders(_cid(f"{keys[0].peer_id}/0")) == []  # the least recently heard went
        assert availability.holders(_cid(f"{keys[-1].peer_id}/0")) == [keys[-1].peer_id]
        assert availability.indexed_pairs <= MAX_ANNOUNCED
        assert availability.dropped["full"] == 40

    _with_gossip(body)


def test_announcements_expire_once_they_no_longer_name_a_provider() -> None:
    first, second = SigningKey.generate(), SigningKey.generate()
    manifest = _cid("weights")

    async def body(bridge: Libp2pBridge, gossip: Gossip) -> None:
        availability = Availability(gossip, bridge.peer_id, interval_s=0.05)
        wire = Announce((manifest,)).to_wire()
        await gossip.handle_message(sign_record(first, ANNOUNCE_KIND, 1, SWARM, wire, now_ms()), first.peer_id)
        await asyncio.sleep(0.2)  # past three intervals
        await gossip.handle_message(sign_record(second, ANNOUNCE_KIND, 1, SWARM, wire, now_ms()), second.peer_id)
        assert availability.holders(manifest) == [second.peer_id]
        assert availability.indexed_pairs == 1 and availability.dropped["expired"] == 1

    _with_gossip(body)


def test_this_peers_own_holdings_keep_the_newest() -> None:
    async def body(bridge: Libp2pBridge, gossip: Gossip) -> None:
        availability = Availability(gossip, bridge.peer_id, interval_s=60.0)
        for i in range(MAX_HELD + 5):  # one per fetched update, over a long run
            availability.add_held(_cid(f"update {i}"))
        assert not availability.holds(_cid("update 0")) and availability.holds(_cid(f"update {MAX_HELD + 4}"))
        assert availability.dropped["held"] == 5
        assert len(availability.announcement().holds) == MAX_HOLDS

    _with_gossip(body)


def test_variant_announcements_stay_within_their_caps(tmp_path: Path) -> None:
    head = _cid("head")

    def variant(key: SigningKey, head_id: str, manifest: str) -> bytes:
        return sign_record(key, VARIANT_KIND, 1, SWARM, VariantRecord(head_id, "bf16", manifest).to_wire(), now_ms())

    async def body(bridge: Libp2pBridge, gossip: Gossip) -> None:
        availability = Availability(gossip, bridge.peer_id, interval_s=60.0)
        distribution = Distribution(
            gossip, bridge.peer_id, ContentStore(tmp_path), availability, (), "", "fp32"
        )
        honest = _cid("bf16 weights")
        announced = distribution.variants
        for _ in range(MAX_VARIANT_ANNOUNCERS + 20):
            key = SigningKey.generate()
            await gossip.handle_message(variant(key, head, honest), key.peer_id)
        assert len(announced[head]["bf16"][honest]) == MAX_VARIANT_ANNOUNCERS
        for i in range(MAX_VARIANT_MANIFESTS + 10):
            key = SigningKey.generate()
            await gossip.handle_message(variant(key, head, _cid(f"forged {i}")), key.peer_id)
        assert len(announced[head]["bf16"]) == MAX_VARIANT_MANIFESTS and honest in announced[head]["bf16"]
        for i in range(MAX_VARIANT_HEADS + 30):
            key = SigningKey.generate()
            await gossip.handle_message(variant(key, _cid(f"head {i}"), honest), key.peer_id)
        assert len(announced) == MAX_VARIANT_HEADS
        assert distribution.dropped == {
            "announcers_full": 20, "manifests_full": 11, "head_evicted": 31,
        }

    _with_gossip(body)


def test_operator_records_stay_within_their_cap() -> None:
    operator = SigningKey.generate()
    extra = 50

    async def body(bridge: Libp2pBridge, gossip: Gossip) -> None:
        operations = Operations(gossip, operator, frozenset({operator.peer_id}))
        issued = now_ms()
        for i in range(MAX_OPERATOR_RECORDS + extra):
            patch = PatchRecord.create({"inner_steps": 1 + i}, i, issued)
            raw = sign_record(operator, PATCH, 1, SWARM, patch.to_wire(), issued)
            await gossip.handle_message(raw, operator.peer_id)
            rollback = RollbackRecord(_cid(f"head {i}"), "r", issued + i)
            raw = sign_record(operator, ROLLBACK, 1, SWARM, rollback.to_wire(), issued)
            await gossip.handle_message(raw, operator.peer_id)
        assert len(operations.raw) == len(operations.patches) == len(operations.rollbacks) == MAX_OPERATOR_RECORDS
        assert operations.dropped == {"raw": 2 * MAX_OPERATOR_RECORDS + 2 * extra - MAX_OPERATOR_RECORDS,
                                      "patches": extra, "rollbacks": extra}
        newest = latest_rollback(operations.rollbacks.values())
        assert newest is not None and newest.target == _cid(f"head {MAX_OPERATOR_RECORDS + extra - 1}")
        assert operations.settings_at({}, 10**9) == {"inner_steps": MAX_OPERATOR_RECORDS + extra}

    _with_gossip(body, timeless=frozenset({ROLLBACK, PATCH}))


def test_per_peer_exchange_counters_keep_the_peers_that_count() -> None:
    stats = ExchangeStats()
    liar = SigningKey.generate().peer_id
    for _ in range(5):
        stats.count_peer(stats.rejected_chunks_by_peer, liar, "rejected_chunks_by_peer")
    for _ in range(MAX_PEER_STATS + 100):
        peer = SigningKey.generate().peer_id
        stats.count_peer(stats.rejected_chunks_by_peer, peer, "rejected_chunks_by_peer")
        stats.count_peer(stats.timeouts_by_peer, peer, "timeouts_by_peer")
    assert len(stats.rejected_chunks_by_peer) == len(stats.timeouts_by_peer) == MAX_PEER_STATS
    assert stats.rejected_chunks_by_peer[liar] == 5  # the worst offender is not the one evicted
    assert stats.dropped == {"rejected_chunks_by_peer": 101, "timeouts_by_peer": 100}


# ---- over real gossip, measured in memory --------------------------------------------------

FLOOD = 3000
FLOOD_CAP = 128  # the receiver's peer table; its states then take ~2 MB
# Each flooded heartbeat is at the wire limits (16 long addresses, 32 text capabilities): a peer
# state of ~17 KB, so an unbounded table grows ~75 MiB over ~3,000 of them. At the cap the
# process still grows ~30 MiB (heap fragmentation from the 11 KB messages, gossip's caches of
# recent messages, the public-key cache), hence the allowance between the two.
RSS_GROWTH_LIMIT_MIB = 45

SENDER = """
import asyncio, sys
from node.gossip import now_ms, records_topic
from node.libp2p import GossipSettings, Libp2pBridge
from protocol.identity import SigningKey
from protocol.membership import HEARTBEAT_KIND, Heartbeat
from protocol.records import sign_record

def heartbeat(key, swarm):
    addrs = tuple(f"/dns4/{'a' * 200}.example/tcp/{4000 + i}/p2p/{key.peer_id}" for i in range(16))
    caps = {f"capability{i:02d}": "x" * 200 for i in range(32)}
    beat = Heartbeat(key.peer_id, addrs, "t" * 200, 1, "trainer", 60_000, device="d" * 200,
                     capabilities=tuple(sorted(caps.items())))
    return sign_record(key, HEARTBEAT_KIND, 1, swarm, beat.to_wire(), now_ms())

async def main(address, count, swarm):
    key = SigningKey.generate()
    bridge = Libp2pBridge(key.seed, ["/ip4/127.0.0.1/tcp/0"], gossip=GossipSettings(heartbeat_interval_s=0.2), kademlia=False)
    await bridge.start()
    topic = records_topic(swarm)
    await bridge.subscribe(topic)
    await bridge.connect(address, timeout=10)
    loop = asyncio.get_running_loop()
    go = loop.run_in_executor(None, sys.stdin.readline)
    while not go.done():  # until the receiver has heard us: the mesh has formed
        await bridge.publish(topic, heartbeat(key, swarm))
        await asyncio.sleep(0.2)
    # Paced at about 130 a second: gossip drops what overflows its per-peer queues, and a busy
    # receiver drains them slower than that.
    for start in range(0, count, 20):
        for _ in range(min(20, count - start)):
            await bridge.publish(topic, heartbeat(SigningKey.generate(), swarm))
        await asyncio.sleep(0.15)
    print("sent", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    await bridge.stop()

asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
"""


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_a_heartbeat_flood_over_gossip_leaves_memory_bounded() -> None:
    async def scenario() -> tuple[float, int, int, int]:
        key = SigningKey.generate()
        bridge = Libp2pBridge(
            key.seed, ["/ip4/127.0.0.1/tcp/0"], gossip=GossipSettings(heartbeat_interval_s=0.2), kademlia=False
        )
        await bridge.start()
        sender = subprocess.Popen(
            [sys.executable, "-c", SENDER, bridge.listen_addrs()[0], str(FLOOD), SWARM],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert sender.stdin is not None and sender.stdout is not None
        try:
            gossip = Gossip(bridge, key, SWARM, record_kinds(NODE_RECORDS))
            await gossip.start()
            membership = Membership(
                bridge, gossip, role="trainer", interval_s=1.0, dead_after_missed=3, bootstrap=[],
                max_peers=FLOOD_CAP,
            )
            draining = asyncio.ensure_future(gossip.run())
            try:
                deadline = time.monotonic() + 60
                while gossip.accepted[HEARTBEAT_KIND] < 3:
                    assert time.monotonic() < deadline and sender.poll() is None, "the sender was never heard"
                    await asyncio.sleep(0.1)
                gc.collect()
                before = _rss_mib()
                warmup = gossip.accepted[HEARTBEAT_KIND]
                sender.stdin.write("go\n")
                sender.stdin.flush()
                assert await asyncio.to_thread(sender.stdout.readline) == "sent\n"
                # Until the flood has been handled: the count stops rising.
                last, since = -1, time.monotonic()
                while time.monotonic() - since < 3.0:
                    if gossip.accepted[HEARTBEAT_KIND] != last:
                        last, since = gossip.accepted[HEARTBEAT_KIND], time.monotonic()
                    await asyncio.sleep(0.1)
                heard = last - warmup
            finally:
                draining.cancel()
                await asyncio.gather(draining, return_exceptions=True)
            gc.collect()
            growth = _rss_mib() - before
            return growth, heard, len(membership.table.peers), gossip.rejected["peer_table_full"]
        finally:
            sender.stdin.close()
            try:
                sender.wait(timeout=15)
            except subprocess.TimeoutExpired:
                sender.kill()
                sender.wait()
            await bridge.stop()

    growth, heard, peers, refused = asyncio.run(scenario())
    # Gossip itself drops some of a flood on a busy machine; half is plenty to tell the cases apart.
    assert heard >= FLOOD // 2, f"only {heard} of {FLOOD} heartbeats arrived"
    assert peers == FLOOD_CAP
    # The sender's own heartbeats still in flight when the flood starts are heard, not refused.
    assert refused >= heard - FLOOD_CAP - 5
    assert growth < RSS_GROWTH_LIMIT_MIB, f"RSS grew {growth:.1f} MiB over {heard} heartbeats from fresh keys"
