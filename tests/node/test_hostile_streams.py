"""A remote peer's malformed bytes on any inbound stream, on real hosts on 127.0.0.1: the
stream is dropped and counted by reason, and the host keeps running and gossiping."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable

import pytest
from libp2p.pubsub.pb import rpc_pb2
from libp2p.utils import encode_varint_prefixed

from node.libp2p import BridgeError, FramedStream, GossipMessage, GossipSettings, Libp2pBridge, faults, patches

TOPIC = "/p2p-node/test/hostile"
CHUNKS = "/p2p-node/test-chunks/1.0.0"
SETTINGS = GossipSettings(heartbeat_interval_s=0.2)
# A varint length of 6, then 6 bytes that are no protobuf: py-libp2p's pubsub reader raised
# DecodeError out of its stream handler, which ended the host's whole trio run.
CRASH = b"\x06" + b"\xff" * 6


def bridge(kademlia: bool = False) -> Libp2pBridge:
    return Libp2pBridge(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"], gossip=SETTINGS, kademlia=kademlia)


def unparsable_key_message(topic: str) -> bytes:
    """A pubsub RPC publishing one message whose public key does not parse."""
    message = rpc_pb2.Message(
        from_id=b"not a peer id", data=b"x", seqno=os.urandom(8), topicIDs=[topic],
        signature=b"sig", key=b"\x08\x01\x12\x03abc",
    )
    return encode_varint_prefixed(rpc_pb2.RPC(publish=[message]).SerializeToString())


async def send_raw(sender: Libp2pBridge, peer: str, protocol: str, payload: bytes) -> None:
    """Open ``protocol`` to ``peer``, write ``payload`` as it is (no frame prefix), close."""
    stream = await sender.open_stream(peer, protocol, timeout=10)
    try:
        await sender.call(stream._stream.write, payload, timeout=5)
    except (BridgeError, TimeoutError):
        pass  # the victim may already have reset the stream
    await stream.close()


async def until(condition: Callable[[], bool], what: str, host: Libp2pBridge | None = None) -> None:
    """Wait up to 10 s for ``condition``; fail at once if ``host``'s libp2p run ends meanwhile."""
    deadline = time.monotonic() + 10.0
    while not condition():
        if host is not None and host.done is not None and host.done.done():
            raise AssertionError(f"the host's libp2p run ended: {host.done.exception()!r}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def gossip_reaches(sender: Libp2pBridge, inbox: asyncio.Queue[GossipMessage]) -> None:
    """Publish from ``sender`` until one of its messages lands in ``inbox`` (gossip is lossy
    until the mesh has formed)."""
    data = os.urandom(16)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        await sender.publish(TOPIC, data)
        try:
            while (await asyncio.wait_for(inbox.get(), 0.5)).data != data:
                pass
            return
        except TimeoutError:
            continue
    raise AssertionError(f"gossip from {sender.peer_id} never arrived")


def test_malformed_streams_on_every_protocol_drop_only_themselves(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(faults, "_warnings", faults._FaultWarnings())
    caplog.set_level(logging.WARNING, logger="p2p_node.libp2p")

    async def read_one_frame(stream: FramedStream) -> None:
        await stream.read_frame(1024, timeout=5)

    async def scenario() -> None:
        victim, attacker, honest = bridge(kademlia=True), bridge(), bridge()
        for node in (victim, attacker, honest):
            await node.start()
        try:
            await victim.set_stream_handler(CHUNKS, read_one_frame)
            victim_inbox = await victim.subscribe(TOPIC)
            honest_inbox = await honest.subscribe(TOPIC)
            await honest.connect(victim.listen_addrs()[0], timeout=10)
            peer = await attacker.connect(victim.listen_addrs()[0], timeout=10)
            faults = victim.stats.stream_faults

            # Each of these ended the victim's trio run before streams were guarded.
            await send_raw(attacker, peer, "/meshsub/1.1.0", CRASH)
            await until(lambda: faults["pubsub:DecodeError"] == 1, "the first DecodeError", victim)
            assert not victim.done.done()
            await send_raw(attacker, peer, "/meshsub/1.2.0", CRASH)
            # A whole frame holding a truncated protobuf (field 1 claims 80 bytes, has 2).
            await send_raw(attacker, peer, "/meshsub/1.1.0", encode_varint_prefixed(b"\x0a\x50ab"))
            await send_raw(attacker, peer, "/meshsub/1.1.0", unparsable_key_message(TOPIC))
            await until(lambda: faults["pubsub:DecodeError"] == 3, "three DecodeErrors", victim)
            await until(lambda: faults["pubsub-message:ValueError"] == 1, "the unparsable key", victim)

            # py-libp2p handles these itself; they must leave the host running all the same.
            for protocol, payload in (
                ("/meshsub/1.1.0", b"\xff\xff\xff\xff\x0f"),  # a 4 GiB length
                ("/meshsub/1.1.0", b"\x40abc"),  # a frame cut short
                ("/ipfs/id/push/1.0.0", CRASH),
                ("/ipfs/id/push/1.0.0", b"\xff" * 12),  # a varint that never ends
                ("/ipfs/ping/1.0.0", b"\x01\x02\x03"),
                ("/ipfs/kad/1.0.0", CRASH),
                (CHUNKS, b"\xff\xff\xff\xff"),  # the daemon's own handler: a frame over its limit
            ):
                await send_raw(attacker, peer, protocol, payload)
            await until(lambda: victim.stats.handler_errors == 1, "the chunk handler's error", victim)
            await asyncio.sleep(0.5)

            assert not victim.done.done()
            assert dict(faults) == {"pubsub:DecodeError": 3, "pubsub-message:ValueError": 1}
            assert honest.peer_id in victim.connected_peers()
            await gossip_reaches(honest, victim_inbox)
            await gossip_reaches(victim, honest_inbox)
            assert not victim.done.done()
        finally:
            for node in (honest, attacker, victim):
                await node.stop()

    asyncio.run(scenario())
    warnings = [r.getMessage() for r in caplog.records if "pubsub:DecodeError" in r.getMessage()]
    assert len(warnings) == 1, warnings  # one per reason per minute, not one per stream


def test_a_bug_in_the_projects_own_code_still_ends_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard contains remote peers' faults, not this project's bugs: one raised in the
    bridge's own pubsub patch (here a TypeError in its record cache) ends the run loudly."""
    monkeypatch.setattr(patches, "SEEN_RECORD_REUSE_S", "soon")

    async def scenario() -> tuple[BaseException | None, dict[str, int]]:
        victim, peer = bridge(), bridge()
        await victim.start()
        await peer.start()
        try:
            try:
                await peer.connect(victim.listen_addrs()[0], timeout=10)
            except BridgeError:
                pass  # the run may end under the dial
            await until(victim.done.done, "the victim's run to end")
            return victim.done.exception(), dict(victim.stats.stream_faults)
        finally:
            await peer.stop()
            await victim.stop()

    error, faults = asyncio.run(scenario())
    assert isinstance(error, BridgeError) and "TypeError" in str(error), error
    assert faults == {}  # a bug is not counted as a peer's fault


def test_banning_a_peer_whose_pubsub_stream_dies_meanwhile_leaves_the_host_running() -> None:
    # The ban (a blacklist) tears the peer's pubsub stream down: it resets the stream, then drops
    # the peer's entry. Here the stream's end is handled while the reset runs, as when the peer
    # disconnects at that moment; the entry is gone before the teardown reaches it, which ended
    # the pubsub service and the host before the teardown was guarded.
    async def scenario() -> None:
        victim, flooder = bridge(), bridge()
        for node in (victim, flooder):
            await node.start()
        try:
            await victim.subscribe(TOPIC)
            await flooder.subscribe(TOPIC)
            peer = await victim.connect(flooder.listen_addrs()[0], timeout=10)
            pubsub = victim._pubsub
            assert pubsub is not None
            await until(lambda: any(p.to_base58() == peer for p in pubsub.peers), "the pubsub stream", victim)
            target = next(p for p in pubsub.peers if p.to_base58() == peer)
            stream = pubsub.peers[target]
            real_reset = stream.reset

            async def reset_while_the_stream_dies() -> None:
                pubsub._handle_dead_peer(target)
                await real_reset()

            stream.reset = reset_while_the_stream_dies

            def ban() -> None:
                pubsub.add_to_blacklist(target)

            await victim.call(_sync, ban, timeout=5)
            await until(lambda: target not in pubsub.peers, "the teardown", victim)
            await asyncio.sleep(0.5)
            assert not victim.done.done(), victim.done.exception()
        finally:
            for node in (flooder, victim):
                await node.stop()

    asyncio.run(scenario())


async def _sync(fn: Callable[[], None]) -> None:
    fn()
