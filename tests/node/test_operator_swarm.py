"""Operator control across three real daemons: a warm patch of the outer lr, and a rollback end to end.

Peer 1 is the swarm's only operator (``swarm.operators`` lists its peer id on every peer);
every peer has a status token, so the mutating routes are open to the test.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node.keys import KEY_FILE, write_key
from protocol.control import RollbackRecord
from protocol.identity import SigningKey
from protocol.kinds import ROLLBACK
from protocol.records import sign_record
from tests.swarm_harness import ONE_THREAD, Peer, REPO, Swarm, logs_on_failure, training, wait_until

pytestmark = pytest.mark.slow

TOKEN = "operator-swarm-token"
TRAINING = """
[workload]
name = "tiny"

[training]
inner_steps = 10
head_reannounce_s = 1.0

[diloco]
outer_lr = 0.7
outer_momentum = 0.5
"""


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    swarm = Swarm(tmp_path_factory.mktemp("operators"))
    operator = swarm.peer_id_of(1)
    peers = [swarm.add(TRAINING, token=TOKEN, operators=(operator,)) for _ in range(3)]
    try:
        for peer in peers:
            peer.start(extra_env=ONE_THREAD)
        with logs_on_failure(swarm):
            for peer in peers:
                peer.wait_healthy(60)
        yield swarm
    finally:
        swarm.stop_all()




def record(peer: Peer, head_id: str) -> dict[str, Any]:
    body = peer.get(f"/heads/{head_id}")
    assert body is not None, f"{peer.name} does not know head {head_id}"
    return dict(body["record"], id=head_id)


def chain(peer: Peer, head_id: str, stop: str | None = None) -> list[dict[str, Any]]:
    """``peer``'s records from ``head_id`` back to genesis (or to ``stop``, included), newest first."""
    rows = [record(peer, head_id)]
    while rows[-1]["parent"] is not None and rows[-1]["id"] != stop:
        rows.append(record(peer, rows[-1]["parent"]))
    return rows


def min_round(peers: list[Peer], at_least: int) -> bool:
    return all(training(p).get("head_round", -1) >= at_least for p in peers)


def post_without_token(peer: Peer, path: str, body: Any) -> int:
    request = urllib.request.Request(peer.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=60)


async def _publish_as_stranger(target: Peer, topic: str, swarm_name: str, body: dict[str, Any]) -> None:
    """A raw libp2p host with a key no config lists publishes a rollback straight onto the topic."""
    from node.libp2p import Libp2pBridge

    stranger = SigningKey.generate()
    bridge = Libp2pBridge(stranger.seed, ["/ip4/127.0.0.1/tcp/0"], kademlia=False)
    await bridge.start()
    try:
        await bridge.subscribe(topic)
        await bridge.connect(target.addr, timeout=10)
        await asyncio.sleep(2.5)  # the gossip mesh forms
        for _ in range(3):
            await bridge.publish(topic, sign_record(stranger, ROLLBACK, 1, swarm_name, body, int(time.time() * 1000)))
            await asyncio.sleep(0.5)
    finally:
        await bridge.stop()


def test_warm_outer_lr_patch_applies_at_the_same_round_on_every_peer(swarm: Swarm) -> None:
    peers = swarm.peers
    operator = peers[0]
    with logs_on_failure(swarm):
        wait_until(lambda: min_round(peers, 2), 90, what="three peers at round 2")
        current = max(training(p)["head_round"] for p in peers)

        # A warm setting must not take effect at a round that may be under way already.
        status, body = operator.post("/patch", {"settings": {"outer_lr": 0.5}, "round": current})
        assert status == 400 and "too_soon" in body["error"], (status, body)
        # Only an operator peer signs patches.
        status, body = peers[1].post("/patch", {"settings": {"outer_lr": 0.5}, "round": current + 50})
        assert status == 403 and "not_operator" in body["error"], (status, body)

        # Signed on the operator's machine with its key (the CLI's --key) and relayed by a
        # non-operator peer: a hot setting (int8 is the configured codec, so nothing changes)...
        key_file = str(operator.data_dir / KEY_FILE)
        result = cli("patch", "codec=int8", "--round", str(current + 1), "--key", key_file,
                     "--url", peers[2].url, "--token", TOKEN)
        assert result.returncode == 0, result
        assert json.loads(result.stdout)["kind"] == "patch"
        # ... while a warm one for a round that may have begun is refused by the relaying peer too.
        result = cli("patch", "outer_lr=0.5", "--round", str(current), "--key", key_file,
                     "--url", peers[2].url, "--token", TOKEN)
        assert result.returncode == 1 and "too_soon" in result.stderr, result

        effective = max(training(p)["head_round"] for p in peers) + 4
        status, body = operator.post("/patch", {"settings": {"outer_lr": 0.5}, "round": effective})
        assert status == 202, (status, body)
        assert body["effective_round"] == effective and body["classes"] == {"outer_lr": "warm"}
        for peer in peers:
            wait_until(lambda p=peer: '"patch_received"' in p.log(), 10, what=f"{peer.name} hears the patch")

        wait_until(lambda: min_round(peers, effective + 1), 90, what=f"three peers past round {effective}")
        by_round = []
        for peer in peers:
            rows = chain(peer, training(peer)["head"])
            by_round.append({row["round"]: row for row in rows})
        for rows in by_round:
            for round_no, row in rows.items():
                outer_lr = row["rule"]["params"]["outer_lr"]
                assert outer_lr == ("0.5" if round_no >= effective else "0.7"), (round_no, row["rule"])
        for round_no in (effective - 1, effective, effective + 1):
            ids = {rows[round_no]["id"] for rows in by_round}
            assert len(ids) == 1, f"peers hold different heads at round {round_no}: {ids}"


