"""A raw libp2p host with its own key sends malformed gossip frames to running daemons; the swarm trains on."""

from __future__ import annotations

import asyncio
import os

import pytest

from node.libp2p import BridgeError, Libp2pBridge
from tests.adversary import AdversarialSwarm, Daemon, PhaseResult, assert_agreed, assert_exactly_once, assert_loss_near, assert_survived

pytestmark = pytest.mark.slow

# A frame whose varint length prefix announces 6 bytes of 0xff: not a protobuf RPC.
CRASH_FRAME = b"\x06" + b"\xff" * 6
FRAMES = (
    ("/meshsub/1.1.0", CRASH_FRAME),
    ("/meshsub/1.2.0", CRASH_FRAME),
    ("/meshsub/1.1.0", b"\xff\xff\xff\xff\x0f"),  # a 4 GiB length
    ("/meshsub/1.1.0", b"\x40abc"),  # a frame cut short
)


async def send_frames(targets: list[Daemon], rounds: int = 3) -> int:
    """Open a fresh stream per frame to every target and write the frame's bytes as they are."""
    sender = Libp2pBridge(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"], kademlia=False)
    sent = 0
    await sender.start()
    try:
        for _ in range(rounds):
            for target in targets:
                try:
                    peer = await sender.connect(target.addr, timeout=10)
                except (BridgeError, TimeoutError, OSError):
                    continue  # a daemon that went away: the test's liveness check reports it
                for protocol, payload in FRAMES:
                    try:
                        stream = await sender.open_stream(peer, protocol, timeout=10)
                        await sender.call(stream._stream.write, payload, timeout=5)
                        await stream.close()
                        sent += 1
                    except (BridgeError, TimeoutError, OSError):
                        pass  # the daemon reset the stream: as it should
            await asyncio.sleep(1.0)
    finally:
        await sender.stop()
    return sent


def test_malformed_gossip_frames_crash_no_daemon(adversarial_swarm: AdversarialSwarm, clean: PhaseResult) -> None:
    with adversarial_swarm.phase("crash_frames", hostile_mode="honest") as run:
        sent = asyncio.run(send_frames(adversarial_swarm.honest))
    result = run.result
    assert result is not None
    print(f"sent {sent} malformed frames")
    assert sent > 0, "no malformed frame was sent"
    assert_survived(result, run)
    assert_agreed(result, run)
    assert_exactly_once(result)
    assert_loss_near(result, clean)
