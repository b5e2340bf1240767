"""Heads on a real libp2p host and store: persistence across restarts, best-first verification, rejections."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from pathlib import Path

from node.availability import Availability
from node.daemon import NODE_RECORDS
from node.exchange import Exchange
from node.gossip import Gossip
from node.heads import STATE_FILE, Heads
from node.libp2p import Libp2pBridge
from node.merge import outer_rule
from node.store import RECORDS, ContentStore
from protocol import canonical
from protocol.cid import content_id
from protocol.heads import HeadRecord, genesis_head
from protocol.identity import SigningKey
from protocol.kinds import HEAD, record_kinds
from protocol.records import sign_record

SWARM = "heads-test"
RULE = outer_rule("mean", 0.7, 0.9, True, 0.2, 0.0)
GENESIS = genesis_head(content_id(b"genesis weights"), content_id(b"workload"), content_id(b"dataset"), RULE)


def child(parent: HeadRecord, samples: int, tag: str) -> HeadRecord:
    return HeadRecord(
        parent=parent.id, round=parent.round + 1, epoch=0, updates=(content_id(tag.encode()),), excluded=(),
        rule=RULE, weights=content_id(f"weights {tag}".encode()), momentum=content_id(f"momentum {tag}".encode()),
        samples_total=parent.samples_total + samples, tokens_total=0, samples=samples, tokens=0,
        microshards=(), eval=None, workload=parent.workload, dataset=parent.dataset,
    )


async def announce(gossip: Gossip, author: SigningKey, *batch: HeadRecord) -> None:
    """Hand ``batch`` to gossip as head records signed by ``author``, as if heard from the swarm."""
    for head in batch:
        raw = sign_record(author, HEAD, 1, SWARM, head.to_wire(), int(time.time() * 1000))
        await gossip.handle_message(raw, author.peer_id)


async def settled(heads: Heads) -> None:
    """Until every head heard has had its verdict."""
    while heads.verifying:
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def components(data_dir: Path):
    """A real host (no peers), gossip, store and exchange, as the daemon wires them for Heads."""
    key = SigningKey.generate()
    bridge = Libp2pBridge(key.seed, ["/ip4/127.0.0.1/tcp/0"], kademlia=False)
    await bridge.start()
    try:
        gossip = Gossip(bridge, key, SWARM, record_kinds(NODE_RECORDS))
        await gossip.start()
        store = ContentStore(data_dir / "store")
        exchange = Exchange(bridge, store, Availability(gossip, key.peer_id, 5.0))
        yield key, gossip, store, exchange
    finally:
        await bridge.stop()


def test_the_adopted_head_and_its_chain_survive_a_restart(tmp_path):
    first = child(GENESIS, 100, "a")
    second = child(first, 50, "b")

    async def run() -> None:
        async with components(tmp_path) as (_key, gossip, store, exchange):
            heads = Heads(GENESIS, gossip, store, exchange, tmp_path, 5.0, 200)
            await heads.add_own(first)
            await heads.add_own(second)
            assert heads.adopted == second.id
        assert json.loads((tmp_path / STATE_FILE).read_text())["adopted"] == second.id
        async with components(tmp_path) as (_key, gossip, store, exchange):
            restarted = Heads(GENESIS, gossip, store, exchange, tmp_path, 5.0, 200)
            assert restarted.adopted == GENESIS.id
            await restarted.restore()
            assert restarted.adopted == second.id
            assert [h.id for h in restarted.index.chain(second.id)] == [GENESIS.id, first.id, second.id]

    asyncio.run(run())


def test_a_corrupt_state_file_leaves_the_genesis_head(tmp_path):
    (tmp_path / STATE_FILE).write_text("{not json")

    async def run() -> None:
        async with components(tmp_path) as (_key, gossip, store, exchange):
            heads = Heads(GENESIS, gossip, store, exchange, tmp_path, 5.0, 200)
            await heads.restore()
            assert heads.adopted == GENESIS.id

    asyncio.run(run())


def test_heads_heard_are_verified_best_first_and_rejections_counted(tmp_path):
    honest = child(GENESIS, 100, "honest")
    forged = dataclasses.replace(honest, weights=GENESIS.weights, samples=10_000, samples_total=10_000)
    low = child(GENESIS, 10, "low")  # outranked by the honest head of the same round
    next_round = child(honest, 100, "next")
    verified: list[str] = []

    async def verifier(head: HeadRecord) -> str | None:
        # Stands for the recompute: only heads whose weights a merge of their inputs gives pass.
        verified.append(head.id)
        return "recompute_mismatch" if head.weights == GENESIS.weights else None

    async def run() -> None:
        async with components(tmp_path) as (_key, gossip, store, exchange):
            heads = Heads(GENESIS, gossip, store, exchange, tmp_path, 60.0, 200)
            heads.verifier = verifier
            author = SigningKey.generate()

            async def hear(*batch: HeadRecord) -> None:
                await announce(gossip, author, *batch)

            runner = asyncio.create_task(heads.run())
            try:
                # Queued together: the forged head (more samples) ranks first and is rejected,
                # then the honest one, then the low one: valid, linked, and outranked.
                await hear(low, honest, forged)
                await asyncio.wait_for(settled(heads), 10)
                assert verified == [forged.id, honest.id, low.id]
                assert heads.adopted == honest.id
                assert heads.rejected == {"recompute_mismatch": 1}
                assert heads.penalties[author.peer_id] == 1
                assert forged.id not in heads.index and low.id in heads.index
                await hear(next_round, forged)
                await asyncio.wait_for(settled(heads), 10)
                assert heads.adopted == next_round.id
                assert verified[3:] == [next_round.id]  # the forged head is not recomputed twice
                assert heads.rejected == {"recompute_mismatch": 1, "rejected_before": 1}
            finally:
                runner.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await runner

    asyncio.run(run())


def test_unknown_ancestors_are_verified_oldest_first_before_a_tip_is_adopted(tmp_path):
    """A tip whose parent was never announced: the parent is recomputed too. A forged parent
    (weights no merge gives, never announced itself) under a tip that recomputes correctly from
    it would otherwise replace the model."""
    forged_parent = child(GENESIS, 100, "forged parent")
    forged_tip = child(forged_parent, 100, "forged tip")
    honest_parent = child(GENESIS, 50, "honest parent")
    honest_tip = child(honest_parent, 50, "honest tip")
    verified: list[str] = []

    async def verifier(head: HeadRecord) -> str | None:
        verified.append(head.id)
        return "recompute_mismatch" if head.id == forged_parent.id else None

    async def run() -> None:
        async with components(tmp_path) as (_key, gossip, store, exchange):
            heads = Heads(GENESIS, gossip, store, exchange, tmp_path, 60.0, 200)
            heads.verifier = verifier
            for body in (forged_parent, honest_parent):  # bodies this peer can read, never announced
                store.put_record(canonical.encode(body.to_wire()), body.id)
            author = SigningKey.generate()

            async def hear(head: HeadRecord) -> None:
                await announce(gossip, author, head)
                await settled(heads)

            runner = asyncio.create_task(heads.run())
            try:
                await asyncio.wait_for(hear(forged_tip), 10)
                assert heads.adopted == GENESIS.id
                assert forged_parent.id not in heads.index and forged_tip.id not in heads.index
                assert heads.rejected == {"ancestor_recompute_mismatch": 1}
                assert verified == [forged_parent.id]  # the tip is not worth a recompute after that
                await asyncio.wait_for(hear(honest_tip), 10)
                assert verified[1:] == [honest_parent.id, honest_tip.id]
                assert heads.adopted == honest_tip.id
            finally:
                runner.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await runner

    asyncio.run(run())


def test_evaluations_of_heads_nobody_knows_are_not_kept(tmp_path):
    async def run() -> None:
        async with components(tmp_path) as (_key, gossip, store, exchange):
            heads = Heads(GENESIS, gossip, store, exchange, tmp_path, 60.0, 200)
            assert heads.record_eval(GENESIS.id, "peer", 1.5)
            for i in range(1000):
                assert not heads.record_eval(content_id(b"made up %d" % i), "peer", 1.0)
            assert list(heads.eval) == [GENESIS.id]

    asyncio.run(run())


def test_a_trusted_head_is_linked_with_its_ancestors_unverified_and_later_heads_are_verified(tmp_path):
    """The operator's word for a head stands in for history the swarm no longer keeps."""
    old = child(GENESIS, 10, "old")
    anchor = child(old, 10, "anchor")
    after = child(anchor, 10, "after")
    tip = child(after, 10, "tip")
    verified: list[str] = []

    async def verifier(head: HeadRecord) -> str | None:
        verified.append(head.id)
        return None

    async def run() -> None:
        async with components(tmp_path) as (_key, gossip, store, exchange):
            heads = Heads(GENESIS, gossip, store, exchange, tmp_path, 60.0, 200, trusted=frozenset({anchor.id}))
            heads.verifier = verifier
            for body in (old, anchor, after):
                store.put_record(canonical.encode(body.to_wire()), body.id)
            author = SigningKey.generate()
            runner = asyncio.create_task(heads.run())
            try:
                await announce(gossip, author, tip)
                await asyncio.wait_for(settled(heads), 10)
                assert heads.adopted == tip.id
                assert verified == [after.id, tip.id]  # nothing up to the anchor was recomputed
            finally:
                runner.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await runner

    asyncio.run(run())


