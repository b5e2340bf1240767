"""Gossip validation on a real libp2p host: rejections by reason, rate limits, dispatch."""

import asyncio
import os
import time

from node.daemon import NODE_RECORDS
from node.gossip import Gossip, records_topic
from node.libp2p import Libp2pBridge
from protocol.identity import SigningKey
from protocol.kinds import record_kinds
from protocol.membership import HEARTBEAT_KIND, Heartbeat
from protocol.records import sign_record


async def _with_gossip(rate: float, body):
    key = SigningKey.generate()
    bridge = Libp2pBridge(key.seed, ["/ip4/127.0.0.1/tcp/0"], kademlia=False)
    await bridge.start()
    try:
        gossip = Gossip(bridge, key, "g", record_kinds(NODE_RECORDS), rate_limit_per_s=rate)
        await gossip.start()
        return await body(gossip)
    finally:
        await bridge.stop()


def test_a_flooding_peer_is_rate_limited_and_counted():
    async def flood(gossip):
        for _ in range(30):
            await gossip.handle_message(os.urandom(50), source="12D3KooWflooder")
        return dict(gossip.rejected)

    rejected = asyncio.run(_with_gossip(5.0, flood))
    assert rejected["rate_limited"] >= 15  # a burst of 10 passes, the rest is dropped
    assert rejected["malformed"] <= 12
    assert rejected["rate_limited"] + rejected["malformed"] == 30


def test_valid_records_are_dispatched_to_handlers():
    author = SigningKey.generate()

    async def deliver(gossip):
        seen = []

        async def on_heartbeat(record):
            seen.append(record.author)

        gossip.on(HEARTBEAT_KIND, on_heartbeat)
        beat = Heartbeat(author.peer_id, (), "t", 1, "trainer", 1000).to_wire()
        raw = sign_record(author, HEARTBEAT_KIND, 1, "g", beat, int(time.time() * 1000))
        record = await gossip.handle_message(raw, author.peer_id)
        foreign = sign_record(author, HEARTBEAT_KIND, 1, "h", beat, int(time.time() * 1000))
        assert await gossip.handle_message(foreign, author.peer_id) is None
        return record, seen, dict(gossip.rejected), gossip.topic

    record, seen, rejected, topic = asyncio.run(_with_gossip(0.0, deliver))
    assert record is not None and seen == [author.peer_id]
    assert rejected == {"wrong_swarm": 1}
    assert topic == records_topic("g") == "/p2p-node/g/records/1"


def test_operator_orders_are_accepted_however_old_other_records_are_not():
    operator = SigningKey.generate()
    old = int(time.time() * 1000) - 3_600_000

    async def replay(gossip):
        from protocol.control import RollbackRecord

        rollback = RollbackRecord("b3:" + "1" * 64, "bad merge", old)
        order = sign_record(operator, "rollback", 1, "g", rollback.to_wire(), old)
        stale_beat = sign_record(
            operator, HEARTBEAT_KIND, 1, "g", Heartbeat(operator.peer_id, (), "t", 1, "trainer", 1000).to_wire(), old
        )
        return (await gossip.handle_message(order, operator.peer_id),
                await gossip.handle_message(stale_beat, operator.peer_id), dict(gossip.rejected))

    async def with_timeless():
        key = SigningKey.generate()
        bridge = Libp2pBridge(key.seed, ["/ip4/127.0.0.1/tcp/0"], kademlia=False)
        await bridge.start()
        try:
            gossip = Gossip(bridge, key, "g", record_kinds(NODE_RECORDS), timeless=frozenset({"rollback", "patch"}))
            await gossip.start()
            return await replay(gossip)
        finally:
            await bridge.stop()

    order, beat, rejected = asyncio.run(with_timeless())
    assert order is not None and order.kind == "rollback"
    assert beat is None and rejected == {"clock_skew": 1}
