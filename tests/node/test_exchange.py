"""The chunk exchange end to end: real daemons on 127.0.0.1 fetch real artifacts from each other.

Every peer runs as a consumer with evaluation off, so the only traffic is the exchange under
test. Copies are checked after the daemons stop: ``load_artifact`` re-hashes every chunk of
the fetcher's store and the tensors must equal the source bit for bit.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from node.artifacts import load_artifact, store_artifact
from node.gossip import now_ms, records_topic
from node.libp2p import BridgeError, FramedStream, GossipSettings, Libp2pBridge
from node.store import ContentStore
from protocol import exchange as wire
from protocol.availability import ANNOUNCE_KIND, ANNOUNCE_VERSION, Announce
from protocol.errors import Invalid
from protocol.exchange import HaveAnswer, HaveRequest, Item
from protocol.identity import SigningKey
from protocol.records import sign_record
from tests.swarm_harness import Peer, Swarm, mount_tmpfs, wait_until

pytestmark = pytest.mark.slow

TOKEN = "exchange-test-token"
MIB = 1 << 20
# Quiet peers: no training, no evaluation; announcements every second so providers show up fast.
QUIET = '[training]\nrole = "consumer"\nevaluate = false\n\n'


def exchange_toml(**settings: object) -> str:
    lines = [f"{key} = {json.dumps(value)}" for key, value in {"announce_interval_s": 1.0, **settings}.items()]
    return QUIET + "[exchange]\n" + "\n".join(lines) + "\n"


# One chunk per request and one stream per provider: a seed serves its fetchers in turn, so
# "half fetched" is a moment a test can observe (and the fetch is not over before a poll).
PACED = exchange_toml(batch_bytes=MIB, streams_per_provider=1)


@lru_cache(maxsize=None)
def source_tensors(mib: int, seed: int) -> dict[str, torch.Tensor]:
    """``mib`` MiB of float32 in 4 MiB tensors: ``mib`` one-MiB chunks."""
    generator = torch.Generator().manual_seed(seed)
    return {f"layer{i}": torch.randn(1024, 1024, generator=generator) for i in range(mib // 4)}


def seed_artifact(peer: Peer, mib: int = 64, seed: int = 0) -> str:
    return store_artifact(ContentStore(peer.data_dir / "store"), source_tensors(mib, seed))


def chunk_ids(peer: Peer, manifest_id: str) -> list[str]:
    manifest = ContentStore(peer.data_dir / "store").get_manifest(manifest_id)
    assert manifest is not None
    return [ref.cid for ref in manifest.chunks]


def held(peer: Peer, chunks: list[str]) -> set[str]:
    """The chunks among ``chunks`` that are complete files in ``peer``'s store (temp files are not)."""
    store = ContentStore(peer.data_dir / "store")
    return {cid for cid in chunks if store.has(cid)}


def fetch_view(peer: Peer, manifest_id: str) -> dict | None:
    body = peer.get("/fetches")
    for row in (body or {}).get("fetches", []):
        if row["manifest_id"] == manifest_id:
            return row
    return None


def start_fetch(peer: Peer, manifest_id: str) -> None:
    status, body = peer.post("/fetches", {"manifest": manifest_id})
    assert status == 202, (status, body)


def wait_finished(peer: Peer, manifest_id: str, timeout: float) -> dict:
    """The fetch's view once it is done or failed."""

    def finished() -> dict | None:
        view = fetch_view(peer, manifest_id)
        return view if view and view["state"] in ("done", "failed") else None

    return wait_until(finished, timeout, interval=0.1, what=f"{peer.name} to finish the fetch")


def wait_done(peer: Peer, manifest_id: str, timeout: float) -> dict:
    view = wait_finished(peer, manifest_id, timeout)
    assert view["state"] == "done", view
    assert view["have_chunks"] == view["total_chunks"]
    return view


def assert_identical_copy(peer: Peer, manifest_id: str, mib: int = 64, seed: int = 0) -> None:
    """Every chunk re-hashed from disk, and the tensors equal to the source bit for bit."""
    copy = load_artifact(ContentStore(peer.data_dir / "store"), manifest_id)
    source = source_tensors(mib, seed)
    assert list(copy) == list(source)
    for name, tensor in source.items():
        assert torch.equal(copy[name], tensor), f"{peer.name}: {name} differs"


