"""A peer with the data locally repairs a corrupt or missing microshard whenever a read needs it."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from node.availability import Availability
from node.daemon import NODE_RECORDS
from node.exchange import Exchange
from node.gossip import Gossip
from node.libp2p import Libp2pBridge
from node.microshards import MicroshardSource
from node.store import ContentStore
from protocol.cid import content_id
from protocol.identity import SigningKey
from protocol.kinds import record_kinds
from workloads.registry import load_workload


def _stored_path(store: ContentStore, cid: str) -> Path:
    digest = cid[3:]
    return store.root / "chunks" / digest[:2] / digest


async def _with_source(root: Path, body):  # type: ignore[no-untyped-def]
    key = SigningKey.generate()
    bridge = Libp2pBridge(key.seed, ["/ip4/127.0.0.1/tcp/0"], kademlia=False)
    await bridge.start()
    try:
        gossip = Gossip(bridge, key, "repair", record_kinds(NODE_RECORDS))
        store = ContentStore(root / "store")
        availability = Availability(gossip, key.peer_id, 5.0)
        exchange = Exchange(bridge, store, availability)
        workload = load_workload("tiny", {})
        source = MicroshardSource(workload, store, exchange, availability, local=True)
        await source.seed()
        return await body(source, store, workload)
    finally:
        await bridge.stop()


def test_a_same_size_corruption_after_start_is_regenerated_and_served(tmp_path: Path) -> None:
    async def body(source, store, workload):  # type: ignore[no-untyped-def]
        first, second = source.plan[0], source.plan[1]
        path = _stored_path(store, first.source.data_cid)
        good = path.read_bytes()
        path.write_bytes(bytes(b ^ 0xFF for b in good[:16]) + good[16:])  # same size: a quick check passes
        assert store.check().corrupt == []
        served = await source.bytes_of([first.id, second.id])
        again = await source.bytes_of([first.id])
        return good, served, again, source.repaired, workload.microshard_bytes(first.index), path.read_bytes()

    good, served, again, repaired, expected, on_disk = asyncio.run(_with_source(tmp_path, body))
    assert served[0] == expected == good == again[0] == on_disk
    assert content_id(served[0]) == content_id(good)
    assert repaired == 1


def test_a_missing_microshard_is_regenerated_at_any_time(tmp_path: Path) -> None:
    async def body(source, store, workload):  # type: ignore[no-untyped-def]
        shards = source.plan[2:5]
        for shard in shards:
            os.remove(_stored_path(store, shard.source.data_cid))
        served = await source.bytes_of([s.id for s in shards])
        return [content_id(d) for d in served], [s.source.data_cid for s in shards], source.repaired, store.missing(
            [s.source.data_cid for s in shards])

    served, planned, repaired, missing = asyncio.run(_with_source(tmp_path, body))
    assert served == planned and repaired == 3 and missing == []