def test_operator_rollback_is_adopted_everywhere_and_training_resumes_from_it(swarm: Swarm, tmp_path: Path) -> None:
    peers = swarm.peers
    operator = peers[0]
    with logs_on_failure(swarm):
        wait_until(lambda: min_round(peers, 6), 90, what="three peers at round 6")
        history = chain(operator, training(operator)["head"])
        target = next(row for row in history if row["round"] == 2)
        wait_until(lambda: all(p.get(f"/heads/{target['id']}") for p in peers), 10, what="every peer knows the target")
        request = {"head": target["id"], "reason": "test: back to round 2"}

        # Without the bearer token the route is closed.
        assert post_without_token(operator, "/rollback", request) == 401
        # A peer whose own key is not an operator's refuses to sign one.
        status, body = peers[1].post("/rollback", request)
        assert status == 403 and "not_operator" in body["error"], (status, body)
        # A record signed with a key no config lists is refused at the POST, on any peer...
        intruder_file = tmp_path / "intruder.key"
        write_key(intruder_file, SigningKey.generate())
        result = cli("rollback", target["id"], "--reason", "not mine to order", "--key", str(intruder_file),
                     "--url", operator.url, "--token", TOKEN)
        assert result.returncode == 1 and "403" in result.stderr and "not_operator" in result.stderr, result
        intruder = SigningKey.generate()
        forged = RollbackRecord(target["id"], "forged", int(time.time() * 1000)).to_wire()
        raw = sign_record(intruder, ROLLBACK, 1, swarm.swarm, forged, int(time.time() * 1000))
        status, body = peers[2].post("/rollback", {"record": raw.hex()})
        assert status == 403 and "not_operator" in body["error"], (status, body)
        # ... and when published straight onto the gossip topic, every peer rejects it.
        topic = operator.get("/status")["gossip"]["topic"]
        asyncio.run(_publish_as_stranger(peers[1], topic, swarm.swarm, forged))

        def rejected_everywhere() -> bool:
            return all((p.get("/status") or {}).get("gossip", {}).get("rejected", {}).get("not_operator", 0) >= 1
                       for p in peers)

        wait_until(rejected_everywhere, 20, what="every peer rejects the stranger's rollback")
        for peer in peers:
            assert training(peer)["head_round"] > target["round"], f"{peer.name} obeyed a forged rollback"
            assert '"rollback_applied"' not in peer.log()

        # The operator's rollback, signed by the operator peer itself.
        before = max(training(p)["head_round"] for p in peers)
        status, body = operator.post("/rollback", request)
        assert status == 202, (status, body)
        assert body["target"] == target["id"]
        rollback_id = body["rollback"]

        def on_new_branch(peer: Peer) -> bool:
            head = training(peer).get("head")
            return bool(head) and (head == target["id"] or record(peer, head)["rollback"] == rollback_id)

        wait_until(lambda: all(on_new_branch(p) for p in peers), 30, what="every peer adopts the rollback")
        for peer in peers:
            assert '"rollback_applied"' in peer.log()

        # Training goes on from the target: rounds count again from target.round + 1.
        resumed = target["round"] + 3
        wait_until(lambda: all(on_new_branch(p) and training(p)["head_round"] >= resumed for p in peers), 90,
                   what=f"three peers at round {resumed} on the rolled-back branch")
        assert resumed < before, "the new branch should be compared while it is still below the old tip"
        branches = []
        for peer in peers:
            rows = chain(peer, training(peer)["head"], stop=target["id"])
            assert rows[-1]["id"] == target["id"], f"{peer.name}'s chain does not pass through the target"
            new = rows[:-1]
            assert [row["round"] for row in new] == list(range(new[0]["round"], target["round"], -1))
            assert all(row["rollback"] == rollback_id for row in new), [row["rollback"] for row in new]
            branches.append({row["round"]: row["id"] for row in new})
        for round_no in range(target["round"] + 1, resumed + 1):
            assert len({branch[round_no] for branch in branches}) == 1, f"peers differ at round {round_no}"
        # The heads of the abandoned chain are still known but no longer canonical.
        abandoned = next(row for row in history if row["round"] == target["round"] + 1)
        assert operator.get(f"/heads/{abandoned['id']}")["canonical"] is False