def start_all(peers: list[Peer]) -> None:
    for peer in peers:
        peer.start()
    for peer in peers:
        peer.wait_healthy(timeout=90)
    everyone = {p.peer_id for p in peers}
    for peer in peers:
        wait_until(lambda p=peer: p.live_peers() == everyone - {p.peer_id}, 60, what=f"{peer.name} meets everyone")

    def connections(peer: Peer) -> int:
        return ((peer.get("/status") or {}).get("peers") or {}).get("connected", 0)

    # Direct connections too (gossip reaches a peer through others before anyone dials it).
    for peer in peers:
        wait_until(lambda p=peer: connections(p) >= len(peers) - 1, 60, what=f"{peer.name} connects to everyone")


@pytest.fixture
def swarm(tmp_path):
    swarm = Swarm(tmp_path)
    yield swarm
    for peer in swarm.peers:  # a test that froze a peer must not leave it frozen
        if peer.process is not None and peer.process.poll() is None:
            peer.process.send_signal(signal.SIGCONT)
    swarm.stop_all()


def test_three_fetchers_finish_from_each_other_after_the_seed_dies(swarm):
    peers = [swarm.add(PACED, token=TOKEN) for _ in range(4)]
    seed, fetchers = peers[0], peers[1:]
    manifest_id = seed_artifact(seed)
    chunks = chunk_ids(seed, manifest_id)
    try:
        start_all(peers)
        for peer in fetchers:
            start_fetch(peer, manifest_id)

        def half_at_peer2() -> bool:
            view = fetch_view(fetchers[0], manifest_id)
            return bool(view and view["total_chunks"] and view["have_chunks"] >= view["total_chunks"] / 2)

        def spread() -> bool:
            return set().union(*(held(peer, chunks) for peer in fetchers)) == set(chunks)

        # What chunk selection is for: fetchers take from the seed first the chunks that no
        # fetcher holds yet (rarest first), and copy nothing from each other until every chunk
        # has left the seed, so they soon hold the whole artifact between them. The seed dies
        # once peer2 holds half and that spread is complete. Killed with the last of the spread
        # still on the wire (as a run on a loaded machine did, once), it would take that chunk
        # with it, as any seed would.
        wait_until(half_at_peer2, 90, interval=0.02, what="peer2 to hold half of the artifact")
        wait_until(spread, 10, interval=0.02, what="the fetchers to hold every chunk between them")
        seed.kill9()
        holdings = [held(peer, chunks) for peer in fetchers]
        assert len(holdings[0]) < len(chunks), "peer2 finished before the seed died: nothing was tested"

        views = [wait_done(peer, manifest_id, 60) for peer in fetchers]
        for peer, view, before in zip(fetchers, views, holdings):
            assert seed.peer_id in view["dropped_providers"]
            others = {p.peer_id for p in fetchers} - {peer.peer_id}
            if len(before) < len(chunks):
                assert others & set(view["providers"]), f"{peer.name} took the rest from nobody"
            stats = peer.get("/exchange")
            assert stats["chunks_verified"] == stats["chunks_in"] == len(chunks)
            assert not stats["rejected_chunks_by_peer"]
    except AssertionError:
        print(swarm.logs())
        raise
    for peer in fetchers:
        assert peer.terminate() == 0
        assert_identical_copy(peer, manifest_id)


# ---- a provider that serves corrupt chunks --------------------------------------------


class Liar:
    """A libp2p host in this process that announces an artifact and serves every chunk of it
    under its right id with one byte flipped (its manifest is served intact)."""

    def __init__(self, swarm: str, manifest_id: str, manifest: bytes, chunks: dict[str, bytes]) -> None:
        self.key = SigningKey.generate()
        self.swarm = swarm
        self.manifest_id = manifest_id
        self.manifest = manifest
        self.chunks = chunks
        self.corrupt_served = 0
        self.bridge = Libp2pBridge(self.key.seed, ["/ip4/127.0.0.1/tcp/0"], kademlia=False, gossip=GossipSettings())

    @property
    def peer_id(self) -> str:
        return self.key.peer_id

    async def serve(self, stream: FramedStream) -> None:
        while True:
            try:
                request = wire.decode_request(await stream.read_frame(wire.MAX_REQUEST_BYTES, timeout=30))
            except (BridgeError, TimeoutError, Invalid):
                return
            if isinstance(request, HaveRequest):
                bits = wire.bitfield([True] * len(self.chunks))
                await stream.write_frame(HaveAnswer(bits).encode(), timeout=10)
                continue
            for cid in request.ids:
                data: bytes | None = None
                if request.kind == "manifest" and cid == self.manifest_id:
                    data = self.manifest
                elif request.kind == "chunk" and cid in self.chunks:
                    good = self.chunks[cid]
                    data = bytes([good[0] ^ 0xFF]) + good[1:]
                    self.corrupt_served += 1
                await stream.write_frame(Item(cid, data).encode(), timeout=10)

    async def announce_forever(self, topic: str) -> None:
        body = Announce((self.manifest_id,)).to_wire()
        while True:
            record = sign_record(self.key, ANNOUNCE_KIND, ANNOUNCE_VERSION, self.swarm, body, now_ms())
            try:
                await self.bridge.publish(topic, record)
            except (BridgeError, TimeoutError):
                pass
            await asyncio.sleep(0.5)


