"""Interop with a libp2p node nobody on this project wrote: js-libp2p on Node.js.

A real ``p2p-node start`` daemon and the independent js peer from
shared/interop/js-libp2p-peer meet over TCP + noise + yamux on 127.0.0.1 and
exchange gossipsub messages on the swarm topic, in both dial directions.
"""

from __future__ import annotations

import time

import pytest

from node.daemon import NODE_RECORDS
from protocol import canonical
from protocol.kinds import record_kinds
from protocol.membership import HEARTBEAT_KIND
from protocol.records import validate_record
from tests import interop_js
from tests.swarm_harness import Peer, Swarm, wait_until

pytestmark = pytest.mark.slow

JS_LIFETIME_S = 120  # --exit-after: a safety net should cleanup ever be skipped


@pytest.fixture(scope="module")
def js_peer_dir():
    reason = interop_js.missing_prerequisite()
    if reason:
        pytest.skip(reason)
    try:
        return interop_js.install()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def swarm(tmp_path):
    swarm = Swarm(tmp_path)
    yield swarm
    swarm.stop_all()


def _heartbeat_from(peer: Peer, swarm_name: str, topic: str):
    """A predicate for a js ``message`` event carrying a valid heartbeat record authored by ``peer``."""
    kinds = record_kinds(NODE_RECORDS)

    def matches(event):
        if event.get("event") != "message" or event.get("topic") != topic or event.get("from") != peer.peer_id:
            return False
        data = bytes.fromhex(event["data_hex"])
        envelope = canonical.decode(data)
        assert isinstance(envelope, list) and len(envelope) == 7, envelope
        record = validate_record(data, swarm=swarm_name, kinds=kinds, now_ms=int(time.time() * 1000))
        return record.kind == HEARTBEAT_KIND and record.author == peer.peer_id and record.body.peer == peer.peer_id

    return matches


def _rejected(peer: Peer, reason: str) -> int:
    status = peer.get("/status") or {}
    return int(status.get("gossip", {}).get("rejected", {}).get(reason, 0))


def test_js_libp2p_peer_exchanges_gossip_with_the_daemon(swarm, js_peer_dir, tmp_path):
    daemon = swarm.add()
    daemon.start()
    js = None
    started = time.monotonic()
    try:
        daemon.wait_healthy()
        topic = daemon.get("/status")["gossip"]["topic"]
        assert topic == f"/p2p-node/{swarm.swarm}/records/1"

        js = interop_js.JsPeer(
            js_peer_dir,
            tmp_path / "js.log",
            ["--topic", topic, "--dial", daemon.addr, "--sign", "StrictSign", "--name", "js",
             "--exit-after", str(JS_LIFETIME_S)],
        )
        js.start()
        listening = js.wait_for(lambda e: e.get("event") == "listening", 20, "listening")
        js_addr = next(a for a in listening["addrs"] if a.startswith("/ip4/127.0.0.1/tcp/"))
        js_id = listening["peerId"]

        # 1. js dials the daemon: noise + yamux, identify shows gossipsub, the daemon joins the topic.
        dialed = js.wait_for(lambda e: e.get("event") in ("dialed", "error"), 20, "the dial to the daemon")
        assert dialed["event"] == "dialed", dialed
        assert dialed["peer"] == daemon.peer_id
        assert dialed["encryption"] == "/noise" and dialed["multiplexer"] == "/yamux/1.0.0", dialed
        identify = js.wait_for(
            lambda e: e.get("event") == "identify" and e["peer"] == daemon.peer_id, 15, "identify from the daemon"
        )
        assert any(p.startswith("/meshsub/1.") for p in identify["protocols"]), identify["protocols"]
        js.wait_for(
            lambda e: e.get("event") == "subscription-change" and e["peer"] == daemon.peer_id
            and any(s.get("topic") == topic and s.get("subscribe") for s in e["subscriptions"]),
            15,
            "the daemon's subscription to the swarm topic",
        )

        # 2. The daemon's signed heartbeat records reach js through gossipsub and verify.
        beat = js.wait_for(
            _heartbeat_from(daemon, swarm.swarm, topic), 20, "a valid heartbeat record from the daemon"
        )
        assert beat["type"] == "signed" and beat["via"] == daemon.peer_id
        assert not js.snapshot("rejected"), js.snapshot("rejected")

        # 3. js publishes a plain text line: the daemon counts it as malformed and keeps running.
        before = _rejected(daemon, "malformed")
        js.send("hello from js-libp2p, not a record")
        published = js.wait_for(lambda e: e.get("event") in ("published", "error"), 10, "the publish")
        assert published["event"] == "published" and daemon.peer_id in published["recipients"], published
        wait_until(
            lambda: _rejected(daemon, "malformed") > before, 15, what="the daemon to count the text as malformed"
        )
        assert _rejected(daemon, "malformed") >= 1
        assert daemon.get("/healthz")["ok"] is True
        assert daemon.process.poll() is None

        # 4. The other direction: a second daemon whose only bootstrap address is the js peer dials it.
        second = swarm.add(bootstrap=False)
        config = second.config_path.read_text()
        assert "bootstrap = []" in config
        second.config_path.write_text(config.replace("bootstrap = []", f'bootstrap = ["{js_addr}"]'))
        second.start()
        second.wait_healthy()
        js.wait_for(
            lambda e: e.get("event") == "connect" and e["peer"] == second.peer_id, 20, "the second daemon's dial"
        )
        beat2 = js.wait_for(
            _heartbeat_from(second, swarm.swarm, topic), 20, "a valid heartbeat record from the second daemon"
        )
        assert beat2["via"] == second.peer_id
        js.send("/peers")
        peers = js.wait_for(lambda e: e.get("event") == "peers", 10, "/peers")
        directions = {c["peer"]: c["dir"] for c in peers["connections"]}
        assert directions.get(daemon.peer_id) == "outbound", directions
        assert directions.get(second.peer_id) == "inbound", directions
        assert not js.snapshot("rejected"), js.snapshot("rejected")
        for peer in (daemon, second):
            assert peer.get("/healthz")["ok"] is True
            assert peer.process.poll() is None
        assert js.alive()
        print(f"js peer {js_id}: interop checks passed in {time.monotonic() - started:.1f} s")
    except Exception:  # includes Invalid from a heartbeat that fails validation
        print(swarm.logs())
        if js is not None:
            print(js.transcript())
        raise
    finally:
        if js is not None:
            js.stop()
        swarm.stop_all()
