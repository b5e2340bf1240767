"""A publisher over its rate is not relayed: a flood stays at its source instead of filling every peer's gossip."""

from __future__ import annotations

import asyncio
import time

from node.libp2p import GossipSettings, Libp2pBridge, PublisherRate, Verdict
from node.libp2p.publisher_rate import FLOOD_FACTOR
from protocol.identity import SigningKey

TOPIC = "/p2p-node/relay-rate/1"


def test_publisher_rate_allows_a_burst_of_twice_the_rate_then_the_rate():
    now = [0.0]
    rate = PublisherRate(10.0, clock=lambda: now[0])
    assert sum(rate.allow(b"flooder") for _ in range(100)) == 20
    assert rate.allow(b"someone else")  # each publisher has its own bucket
    now[0] += 1.0
    assert sum(rate.allow(b"flooder") for _ in range(100)) == 10
    assert rate.dropped == 80 + 90


def test_a_publisher_that_keeps_far_above_its_rate_is_flooding():
    now = [0.0]
    rate = PublisherRate(10.0, clock=lambda: now[0])
    verdicts = [rate.check(b"flooder") for _ in range(20 + FLOOD_FACTOR * 20 + 1)]
    assert set(verdicts[:20]) == {Verdict.ALLOWED}
    assert set(verdicts[20:-1]) == {Verdict.HELD_BACK}
    assert verdicts[-1] is Verdict.FLOODING
    # A burst of an honest peer's size is held back, never flooding, and its excess drains.
    honest = PublisherRate(10.0, clock=lambda: now[0])
    for _ in range(10):
        assert Verdict.FLOODING not in {honest.check(b"peer") for _ in range(60)}
        now[0] += 10.0


def test_a_flood_is_not_relayed_past_its_first_hop():
    """flooder -> relay -> listener: the relay delivers and relays no more than the rate allows."""

    async def run() -> tuple[int, int, int, int]:
        limited = GossipSettings(rate_limit_per_s=10.0)
        flooder = Libp2pBridge(SigningKey.generate().seed, ["/ip4/127.0.0.1/tcp/0"], kademlia=False)
        relay = Libp2pBridge(SigningKey.generate().seed, ["/ip4/127.0.0.1/tcp/0"], kademlia=False, gossip=limited)
        listener = Libp2pBridge(SigningKey.generate().seed, ["/ip4/127.0.0.1/tcp/0"], kademlia=False, gossip=limited)
        bridges = [flooder, relay, listener]
        for bridge in bridges:
            await bridge.start()
        try:
            queues = [await bridge.subscribe(TOPIC) for bridge in bridges]
            await flooder.connect(relay.listen_addrs()[0], timeout=10)
            await listener.connect(relay.listen_addrs()[0], timeout=10)
            await asyncio.sleep(3.0)  # meshes form at the 1 s gossipsub heartbeat
            started = time.monotonic()
            for i in range(300):
                await flooder.publish(TOPIC, b"flood %d" % i)
            await asyncio.sleep(2.0)
            elapsed = time.monotonic() - started
            received = queues[2].qsize()
            return received, relay.stats.gossip_rate_limited, int(20 + 10 * elapsed), relay.stats.gossip_publishers_banned
        finally:
            for bridge in bridges:
                await bridge.stop()

    received, limited, allowed, banned = asyncio.run(run())
    assert 0 < received <= allowed, f"the listener got {received} of 300 (at most {allowed} allowed)"
    assert limited >= 100, f"the relay held back only {limited}"
    assert banned == 1  # and, flooding on, it was cut off