def rogue_provider(kind: type[Liar], swarm: Swarm, holder: Peer, manifest_id: str) -> Liar:
    """A ``kind`` of bad provider (not started) with ``holder``'s copy of the artifact."""
    store = ContentStore(holder.data_dir / "store")
    manifest = store.get_manifest(manifest_id)
    return kind(swarm.swarm, manifest_id, manifest.encoded, {ref.cid: store.get(ref.cid) for ref in manifest.chunks})


def fetch_beside(rogue: Liar, fetcher: Peer, manifest_id: str) -> dict:
    """Start ``rogue``, join it to ``fetcher``'s mesh and let it announce the artifact; then
    have the fetcher fetch it and return the finished fetch's view."""

    async def scenario() -> dict:
        topic = records_topic(rogue.swarm)
        await rogue.bridge.start()
        try:
            await rogue.bridge.set_stream_handler(wire.PROTOCOL_ID, rogue.serve)
            inbox = await rogue.bridge.subscribe(topic)
            await rogue.bridge.connect(fetcher.addr, timeout=10)
            # The mesh works both ways once the fetcher's own records reach us.
            async with asyncio.timeout(30):
                while (await inbox.get()).source != fetcher.peer_id:
                    pass
            announcer = asyncio.create_task(rogue.announce_forever(topic))
            await asyncio.sleep(2.0)  # a few announcements: the fetcher indexes the rogue as a holder
            await asyncio.to_thread(start_fetch, fetcher, manifest_id)
            view = await asyncio.to_thread(wait_done, fetcher, manifest_id, 60)
            announcer.cancel()
            return view
        finally:
            await rogue.bridge.stop()

    return asyncio.run(scenario())


def test_a_provider_serving_corrupt_chunks_is_caught_and_the_fetch_succeeds(swarm):
    honest = swarm.add(PACED, token=TOKEN)
    # Wide: the fetcher draws on both providers at once, so the liar is asked from the start.
    fetcher = swarm.add(exchange_toml(batch_bytes=MIB, fan_out="wide"), token=TOKEN)
    manifest_id = seed_artifact(honest, mib=32, seed=1)
    manifest = ContentStore(honest.data_dir / "store").get_manifest(manifest_id)
    liar = rogue_provider(Liar, swarm, honest, manifest_id)
    start_all([honest, fetcher])
    try:
        view = fetch_beside(liar, fetcher, manifest_id)
        assert liar.corrupt_served >= 1, "the fetcher never asked the liar: nothing was tested"
        stats = fetcher.get("/exchange")
        assert stats["rejected_chunks_by_peer"].get(liar.peer_id, 0) >= 1, stats
        assert "hash" in view["dropped_providers"][liar.peer_id]
        assert honest.peer_id in view["providers"] and honest.peer_id not in view["dropped_providers"]
        # Every chunk in the store was verified on the way in; none of the liar's got there.
        assert stats["chunks_verified"] == len(manifest.chunks)
        assert stats["chunks_in"] == len(manifest.chunks) + stats["rejected_chunks_by_peer"][liar.peer_id]
        assert fetcher.get("/healthz") == {"ok": True}
        assert fetcher.process.poll() is None
    except AssertionError:
        print(swarm.logs())
        raise
    assert fetcher.terminate() == 0
    assert_identical_copy(fetcher, manifest_id, mib=32, seed=1)