def test_a_branch_that_cannot_outweigh_the_canonical_head_is_set_aside_unverified(tmp_path):
    """A head weighs the distinct authors of its updates, so at most its update count: a lone
    peer's branch (one update a head) that cannot reach the canonical head's weight is not worth
    a recompute, nor is a head built on it worth a fetch of its parent."""
    def merged(parent: HeadRecord, tag: str, authors: int) -> HeadRecord:
        head = child(parent, 100, tag)
        return dataclasses.replace(head, updates=tuple(sorted(content_id(f"{tag} {i}".encode()) for i in range(authors))))

    swarm_head = merged(GENESIS, "swarm", 3)
    lone = merged(GENESIS, "lone", 1)
    lone_next = merged(lone, "lone next", 1)
    heavier = merged(GENESIS, "heavier", 4)
    authors = {h.id: frozenset(f"peer {i}" for i in range(len(h.updates))) for h in (swarm_head, lone, lone_next, heavier)}
    verified: list[str] = []

    async def verifier(head: HeadRecord) -> str | None:
        verified.append(head.id)
        return None

    async def run() -> None:
        async with components(tmp_path) as (_key, gossip, store, exchange):
            heads = Heads(GENESIS, gossip, store, exchange, tmp_path, 60.0, 200)
            heads.verifier = verifier
            heads.authors_of = lambda head: authors.get(head.id, frozenset())
            author = SigningKey.generate()

            async def hear(head: HeadRecord) -> None:
                await announce(gossip, author, head)
                await settled(heads)

            runner = asyncio.create_task(heads.run())
            try:
                await asyncio.wait_for(hear(swarm_head), 10)
                assert heads.adopted == swarm_head.id and heads.index.weight(swarm_head.id) == 3, heads.rejected
                await asyncio.wait_for(hear(lone), 10)
                # Its parent is not even in the store or the swarm: weighed from the bound of ``lone``.
                await asyncio.wait_for(hear(lone_next), 10)
                assert verified == [swarm_head.id]
                assert heads.rejected == {"cannot_outweigh": 2}
                assert not heads.penalties
                # A branch whose ancestors had to be read: announced again (as its author does every
                # few seconds), it is weighed from the bound remembered, not from its ancestors again.
                far_parent = merged(GENESIS, "far parent", 1)
                far = merged(far_parent, "far tip", 1)
                store.put_record(canonical.encode(far_parent.to_wire()), far_parent.id)
                await asyncio.wait_for(hear(far), 10)
                store._path(RECORDS, far_parent.id).unlink()  # had it been read again, it would be missing
                await asyncio.wait_for(hear(far), 10)
                assert heads.rejected == {"cannot_outweigh": 4} and not heads.penalties, heads.rejected
                await asyncio.wait_for(hear(heavier), 10)
                assert verified == [swarm_head.id, heavier.id]
                assert heads.adopted == heavier.id
            finally:
                runner.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await runner

    asyncio.run(run())
