"""IDONTWANT only for large gossip messages (``skip_small_idontwant``), on two real hosts:
a peer that forwards a message sends its mesh peers an IDONTWANT for it only when the
message is at least IDONTWANT_MIN_BYTES, as go-libp2p does; small records cost no extra RPC."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from libp2p.pubsub.gossipsub import GossipSub

from node.libp2p import GossipSettings, Libp2pBridge
from node.libp2p.patches import IDONTWANT_MIN_BYTES

TOPIC = "/p2p-node/test/idontwant"


def test_idontwant_is_sent_for_large_messages_only(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[int] = []  # IDONTWANTs sent by either host (both run in this process)
    emit = GossipSub.emit_idontwant

    async def counting_emit(self: GossipSub, msg_ids: list[bytes], to_peer: object) -> None:
        sent.append(len(msg_ids))
        await emit(self, msg_ids, to_peer)

    monkeypatch.setattr(GossipSub, "emit_idontwant", counting_emit)

    async def scenario() -> tuple[int, int, int]:
        settings = GossipSettings(heartbeat_interval_s=0.2)
        a = Libp2pBridge(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"], gossip=settings, kademlia=False)
        b = Libp2pBridge(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"], gossip=settings, kademlia=False)
        await a.start()
        await b.start()
        try:
            await a.subscribe(TOPIC)
            inbox = await b.subscribe(TOPIC)
            await b.connect(a.listen_addrs()[0], timeout=10)

            async def publish_until_received(data: bytes) -> None:
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    await a.publish(TOPIC, data)
                    try:
                        while (await asyncio.wait_for(inbox.get(), 0.5)).data != data:
                            pass
                        return
                    except TimeoutError:
                        continue
                raise AssertionError("b never received the message")

            async def idontwants_after(data: bytes) -> int:
                before = len(sent)
                await publish_until_received(data)
                await asyncio.sleep(0.5)  # b forwards (and may send IDONTWANT) after delivering
                return len(sent) - before

            # Once the mesh has formed, b answers a large message with an IDONTWANT to a.
            deadline = time.monotonic() + 20
            large = 0
            while not large and time.monotonic() < deadline:
                large = await idontwants_after(os.urandom(IDONTWANT_MIN_BYTES + 100))
            small = 0
            for _ in range(5):
                small += await idontwants_after(os.urandom(200))
            large_again = await idontwants_after(os.urandom(4 * IDONTWANT_MIN_BYTES))
            return large, small, large_again
        finally:
            await b.stop()
            await a.stop()

    large, small, large_again = asyncio.run(scenario())
    assert large >= 1 and large_again >= 1
    assert small == 0