class Breaker(Liar):
    """Serves the first two chunks of every request intact, then resets the stream."""

    served_before_reset = 0

    async def serve(self, stream: FramedStream) -> None:
        try:
            request = wire.decode_request(await stream.read_frame(wire.MAX_REQUEST_BYTES, timeout=30))
        except (BridgeError, TimeoutError, Invalid):
            return
        if isinstance(request, HaveRequest) or request.kind != "chunk":
            return await Liar.serve(self, stream)  # not expected: the manifest comes from the seed
        for cid in request.ids[:2]:
            await stream.write_frame(Item(cid, self.chunks[cid]).encode(), timeout=10)
            self.served_before_reset += 1
        await stream.reset()


def test_chunks_that_arrived_before_a_provider_broke_off_are_kept(swarm):
    """A provider that breaks off in the middle of an answer: the chunks that did arrive are
    verified and stored, not fetched again."""
    honest = swarm.add(PACED, token=TOKEN)
    # Wide: the fetcher draws on both providers at once, so the breaker is asked from the start.
    fetcher = swarm.add(exchange_toml(batch_bytes=4 * MIB, request_timeout_s=2.0, fan_out="wide"), token=TOKEN)
    manifest_id = seed_artifact(honest, mib=32, seed=2)
    manifest = ContentStore(honest.data_dir / "store").get_manifest(manifest_id)
    breaker = rogue_provider(Breaker, swarm, honest, manifest_id)
    start_all([honest, fetcher])
    try:
        view = fetch_beside(breaker, fetcher, manifest_id)
        assert breaker.served_before_reset >= 2, "the fetcher never asked the breaker: nothing was tested"
        assert breaker.peer_id in view["dropped_providers"], view
        stats = fetcher.get("/exchange")
        # Each chunk crossed the wire once: those the breaker sent before it reset were kept.
        assert stats["chunks_in"] == stats["chunks_verified"] == len(manifest.chunks), stats
        assert not stats["rejected_chunks_by_peer"], stats
    except AssertionError:
        print(swarm.logs())
        raise
    assert fetcher.terminate() == 0
    assert_identical_copy(fetcher, manifest_id, mib=32, seed=2)


# ---- crash and resume -----------------------------------------------------------------


def test_a_fetch_killed_midway_resumes_after_restart_and_fetches_only_what_is_missing(swarm):
    seed, fetcher = swarm.add(PACED, token=TOKEN), swarm.add(PACED, token=TOKEN)
    manifest_id = seed_artifact(seed)
    chunks = chunk_ids(seed, manifest_id)
    sizes = {ref.cid: ref.size for ref in ContentStore(seed.data_dir / "store").get_manifest(manifest_id).chunks}
    try:
        start_all([seed, fetcher])
        start_fetch(fetcher, manifest_id)

        def some_chunks() -> bool:
            view = fetch_view(fetcher, manifest_id)
            return bool(view and view["have_chunks"] >= 8)

        wait_until(some_chunks, 90, interval=0.02, what="the fetcher to store a few chunks")
        fetcher.kill9()
        stored = held(fetcher, chunks)
        assert 8 <= len(stored) < len(chunks), f"{len(stored)} of {len(chunks)} stored at the kill"
        journal = json.loads((fetcher.data_dir / "fetches.json").read_text())
        assert manifest_id in journal

        fetcher.start()  # same data dir: nobody asks for the fetch again, the journal does
        fetcher.wait_healthy(timeout=90)
        view = wait_done(fetcher, manifest_id, 60)
        stats = fetcher.get("/exchange")
        missing = [cid for cid in chunks if cid not in stored]
        missing_bytes = sum(sizes[cid] for cid in missing)
        # Exact: chunks that were in flight at the kill were never renamed into the store, so
        # they are among the missing; nothing stored before the kill crosses the wire again.
        assert stats["bytes_in"] == missing_bytes, (stats["bytes_in"], missing_bytes)
        assert stats["chunks_in"] == stats["chunks_verified"] == len(missing)
        assert view["fetched_bytes"] == missing_bytes
        assert json.loads((fetcher.data_dir / "fetches.json").read_text()) == []
    except AssertionError:
        print(swarm.logs())
        raise
    assert fetcher.terminate() == 0
    assert_identical_copy(fetcher, manifest_id)


# ---- a full disk ----------------------------------------------------------------------


