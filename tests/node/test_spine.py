"""The spine end to end: real daemons on 127.0.0.1 find each other, notice deaths, survive garbage."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time

import pytest

from protocol import canonical
from protocol.identity import SigningKey
from protocol.membership import HEARTBEAT_KIND, Heartbeat
from protocol.records import sign_record
from tests.swarm_harness import Peer, Swarm, mount_tmpfs, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def swarm(tmp_path):
    swarm = Swarm(tmp_path)
    yield swarm
    swarm.stop_all()


def test_five_peers_discover_each_other_detect_death_and_restart(swarm):
    peers = [swarm.add() for _ in range(5)]
    for peer in peers:
        peer.start()
    for peer in peers:
        peer.wait_healthy()
    ids = {p.peer_id for p in peers}
    try:
        for peer in peers:
            wait_until(lambda p=peer: p.live_peers() == ids - {p.peer_id}, 40, what=f"{peer.name} sees 4 live peers")
        victim = peers[3]
        victim.kill9()
        killed_at = time.monotonic()
        for peer in peers[:3] + peers[4:]:
            wait_until(lambda p=peer: victim.peer_id in p.dead_peers(), 10, what=f"{peer.name} marks the victim dead")
        # Heartbeats every 1 s; dead after 3 missed, plus polling slack.
        assert time.monotonic() - killed_at < 3 * 1.0 + 3.0
        victim.start()
        victim.wait_healthy()
        assert victim.get("/status")["peer_id"] == victim.peer_id
        for peer in peers:
            wait_until(lambda p=peer: p.live_peers() == ids - {p.peer_id}, 30, what=f"{peer.name} sees the restarted peer")
    except AssertionError:
        print(swarm.logs())
        raise


def test_a_peer_that_stops_says_goodbye_and_is_counted_out_at_once(swarm):
    """Heartbeats every 5 s: a silent peer would be counted dead after 15 s. A peer stopped
    with SIGTERM sends a last heartbeat marked "leaving", and the others count it out at once
    (logged as peer_left, not peer_dead). Restarted, it is counted back in."""
    first, second = swarm.add(heartbeat_s=5.0), swarm.add(heartbeat_s=5.0)
    for peer in (first, second):
        peer.start()
    for peer in (first, second):
        peer.wait_healthy()
    wait_until(lambda: first.live_peers() == {second.peer_id}, 40, what="the two peers meet")
    stopped_at = time.monotonic()
    assert second.terminate() == 0
    wait_until(lambda: second.peer_id in first.dead_peers(), 10, what="the first peer counts the second out")
    assert time.monotonic() - stopped_at < 5.0
    assert '"event": "peer_left"' in first.log() and '"event": "peer_dead"' not in first.log()
    second.start()
    second.wait_healthy()
    wait_until(lambda: first.live_peers() == {second.peer_id}, 40, what="the restarted peer is counted back in")


def test_sigterm_exits_zero_within_five_seconds(swarm):
    first, second = swarm.add(), swarm.add()
    first.start()
    second.start()
    first.wait_healthy()
    second.wait_healthy()
    wait_until(lambda: first.live_peers() == {second.peer_id}, 30, what="the two peers meet")
    started = time.monotonic()
    assert first.terminate(timeout=10) == 0
    assert time.monotonic() - started < 5.0
    assert "node_stopped" in first.log()


def test_sigterm_while_the_workload_loads_exits_at_once(swarm, tmp_path):
    """docker stop (SIGTERM, then SIGKILL 10 s later) while a daemon loads a slow workload: it
    exits cleanly within seconds instead of finishing a two-minute load first."""
    marker = tmp_path / "loading"
    peer = swarm.add(
        '[workload]\nname = "tests.slow_start_workload:make"\n\n'
        f"[workload.options]\nmarker = {json.dumps(str(marker))}\nseconds = 120\n"
    )
    peer.start()
    wait_until(marker.exists, 60, interval=0.05, what="the daemon to start loading its workload")
    started = time.monotonic()
    assert peer.terminate(timeout=15) == 0, peer.log()
    assert time.monotonic() - started < 5.0, peer.log()
    log = peer.log()
    assert '"during": "start"' in log and "node_stopped" in log, log


def _start_fails(peer: Peer) -> dict:
    """Start ``peer`` and expect exit 1 with one ``node_start_failed`` record and no traceback;
    that record."""
    peer.log_path.unlink(missing_ok=True)
    peer.start()
    assert peer.process is not None and peer.process.wait(timeout=60) == 1, peer.log()
    log = peer.log()
    assert "Traceback" not in log, log
    return next(json.loads(line) for line in log.splitlines() if "node_start_failed" in line)


def test_a_taken_port_fails_the_start_with_one_clear_line(swarm):
    """Another process holds the libp2p port, then the status port: the daemon exits 1 and says
    which, without a traceback. (py-libp2p used to log the taken port and go on without a
    listener, leaving a node that nobody could dial.) With both ports free it starts."""
    peer = swarm.add()
    cases = (
        (peer.p2p_port, "starting libp2p", f"cannot listen on /ip4/127.0.0.1/tcp/{peer.p2p_port}"),
        (peer.status_port, "starting the status port", "address already in use"),
    )
    for port, during, says in cases:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", port))
            taken.listen()
            record = _start_fails(peer)
        assert record["during"] == during and says in record["error"], record
    peer.start()
    peer.wait_healthy(60)


def test_a_full_or_read_only_disk_fails_the_start_with_one_clear_line(swarm):
    """The data directory lies on a tmpfs: full, then read-only. Each start exits 1 and names
    the fault and the file, without a traceback or a half-written key; with room it starts."""
    peer = swarm.add()
    for name in os.listdir(peer.data_dir):  # the key Swarm.add made: the daemon must write its own
        os.remove(peer.data_dir / name)
    if (reason := mount_tmpfs(peer.data_dir, 1)) is not None:
        pytest.skip(f"cannot mount a tmpfs (needs root): {reason}")
    try:
        with open(peer.data_dir / "filler", "wb") as filler:
            try:
                while filler.write(b"\0" * 65536):
                    pass
            except OSError:
                pass
        record = _start_fails(peer)
        assert record["during"] == "loading the identity key", record
        assert record["error"] == f"No space left on device: {peer.data_dir / 'identity.key'}", record
        assert os.listdir(peer.data_dir) == ["filler"]  # no temp key file left behind
        os.remove(peer.data_dir / "filler")
        subprocess.run(["mount", "-o", "remount,ro", str(peer.data_dir)], check=True)
        record = _start_fails(peer)
        assert "Read-only file system" in record["error"], record
        assert mount_tmpfs(peer.data_dir, 256, remount=True) is None
        subprocess.run(["mount", "-o", "remount,rw", str(peer.data_dir)], check=True)
        peer.start()
        peer.wait_healthy(60)
    finally:
        swarm.stop_all()
        subprocess.run(["umount", str(peer.data_dir)], capture_output=True)


async def _publish_hostile(target_addr: str, topic: str, swarm_name: str) -> None:
    from node.libp2p import GossipSettings, Libp2pBridge

    attacker = SigningKey.generate()
    bridge = Libp2pBridge(
        attacker.seed, ["/ip4/127.0.0.1/tcp/0"], kademlia=False, gossip=GossipSettings(max_message_bytes=512 * 1024)
    )
    await bridge.start()
    try:
        await bridge.subscribe(topic)
        await bridge.connect(target_addr, timeout=10)
        await asyncio.sleep(2.5)  # let the gossip mesh form
        now = int(time.time() * 1000)
        beat = Heartbeat(attacker.peer_id, (), "evil", 1, "trainer", 1000).to_wire()
        good = sign_record(attacker, HEARTBEAT_KIND, 1, swarm_name, beat, now)
        kind, version, swarm_field, author, created, body, _sig = canonical.decode(good)
        messages = [
            os.urandom(300),  # garbage
            canonical.encode([kind, version, swarm_field, author, created, body, b"\0" * 64]),  # bad signature
            sign_record(attacker, HEARTBEAT_KIND, 1, "some-other-swarm", beat, now),  # foreign swarm
            sign_record(attacker, HEARTBEAT_KIND, 99, swarm_name, beat, now),  # unknown version
            sign_record(attacker, HEARTBEAT_KIND, 1, swarm_name, {**beat, "pad": "x" * 70_000}, now),  # oversized
        ]
        for _ in range(3):
            for message in messages:
                await bridge.publish(topic, message)
            await asyncio.sleep(0.5)
    finally:
        await bridge.stop()


def test_hostile_messages_are_counted_by_reason_and_the_daemon_keeps_running(swarm):
    peer = swarm.add()
    peer.start()
    peer.wait_healthy()
    topic = peer.get("/status")["gossip"]["topic"]
    asyncio.run(_publish_hostile(peer.addr, topic, swarm.swarm))

    def rejected():
        counts = peer.get("/status")["gossip"]["rejected"]
        wanted = {"malformed", "bad_signature", "wrong_swarm", "unknown_version", "oversized"}
        return counts if wanted <= set(counts) else None

    try:
        counts = wait_until(rejected, 15, what="rejections by reason")
    except AssertionError:
        print(peer.get("/status"), swarm.logs())
        raise
    assert all(counts[reason] >= 1 for reason in counts)
    assert peer.get("/healthz")["ok"] is True
    assert peer.process.poll() is None
