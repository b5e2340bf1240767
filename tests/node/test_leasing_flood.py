"""Leases under a flood on real libp2p gossip: a hostile key claiming every shard every round, and far-ahead claims."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from node.daemon import NODE_RECORDS
from node.gossip import Gossip, now_ms
from node.leasing import LEASE_VERSION, MAX_PENDING_FUTURE, Leasing
from node.libp2p import Libp2pBridge
from node.membership import Membership
from protocol.cid import content_id
from protocol.identity import SigningKey
from protocol.kinds import LEASE, record_kinds
from protocol.leases import STRIKES_TO_EXCLUDE, LeaseClaim, budget_for, claim_cap, home_peer
from protocol.records import sign_record

SWARM = "lease-flood"
PLANNED = tuple(sorted(content_id(b"microshard %d" % i) for i in range(48)))
SETTLE_S = 1.0


@dataclass
class Node:
    key: SigningKey
    bridge: Libp2pBridge
    gossip: Gossip
    membership: Membership
    leasing: Leasing

    @property
    def peer(self) -> str:
        return self.key.peer_id

    def live_trainers(self) -> list[str]:
        table = self.membership.table
        return [p for p in table.live() if table.peers[p].heartbeat.role == "trainer"]


@contextlib.asynccontextmanager
async def swarm(count: int) -> AsyncIterator[list[Node]]:
    """``count`` peers with real hosts, gossip, heartbeats and leasing, all connected to the first."""
    nodes: list[Node] = []
    async with contextlib.AsyncExitStack() as stack:
        async with asyncio.TaskGroup() as tasks:
            for _ in range(count):
                key = SigningKey.generate()
                bridge = Libp2pBridge(key.seed, ["/ip4/127.0.0.1/tcp/0"], kademlia=False)
                await bridge.start()
                stack.push_async_callback(bridge.stop)
                gossip = Gossip(bridge, key, SWARM, record_kinds(NODE_RECORDS))
                await gossip.start()
                bootstrap = [f"{nodes[0].bridge.listen_addrs()[0]}/p2p/{nodes[0].peer}"] if nodes else []
                membership = Membership(bridge, gossip, role="trainer", interval_s=0.5, dead_after_missed=4,
                                        bootstrap=bootstrap)
                leasing = Leasing(gossip, key.peer_id, PLANNED, lease_s=60.0, settle_s=SETTLE_S)
                nodes.append(Node(key, bridge, gossip, membership, leasing))
            running = [tasks.create_task(n.gossip.run()) for n in nodes]
            running += [tasks.create_task(n.membership.run()) for n in nodes]
            try:
                yield nodes
            finally:
                for task in running:
                    task.cancel()


async def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


@dataclass
class Flooder:
    """A hostile key on its own host: every 100 ms a fresh signed lease on every shard of the current round."""

    key: SigningKey
    bridge: Libp2pBridge
    round: int = 1
    published: int = 0

    async def run(self) -> None:
        topic = f"/p2p-node/{SWARM}/records/1"
        while True:
            issued = now_ms()
            grab = LeaseClaim.create(self.key.peer_id, 0, self.round, PLANNED, issued, issued + 60_000)
            await self.bridge.publish(topic, sign_record(self.key, LEASE, LEASE_VERSION, SWARM, grab.to_wire(), issued))
            self.published += 1
            await asyncio.sleep(0.1)


async def honest_round(honest: list[Node], round_no: int, trainers: set[str]) -> dict[str, frozenset[str]]:
    """Every honest peer claims its speed share of the whole pool for ``round_no``, as the outer loop does."""
    async def one(node: Node) -> frozenset[str]:
        # The outer loop counts a peer whose claims are excluded out of the round (see the wiring in leasing).
        live = [p for p in node.live_trainers() if p in trainers and not node.leasing.excluded(p)]
        total = float(len(live) + 1)
        return await node.leasing.claim(0, round_no, frozenset(PLANNED), len(PLANNED), 1.0, total, live)

    held = await asyncio.gather(*(one(n) for n in honest))
    return {n.peer: h for n, h in zip(honest, held)}


def run(body: Callable[[list[Node], Flooder], Awaitable[None]], heartbeats: bool) -> None:
    async def main() -> None:
        async with swarm(3 if heartbeats else 2) as nodes:
            honest = nodes[:2]
            if heartbeats:
                # The flooder runs real membership (heartbeats as a trainer) but never uses its own leasing.
                hostile_key, hostile_bridge = nodes[2].key, nodes[2].bridge
            else:
                hostile_key = SigningKey.generate()
                hostile_bridge = Libp2pBridge(hostile_key.seed, ["/ip4/127.0.0.1/tcp/0"], kademlia=False)
                await hostile_bridge.start()
                await hostile_bridge.subscribe(f"/p2p-node/{SWARM}/records/1")
                await hostile_bridge.connect(f"{honest[0].bridge.listen_addrs()[0]}/p2p/{honest[0].peer}", timeout=10)
            try:
                everyone = {n.peer for n in nodes}
                await wait_for(lambda: all(set(n.live_trainers()) == everyone - {n.peer} for n in honest), 20,
                               "honest peers seeing each other live")
                flooder = Flooder(hostile_key, hostile_bridge)
                flooding = asyncio.create_task(flooder.run())
                try:
                    await wait_for(lambda: all(n.gossip.accepted[LEASE] > 0 for n in honest), 20,
                                   "the flood reaching every honest peer")
                    await body(honest, flooder)
                finally:
                    flooding.cancel()
                    await asyncio.gather(flooding, return_exceptions=True)
            finally:
                if not heartbeats:
                    await hostile_bridge.stop()

    asyncio.run(main())


def test_a_flooder_without_heartbeats_wins_nothing_and_honest_peers_split_the_pool() -> None:
    async def body(honest: list[Node], flooder: Flooder) -> None:
        a, b = honest
        for round_no in (1, 2):
            flooder.round = round_no
            await asyncio.sleep(0.3)  # its claims for this round are in before ours
            held = await honest_round(honest, round_no, {a.peer, b.peer})
            assert held[a.peer] and held[b.peer] and not held[a.peer] & held[b.peer]
            assert held[a.peer] | held[b.peer] == set(PLANNED), f"round {round_no}: honest peers left shards unclaimed"
            for node in honest:
                assert flooder.key.peer_id not in {c.peer for c in node.leasing.book.owners().values()}
                # It is still named among the round's participants, as a claimant outside the live set:
                # the outer loop does not wait for a peer it does not see live.
                assert node.leasing.participants() - {flooder.key.peer_id} == {a.peer, b.peer}
                node.leasing.release_own()

    run(body, heartbeats=False)


def test_a_live_flooder_keeps_only_its_home_shards_then_is_excluded_and_not_waited_for() -> None:
    async def body(honest: list[Node], flooder: Flooder) -> None:
        a, b = honest
        hostile = flooder.key.peer_id
        trio = [a.peer, b.peer, hostile]
        for round_no in range(1, STRIKES_TO_EXCLUDE + 2):
            flooder.round = round_no
            await asyncio.sleep(0.3)
            held = await honest_round(honest, round_no, set(trio))
            assert not held[a.peer] & held[b.peer]
            if round_no <= STRIKES_TO_EXCLUDE:
                # A live flooder counts as a trainer: it keeps at most its cap, and only shards it is home to;
                # each honest peer keeps every shard it is home to within its speed share.
                share = budget_for(1.0, 3.0, len(PLANNED))
                for node in honest:
                    home = [s for s in PLANNED if home_peer(s, trio) == node.peer]
                    home_held = {s for s in held[node.peer] if home_peer(s, trio) == node.peer}
                    assert len(home_held) == min(share, len(home)), f"round {round_no}: {node.peer} lost home shards"
                    theirs = {s for s, c in node.leasing.book.owners().items() if c.peer == hostile}
                    assert len(theirs) <= claim_cap(len(PLANNED), 3)
                    assert all(home_peer(s, trio) == hostile for s in theirs)
                    assert hostile in node.leasing.participants()
            else:
                # Struck every round it held shards and sent nothing: now its claims count for nothing,
                # the round does not wait for it, and the honest peers take the whole pool between them.
                for node in honest:
                    assert node.leasing.excluded(hostile)
                    assert node.leasing.participants() == {a.peer, b.peer}
                    assert hostile in node.leasing.view()["excluded"]
                assert held[a.peer] | held[b.peer] == set(PLANNED)
            for node in honest:
                node.leasing.release_own()
                node.leasing.drop_unfinished([hostile])  # the round closed without its update

    run(body, heartbeats=True)


def test_claims_for_rounds_ahead_stay_bounded_and_are_counted() -> None:
    async def main() -> None:
        async with swarm(1) as [node]:
            topic = f"/p2p-node/{SWARM}/records/1"
            hostile = Libp2pBridge(SigningKey.generate().seed, ["/ip4/127.0.0.1/tcp/0"], kademlia=False)
            await hostile.start()
            try:
                await hostile.subscribe(topic)
                await hostile.connect(f"{node.bridge.listen_addrs()[0]}/p2p/{node.peer}", timeout=10)
                await wait_for(lambda: hostile.mesh_peers(topic), 20, "the gossip mesh")
                node.leasing.start_round(0, 5)
                one_key = SigningKey.generate()
                sybils = [SigningKey.generate() for _ in range(MAX_PENDING_FUTURE + 20)]
                sent = 0
                for i in range(300):  # one key, claims for rounds from 1 to 60 ahead
                    issued = now_ms() + i
                    claim = LeaseClaim.create(one_key.peer_id, i % 2, 6 + i % 60, PLANNED[:4], issued, issued + 60_000)
                    raw = sign_record(one_key, LEASE, LEASE_VERSION, SWARM, claim.to_wire(), issued)
                    await hostile.publish(topic, raw)
                    sent += 1
                for key in sybils:  # many keys, each one claim a round ahead
                    issued = now_ms()
                    claim = LeaseClaim.create(key.peer_id, 0, 6, PLANNED[:4], issued, issued + 60_000)
                    await hostile.publish(topic, sign_record(key, LEASE, LEASE_VERSION, SWARM, claim.to_wire(), issued))
                    sent += 1
                await wait_for(lambda: node.gossip.accepted[LEASE] >= sent, 30, "every flooded claim handled")
                pending = node.leasing._pending_future
                assert len(pending) <= MAX_PENDING_FUTURE
                assert all(0 < c.round - 5 <= 2 for c in pending.values())
                rejected = node.leasing.view()["rejected"]
                assert rejected["too_far_ahead"] > 0 and rejected["pending_full"] >= 20
                # What waited still counts once the peer gets there, and the map drains.
                node.leasing.start_round(0, 6)
                assert len(node.leasing.book) > 0 and len(node.leasing._pending_future) <= 2
            finally:
                await hostile.stop()

    asyncio.run(main())


def test_a_peer_backed_off_claims_nothing_until_its_pause_ends() -> None:
    # A peer that cannot train (its workload fails, its data cannot be had) backs off: its claims
    # would win the shards it is home to every round and never finish them.
    async def main() -> None:
        async with swarm(2) as nodes:
            a, b = nodes
            await wait_for(lambda: a.live_trainers() == [b.peer] and b.live_trainers() == [a.peer], 20,
                           "the two peers seeing each other live")
            pause = b.leasing.back_off()
            held = await honest_round(nodes, 1, {a.peer, b.peer})
            assert held[b.peer] == frozenset() and held[a.peer], held
            assert b.peer not in {c.peer for c in a.leasing.book.owners().values()}
            for node in nodes:
                node.leasing.release_own()
            await asyncio.sleep(pause)
            held = await honest_round(nodes, 2, {a.peer, b.peer})
            assert held[b.peer] and held[a.peer] and not held[a.peer] & held[b.peer], held

    asyncio.run(main())


def test_a_holder_that_answered_on_a_sibling_head_is_released_but_not_struck() -> None:
    """Two honest peers on sibling heads of one round each close it without the other's update:
    their leases go, but neither is struck, so they keep waiting for each other once the fork
    choice has them on one head again. A holder that sent nothing is struck as before."""
    async def main() -> None:
        async with swarm(3) as nodes:
            a, b, c = nodes
            everyone = {n.peer for n in nodes}
            await wait_for(lambda: all(set(n.live_trainers()) == everyone - {n.peer} for n in nodes), 20,
                           "peers seeing each other live")
            for round_no in range(1, STRIKES_TO_EXCLUDE + 1):
                held = await honest_round(nodes, round_no, everyone)
                assert all(held.values()), f"round {round_no}: a peer claimed nothing: {held}"
                for node in nodes:
                    node.leasing.release_own()
                # a's round: b answered on a sibling head, c sent nothing.
                a.leasing.drop_unfinished([c.peer], elsewhere=[b.peer])
                assert not {claim.peer for claim in a.leasing.book.owners().values()} & {b.peer, c.peer}
                b.leasing.drop_unfinished([], elsewhere=[a.peer, c.peer])
                c.leasing.drop_unfinished([], elsewhere=[a.peer, b.peer])
            assert not a.leasing.excluded(b.peer)
            assert a.leasing.excluded(c.peer)
            assert not b.leasing.excluded(a.peer) and not b.leasing.excluded(c.peer)

    asyncio.run(main())