def test_a_fetch_that_fills_the_disk_fails_clearly_stores_nothing_corrupt_and_resumes(swarm):
    """The fetcher's store lies on a 12 MiB tmpfs and the artifact is 32 MiB: the fetch fails
    with the disk's error, the daemon keeps running, every chunk left in the store verifies and
    no temp file is left behind. Given room, the same fetch completes without fetching again
    what was stored before."""
    seed, fetcher = swarm.add(PACED, token=TOKEN), swarm.add(exchange_toml(batch_bytes=2 * MIB), token=TOKEN)
    manifest_id = seed_artifact(seed, mib=32, seed=3)
    store_dir = fetcher.data_dir / "store"
    store_dir.mkdir(parents=True)
    if (reason := mount_tmpfs(store_dir, 12)) is not None:
        pytest.skip(f"cannot mount a tmpfs (needs root): {reason}")
    try:
        start_all([seed, fetcher])
        start_fetch(fetcher, manifest_id)
        view = wait_finished(fetcher, manifest_id, 60)
        assert view["state"] == "failed", view
        assert "No space left on device" in view["error"], view
        assert fetcher.get("/healthz") == {"ok": True} and fetcher.process.poll() is None
        # Nothing half-written: no temp file, and every chunk there hashes to its name.
        assert not [p for p in store_dir.rglob(".tmp-*")]
        report = ContentStore(store_dir).check(full=True)
        assert report.corrupt == [] and report.temp_files == 0, report
        chunks = chunk_ids(seed, manifest_id)
        stored = held(fetcher, chunks)
        assert 0 < len(stored) < len(chunks)

        assert mount_tmpfs(store_dir, 64, remount=True) is None
        start_fetch(fetcher, manifest_id)
        view = wait_done(fetcher, manifest_id, 60)
        sizes = {ref.cid: ref.size for ref in ContentStore(seed.data_dir / "store").get_manifest(manifest_id).chunks}
        assert view["fetched_bytes"] == sum(size for cid, size in sizes.items() if cid not in stored), view
        assert not [line for line in fetcher.log().splitlines() if "never retrieved" in line]
        assert fetcher.terminate() == 0
        assert_identical_copy(fetcher, manifest_id, mib=32, seed=3)
    except AssertionError:
        print(swarm.logs())
        raise
    finally:
        swarm.stop_all()
        subprocess.run(["umount", str(store_dir)], capture_output=True)


# ---- a frozen provider ----------------------------------------------------------------


@pytest.mark.parametrize("fan_out", ["wide", "narrow"])
def test_a_frozen_provider_costs_one_deadline_not_a_hang(swarm, fan_out):
    """Wide: one of the two providers the fetch draws on freezes. Narrow: the one provider it
    draws on freezes, and the fetch moves to the other."""
    deadline_s = 2.0
    toml = exchange_toml(batch_bytes=MIB, streams_per_provider=1, request_timeout_s=deadline_s, fan_out=fan_out)
    one, other, fetcher = (swarm.add(toml, token=TOKEN) for _ in range(3))
    manifest_id = seed_artifact(one)
    assert seed_artifact(other) == manifest_id
    try:
        start_all([one, other, fetcher])
        start_fetch(fetcher, manifest_id)

        def serving() -> bool:
            view = fetch_view(fetcher, manifest_id)
            return bool(view and view["have_chunks"] >= 8 and {one.peer_id, other.peer_id} <= set(view["providers"]))

        wait_until(serving, 90, interval=0.02, what="the fetch to run with both providers known")
        sent = [(peer, peer.get("/exchange")["chunks_out"]) for peer in (one, other)]
        if fan_out == "wide":
            assert all(chunks for _, chunks in sent), f"the fetch does not draw on both providers: {sent}"
            first = one
        else:
            serving_peers = [peer for peer, chunks in sent if chunks]
            assert len(serving_peers) == 1, f"a narrow fetch draws on one provider: {sent}"
            first = serving_peers[0]
        first.process.send_signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        view = wait_done(fetcher, manifest_id, 60)
        took = time.monotonic() - frozen_at
        first.process.send_signal(signal.SIGCONT)
        stats = fetcher.get("/exchange")
        assert stats["timeouts_by_peer"].get(first.peer_id, 0) >= 1, stats
        assert "no answer" in view["dropped_providers"][first.peer_id]
        # One deadline plus the rest of the transfer, far from libp2p's 60 s of silence.
        assert took < deadline_s + 20, took
        assert fetcher.get("/healthz") == {"ok": True}
    except AssertionError:
        print(swarm.logs())
        raise
    finally:
        for peer in (one, other):
            peer.process.send_signal(signal.SIGCONT)
    assert fetcher.terminate() == 0
    assert_identical_copy(fetcher, manifest_id)
