"""Chunk exchange: serve our content to peers, and fetch artifacts from every peer that has them.

A fetch runs one worker per provider connection. Each worker asks its peer
for a batch of chunks the peer has and nobody else is fetching, verifies each
chunk's hash before storing it, and hands failed chunks back to the pool. A
peer that times out is disconnected and dropped from the fetch; a peer that
serves a corrupt chunk is banned from it and penalised. How many providers
have workers at once (all, or one) is the fetch's width (``node.fanout``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from node.availability import Availability
from node.fanout import NARROW, WIDE, FanOut, FanOutSettings, ReceiverLoad, Verdict, process_demand_s
from node.fetch_journal import FetchJournal
from node.libp2p import (
    BridgeError,
    FramedStream,
    FrameWriter,
    Libp2pBridge,
    frame_prefix,
    mark_retrieved,
)
from node.logs import get_logger
from node.store import ContentStore
from protocol import exchange as wire
from protocol.cid import matches
from protocol.errors import Invalid
from protocol.exchange import FetchState, GetRequest, HaveAnswer, HaveRequest, Item
from protocol.leases import rendezvous_weight
from protocol.manifest import Manifest, parse_manifest

log = get_logger("exchange")

_READ_AHEAD = 4  # chunks a server reads from disk ahead of the one it is sending
# Peers each per-peer counter in ExchangeStats holds. Any key can announce itself as a provider
# and then time out or lie, so the counters are capped; a thousand is far above a swarm's size.
MAX_PEER_STATS = 1024


@dataclass(frozen=True)
class ExchangeSettings:
    request_timeout_s: float = 10.0
    streams_per_provider: int = 2
    batch_bytes: int = 4 * 1024 * 1024
    max_streams_per_peer: int = 8
    max_bytes_in_flight: int = 256 * 1024 * 1024
    stall_timeout_s: float = 60.0
    have_poll_s: float = 0.5
    serve_pending_bytes: int = 4 * 1024 * 1024  # answers queued per stream ahead of the wire
    fan_out: str = "adaptive"  # adaptive: measure one provider against all, keep the faster; wide; narrow


@dataclass
class ExchangeStats:
    chunks_in: int = 0
    chunks_out: int = 0
    chunks_verified: int = 0
    requests_served: int = 0
    bad_requests: int = 0
    busy_refusals: int = 0
    rejected_chunks_by_peer: Counter[str] = field(default_factory=Counter)
    timeouts_by_peer: Counter[str] = field(default_factory=Counter)
    # Content bytes moved, by kind (chunk, manifest, record), as received or sent.
    bytes_in_by_kind: Counter[str] = field(default_factory=Counter)
    bytes_out_by_kind: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)  # per-peer counts evicted, by counter

    def count_peer(self, counter: Counter[str], peer: str, name: str) -> None:
        """One more for ``peer`` in ``counter`` (``name`` in ``dropped``), kept to MAX_PEER_STATS
        peers: a newcomer to a full counter takes the place of the peer with the fewest."""
        if peer not in counter and len(counter) >= MAX_PEER_STATS:
            del counter[min(counter, key=counter.__getitem__)]
            self.dropped[name] += 1
        counter[peer] += 1

    @property
    def bytes_in(self) -> int:
        """Chunk bytes received."""
        return self.bytes_in_by_kind["chunk"]

    @property
    def bytes_out(self) -> int:
        """Chunk bytes sent."""
        return self.bytes_out_by_kind["chunk"]

    def view(self) -> dict[str, Any]:
        return {
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "chunks_in": self.chunks_in,
            "chunks_out": self.chunks_out,
            "chunks_verified": self.chunks_verified,
            "requests_served": self.requests_served,
            "bad_requests": self.bad_requests,
            "busy_refusals": self.busy_refusals,
            "rejected_chunks_by_peer": dict(self.rejected_chunks_by_peer),
            "timeouts_by_peer": dict(self.timeouts_by_peer),
            "bytes_in_by_kind": dict(self.bytes_in_by_kind),
            "bytes_out_by_kind": dict(self.bytes_out_by_kind),
        }


class FetchFailed(RuntimeError):
    """A fetch could not complete; the message says why."""


@dataclass
class FetchProgress:
    manifest_id: str
    state: FetchState = FetchState.STARTING
    total_chunks: int = 0
    total_bytes: int = 0
    have_chunks: int = 0
    have_bytes: int = 0
    fetched_bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None  # time.monotonic() when the fetch ended, however it ended
    providers: set[str] = field(default_factory=set)
    dropped: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    fan_out: FanOut | None = None

    def view(self) -> dict[str, Any]:
        # A fetch that ended keeps the rate it had over its own duration.
        elapsed = max((self.finished or time.monotonic()) - self.started, 1e-6)
        rate = self.fetched_bytes / elapsed
        remaining = self.total_bytes - self.have_bytes
        return {
            "manifest_id": self.manifest_id,
            "state": self.state.value,
            "total_chunks": self.total_chunks,
            "have_chunks": self.have_chunks,
            "total_bytes": self.total_bytes,
            "have_bytes": self.have_bytes,
            "fetched_bytes": self.fetched_bytes,
            "progress": round(self.have_bytes / self.total_bytes, 4) if self.total_bytes else 1.0,
            "elapsed_s": round(elapsed, 3),
            "rate_bytes_per_s": round(rate),
            "eta_s": round(remaining / rate, 1) if rate > 0 and remaining > 0 else None,
            "providers": sorted(self.providers),
            "dropped_providers": dict(self.dropped),
            "fan_out": self.fan_out.view() if self.fan_out is not None else None,
            "error": self.error,
        }


class ChunkServer:
    """Answers chunk, manifest, record and have requests; no peer input can raise out of it."""

    def __init__(self, store: ContentStore, settings: ExchangeSettings, stats: ExchangeStats) -> None:
        self._store = store
        self._settings = settings
        self._stats = stats
        self._streams: Counter[str] = Counter()
        self._budget = asyncio.Semaphore(max(1, settings.max_bytes_in_flight // (2 * wire.MAX_ITEM_BYTES)))

    async def handle(self, stream: FramedStream) -> None:
        peer = stream.peer_id
        if self._streams[peer] >= self._settings.max_streams_per_peer:
            self._stats.busy_refusals += 1
            await stream.write_frame(wire.encode_error("busy"), timeout=5.0)
            return
        self._streams[peer] += 1
        # Answers go out through a queue drained on the trio side, so the stream keeps sending
        # while the next chunk is read from disk.
        writer = stream.writer(self._settings.serve_pending_bytes)
        timeout = self._settings.request_timeout_s
        try:
            while True:
                try:
                    frame = await stream.read_frame(wire.MAX_REQUEST_BYTES, timeout=120.0)
                except (BridgeError, TimeoutError):
                    return  # the peer closed, reset, or went idle: all normal ends of a stream
                try:
                    request = wire.decode_request(frame)
                except Invalid as exc:
                    self._stats.bad_requests += 1
                    log.debug("bad_request", peer=peer, reason=exc.reason)
                    await writer.send(wire.encode_error(exc.reason), timeout=5.0)
                    await writer.drain(timeout=5.0)
                    return
                self._stats.requests_served += 1
                if isinstance(request, HaveRequest):
                    await writer.send(await self._have(request), timeout=timeout)
                else:
                    await self._serve_items(writer, request.kind, request.ids)
                await writer.drain(timeout=timeout)
        finally:
            writer.close()
            self._streams[peer] -= 1
            if not self._streams[peer]:
                del self._streams[peer]

    async def _serve_items(self, writer: FrameWriter, kind: str, ids: tuple[str, ...]) -> None:
        """Answer each id in order, reading the next few items from disk while one is sent."""
        async with self._budget:
            reads: collections.deque[asyncio.Future[tuple[bytes | bytearray, int]]] = collections.deque()
            upcoming = iter(ids)

            def read_ahead(count: int) -> None:
                for content_id in itertools.islice(upcoming, count):
                    reads.append(asyncio.ensure_future(asyncio.to_thread(self._encoded, kind, content_id)))

            try:
                read_ahead(_READ_AHEAD)
                while reads:
                    frame, size = await reads.popleft()
                    read_ahead(1)
                    await writer.send_framed(frame, timeout=self._settings.request_timeout_s)
                    if size:
                        self._stats.bytes_out_by_kind[kind] += size
                        if kind == "chunk":
                            self._stats.chunks_out += 1
            finally:
                for read in reads:
                    read.cancel()

    def _encoded(self, kind: str, content_id: str) -> tuple[bytes | bytearray, int]:
        """The framed answer for one id, and the size of the content it carries (0: missing)."""
        if kind == "chunk":
            # Read from disk straight into the frame: no copy of the chunk on the way out.
            heads: list[bytes] = []

            def head(size: int) -> bytes:
                item = wire.item_head(content_id, size)
                heads.append(frame_prefix(len(item) + size) + item)
                return heads[-1]

            frame = self._store.get_behind(content_id, head)
            if frame is not None:
                return frame, len(frame) - len(heads[-1])
            data = None
        else:
            data = self._read(kind, content_id)
        item = Item(content_id, data).encode()
        return frame_prefix(len(item)) + item, len(data) if data is not None else 0

    def _read(self, kind: str, content_id: str) -> bytes | None:
        if kind == "manifest":
            manifest = self._store.get_manifest(content_id)
            return manifest.encoded if manifest is not None else None
        return self._store.get_record(content_id)

    async def _have(self, request: HaveRequest) -> bytes:
        def holdings() -> bytes | None:
            manifest = self._store.get_manifest(request.manifest_id)
            if manifest is None:
                return None
            return wire.bitfield([self._store.has(ref.cid) for ref in manifest.chunks])

        return HaveAnswer(await asyncio.to_thread(holdings)).encode()


class _Drop(Exception):
    """A provider is out of this fetch; ``reason`` says why. ``ban``: for good (it served bad
    data); otherwise it may rejoin after a backoff (unreachable, reset, timed out)."""

    def __init__(self, reason: str, ban: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.ban = ban


async def _honest_or_drop(settling: asyncio.Future[bool] | None) -> None:
    """Wait for a batch's chunks to settle; a chunk that failed its hash drops (bans) the provider."""
    if settling is not None and not await settling:
        raise _Drop("served a chunk whose hash does not match", ban=True)


class _FetchRun:
    """The state of one fetch: which chunks are pending, who has what, who is fetching what."""

    def __init__(self, exchange: Exchange, manifest: Manifest, progress: FetchProgress, fan_out: FanOut) -> None:
        self.exchange = exchange
        self.manifest = manifest
        self.progress = progress
        self.fan_out = fan_out
        self.focus: str | None = None  # the provider a narrow fetch draws from
        self.asked = 0  # bytes requested and not yet answered
        self.delivered: Counter[str] = Counter()  # chunk bytes each provider sent us in this fetch
        self.sizes = {ref.cid: ref.size for ref in manifest.chunks}
        self.index = {ref.cid: i for i, ref in reversed(list(enumerate(manifest.chunks)))}
        self.pending: set[str] = set()
        self.inflight: set[str] = set()
        # The per-peer maps below hold the fetch's providers only, for its lifetime: peers from
        # ``_candidates``, which Availability caps (MAX_ANNOUNCERS), with a chunk set only for
        # partial holders we are connected to.
        self.has: dict[str, set[str] | None] = {}  # peer -> chunks it has; None: all of them
        self.workers: dict[str, int] = Counter()
        self.polling: set[str] = set()
        self.polled: dict[str, float] = {}
        self.dropped: set[str] = set()
        self.retry_at: dict[str, float] = {}  # dropped, not banned: when it may rejoin
        self.strikes: Counter[str] = Counter()
        self.changed = asyncio.Event()
        self.last_progress = time.monotonic()
        me = exchange.self_peer
        self.my_weight = {cid: rendezvous_weight(cid, me) for cid in self.sizes}
        # Which provider a narrow fetch prefers: seeds first, then ones we are connected to, then
        # the one that has sent us the most in this fetch (the one it measured, when a comparison
        # chose narrow), then by a weight of our own, so fetchers of one artifact that know
        # nothing yet pick different seeds.
        self.provider_key = f"{manifest.artifact_id}:{me}"
        # Our own preference order, computed once: picking a batch walks it instead of sorting.
        self.order = sorted(self.sizes, key=lambda cid: -self.my_weight[cid])

    def mine(self, cid: str, fetchers: list[str]) -> bool:
        """Whether we are the fetcher that should pull ``cid`` from a seed first (rendezvous)."""
        mine = self.my_weight[cid]
        return all(rendezvous_weight(cid, peer) < mine for peer in fetchers)

    def _partial_holdings(self) -> list[set[str]]:
        return [h for p, h in self.has.items() if h is not None and p not in self.dropped]

    def seed_only_left(self) -> bool:
        """Whether a live seed still has chunks we lack that no fetcher we know of holds.

        While it does, we take from the seed (rarest first) and copy nothing from partial
        holders: every chunk then leaves the seed once before fetchers trade copies, so the
        swarm can lose its seed early and still hold the whole artifact between its fetchers.
        Holdings only grow, so a stale ``have`` view errs on the side of waiting."""
        if not any(h is None and p not in self.dropped for p, h in self.has.items()):
            return False
        partial = self._partial_holdings()
        return any(all(cid not in held for held in partial) for cid in self.pending)

    def available(self, peer: str) -> bool:
        """Whether ``peer`` should be asked for a batch now: it has chunks nobody is fetching,
        and the fetch's width lets it in."""
        return self.admits(peer) and self._has_work(peer)

    def _has_work(self, peer: str) -> bool:
        held = self.has.get(peer)
        free = self.pending - self.inflight
        if held is None:
            return bool(free)
        return not free.isdisjoint(held) and not self.seed_only_left()

    def admits(self, peer: str) -> bool:
        """Wide: every provider. Narrow: one, kept while it has work for us."""
        if self.fan_out.width == WIDE:
            return True
        if self.focus is not None and self.focus not in self.dropped and self._has_work(self.focus):
            return peer == self.focus
        ready = [p for p in self.has if p not in self.dropped and self._has_work(p)]
        if not ready:
            return False
        # A provider we hold a connection to first: one learnt from the DHT may have left, and a
        # narrow fetch that picked it would wait out a dial before moving on.
        connected = set(self.exchange.bridge.connected_peers())
        self.focus = max(
            ready,
            key=lambda p: (
                self.has[p] is None,
                p in connected,
                self.delivered[p],
                rendezvous_weight(self.provider_key, p),
            ),
        )
        return peer == self.focus

    def pick(self, peer: str) -> list[str]:
        """The next batch for ``peer``: chunks it has that nobody is fetching, best first, at
        most ``batch_bytes`` and at most an even share of what is left among the fetch's streams."""
        held = self.has.get(peer)
        if held is not None and self.seed_only_left():
            return []
        if not self.admits(peer):
            return []  # narrowed: this worker ends once its batch is in
        pending, inflight = self.pending, self.inflight
        unclaimed = [c for c in self.order if c in pending and c not in inflight]
        free = unclaimed if held is None else [c for c in unclaimed if c in held]
        if not free:
            return []
        partial_peers = [p for p, h in self.has.items() if h is not None and p not in self.dropped]
        if held is None and partial_peers:
            # From a seed: first what we are meant to spread, then what no fetcher holds yet
            # (a stable sort keeps our preference order within each rank).
            def seed_rank(cid: str) -> tuple[int, int]:
                spread = sum(1 for p in partial_peers if cid in (self.has[p] or ()))
                return (spread, 0 if self.mine(cid, partial_peers) else 1)

            free.sort(key=seed_rank)
        # At most a fair share of what is left per stream: a stream that takes a whole batch
        # near the end keeps the fetch waiting on its provider's link while the others idle.
        limit = self.exchange.settings.batch_bytes
        streams = sum(n for p, n in self.workers.items() if p not in self.dropped)
        if streams > 1:
            left = sum(self.sizes[c] for c in unclaimed)
            limit = min(limit, -(-left // streams))
        batch: list[str] = []
        size = 0
        for cid in free:
            if batch and size + self.sizes[cid] > limit:
                break
            batch.append(cid)
            size += self.sizes[cid]
        self.inflight.update(batch)
        self.asked += size
        return batch

    def answered(self, peer: str, size: int, data: bool) -> None:
        """One item of ``size`` bytes came back from ``peer`` (with its chunk, or "missing"), or will not."""
        self.asked -= size
        if data:
            self.delivered[peer] += size
        # With one provider there is no width to choose, and nothing to learn for the next fetch.
        if data and sum(1 for p in self.has if p not in self.dropped) > 1:
            if self.fan_out.received(time.monotonic(), size, self.asked):
                self.focus = None  # chosen afresh when next narrowed
                log.debug("fetch_fan_out", manifest=self.manifest.artifact_id, **self.fan_out.view())
                self.changed.set()

    def settle(self, cid: str, stored: bool) -> None:
        self.inflight.discard(cid)
        if stored:
            self.pending.discard(cid)
            self.progress.have_chunks += 1
            self.progress.have_bytes += self.sizes[cid]
            self.last_progress = time.monotonic()
        self.changed.set()


class Exchange:
    """The chunk protocol on libp2p: a server for our store and fetches from the swarm."""

    def __init__(
        self,
        bridge: Libp2pBridge,
        store: ContentStore,
        availability: Availability,
        settings: ExchangeSettings = ExchangeSettings(),
        journal: FetchJournal | None = None,
    ) -> None:
        self.bridge = bridge
        self.store = store
        self.availability = availability
        self.settings = settings
        self.self_peer = bridge.peer_id
        self.stats = ExchangeStats()
        self.server = ChunkServer(store, settings, self.stats)
        # One per artifact this peer's own loop needs while it runs; finished ones are kept for
        # the status page up to ``_prune_finished``'s limit.
        self.fetches: dict[str, FetchProgress] = {}
        self._tasks: dict[str, asyncio.Task[Manifest]] = {}
        self._journal = journal
        self._cancelled: set[str] = set()  # an entry lives as long as its fetch's task
        # Where an adaptive fetch starts: the last comparison's answer, the providers it was
        # measured on, and when the fetch that held it ended.
        self._fan_out_learnt: tuple[Verdict, frozenset[str], float] | None = None

    async def start(self) -> None:
        await self.bridge.set_stream_handler(wire.PROTOCOL_ID, self.server.handle)

    # ---- public API ------------------------------------------------------------------

    async def fetch(self, manifest_id: str, hints: tuple[str, ...] = ()) -> Manifest:
        """Fetch an artifact into the store (joining a fetch already running for it)."""
        return await asyncio.shield(self.start_fetch(manifest_id, hints))

    def start_fetch(self, manifest_id: str, hints: tuple[str, ...] = ()) -> asyncio.Task[Manifest]:
        """Start (or join) a fetch owned by the exchange; ``close()`` cancels it."""
        task = self._tasks.get(manifest_id)
        if task is None or task.done():
            self._cancelled.discard(manifest_id)
            task = asyncio.create_task(self._fetch(manifest_id, hints), name=f"fetch-{manifest_id[:12]}")
            self._tasks[manifest_id] = task
            task.add_done_callback(functools.partial(self._forget_task, manifest_id))
        return task

    def resume(self) -> list[str]:
        """Restart the fetches that were in flight when this peer last stopped."""
        pending = self._journal.pending() if self._journal else []
        for manifest_id in pending:
            self.start_fetch(manifest_id)
        return pending

    def cancel(self, manifest_id: str) -> bool:
        """Cancel an in-flight fetch on request; chunks already stored are kept."""
        task = self._tasks.get(manifest_id)
        if task is None or task.done():
            return False
        self._cancelled.add(manifest_id)
        task.cancel()
        return True

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    def _forget_task(self, manifest_id: str, task: asyncio.Task[Manifest]) -> None:
        if self._tasks.get(manifest_id) is task:
            del self._tasks[manifest_id]
            self._cancelled.discard(manifest_id)
        mark_retrieved(task)  # callers saw its error

    # ---- one fetch -------------------------------------------------------------------

    async def _fetch(self, manifest_id: str, hints: tuple[str, ...]) -> Manifest:
        progress = FetchProgress(manifest_id)
        self.fetches[manifest_id] = progress
        self._prune_finished()
        self.availability.set_fetching(manifest_id, True)
        if self._journal is not None:
            await asyncio.to_thread(self._journal.add, manifest_id)
        try:
            manifest, server = await self._manifest(manifest_id, hints, progress)
            if server is not None:
                hints = (*hints, server)  # it has the manifest: most likely the chunks too
            full, partial = self._candidates(manifest_id, hints)
            run = _FetchRun(self, manifest, progress, self._fan_out(frozenset([*full, *partial])))
            progress.fan_out = run.fan_out
            progress.total_chunks = len(run.sizes)
            progress.total_bytes = sum(run.sizes.values())
            run.pending = set(await asyncio.to_thread(self.store.missing, list(run.sizes)))
            progress.have_chunks = progress.total_chunks - len(run.pending)
            progress.have_bytes = progress.total_bytes - sum(run.sizes[c] for c in run.pending)
            progress.state = FetchState.FETCHING
            if run.pending:
                await self._run(run, hints)
            progress.state = FetchState.DONE
            verdict = run.fan_out.standing()
            providers = frozenset(p for p in run.has if p not in run.dropped)
            if verdict is not None and providers:
                self._fan_out_learnt = (verdict, providers, time.monotonic())
            self.availability.add_held(manifest_id)
            await self._settle_journal(manifest_id)
            log.info("fetch_done", manifest=manifest_id, fetched_bytes=progress.fetched_bytes,
                     seconds=round(time.monotonic() - progress.started, 2))
            return manifest
        except asyncio.CancelledError:
            # Cancelled by an operator: forget it. Cancelled by shutdown: resume on restart.
            progress.state = FetchState.CANCELLED
            if manifest_id in self._cancelled:
                await asyncio.shield(self._settle_journal(manifest_id))
            raise
        except FetchFailed as exc:
            progress.state, progress.error = FetchState.FAILED, str(exc)
            log.warning("fetch_failed", manifest=manifest_id, error=str(exc))
            await self._settle_journal(manifest_id)
            raise
        except Exception as exc:
            # A bug or a local fault (disk full): visible as failed, kept in the journal to resume.
            progress.state, progress.error = FetchState.FAILED, f"{type(exc).__name__}: {str(exc)[:200]}"
            log.exception("fetch_crashed", manifest=manifest_id)
            raise
        finally:
            progress.finished = time.monotonic()
            self.availability.set_fetching(manifest_id, False)

    def _fan_out(self, providers: frozenset[str]) -> FanOut:
        """How a fetch from ``providers`` (those known as it starts) chooses its width."""
        mode = self.settings.fan_out
        if mode != "adaptive":
            return FanOut(start=WIDE if mode == "wide" else NARROW, adaptive=False)
        learnt = self._fan_out_learnt
        now = time.monotonic()
        # Fetches too short to compare widths (most pseudo-gradients) follow the last answer
        # only while it is fresh: conditions change, and only a long fetch would notice.
        if learnt is None or now - learnt[2] > FanOutSettings().retry_max_s:
            return FanOut(load=self._receiver_load)
        verdict, measured_on, _ = learnt
        if measured_on == providers and now < verdict.until:
            # The same providers, their answer not yet due for a check (a head's weights, then
            # its momentum): a comparison now would only cost the losing width's windows again.
            return FanOut(verdict=verdict, load=self._receiver_load)
        return FanOut(start=verdict.width, load=self._receiver_load)

    def _receiver_load(self) -> ReceiverLoad:
        """This process's load as a fetch's fan-out reads it: the cores it wanted, and what its
        TCP reads found waiting."""
        reads = self.bridge.tcp_reads()
        return ReceiverLoad(process_demand_s(), reads.bytes, reads.waiting_bytes)

    def _prune_finished(self, keep: int = 64) -> None:
        """Forget the oldest finished fetches beyond ``keep``: a long-running peer fetches every head."""
        finished = [m for m, p in self.fetches.items() if p.state.ended]
        for manifest_id in finished[: max(len(finished) - keep, 0)]:
            del self.fetches[manifest_id]

    async def _settle_journal(self, manifest_id: str) -> None:
        if self._journal is not None:
            await asyncio.to_thread(self._journal.remove, manifest_id)

    def _candidates(self, manifest_id: str, hints: tuple[str, ...]) -> tuple[list[str], list[str]]:
        providers = self.availability.providers(manifest_id)
        connected = set(self.bridge.connected_peers())
        full = [p for p in (*providers.full, *hints) if p != self.self_peer]
        partial = [p for p in providers.partial if p != self.self_peer and p in connected]
        return list(dict.fromkeys(full)), partial

    async def _manifest(
        self, manifest_id: str, hints: tuple[str, ...], progress: FetchProgress
    ) -> tuple[Manifest, str | None]:
        """The artifact's manifest, and the peer that served it (None: it was here already)."""
        manifest = await asyncio.to_thread(self.store.get_manifest, manifest_id)
        if manifest is not None:
            return manifest, None
        deadline = time.monotonic() + self.settings.stall_timeout_s
        tried: set[str] = set()
        while time.monotonic() < deadline:
            full, partial = self._candidates(manifest_id, hints)
            untried = [p for p in (*full, *partial) if p not in tried]
            if not untried:
                # No announced holder left to ask: a peer back from a freeze or a partition has
                # not heard the announcements yet. Each connected peer is asked once.
                untried = [p for p in self.bridge.connected_peers() if p not in tried and p != self.self_peer]
            for peer in untried:
                tried.add(peer)
                try:
                    data = await self._get_one(peer, "manifest", manifest_id)
                    if data is None:
                        continue
                    await asyncio.to_thread(self.store.put_manifest, data, manifest_id)
                    return parse_manifest(data), peer
                except (Invalid, _Drop) as exc:
                    reason = exc.reason
                    progress.dropped[peer] = f"manifest: {reason}"
                    if reason == "bad_hash":
                        self.stats.count_peer(self.stats.rejected_chunks_by_peer, peer, "rejected_chunks_by_peer")
            await asyncio.sleep(self.settings.have_poll_s)
        raise FetchFailed(f"no provider served manifest {manifest_id} within {self.settings.stall_timeout_s:.0f} s")

    async def _get_one(self, peer: str, kind: str, content_id: str) -> bytes | None:
        stream = await self._open(peer)
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                await stream.write_frame(GetRequest(kind, (content_id,)).encode(), self.settings.request_timeout_s)
                item = wire.decode_item(await stream.read_frame(wire.MAX_ITEM_BYTES, self.settings.request_timeout_s), content_id)
        except (BridgeError, TimeoutError) as exc:
            raise _Drop(f"request failed: {exc}") from None
        finally:
            await stream.close()
        if item.data is None:
            return None
        self.stats.bytes_in_by_kind[kind] += len(item.data)
        if not matches(content_id, item.data):
            raise Invalid("bad_hash", "content does not hash to its id")
        return bytes(item.data)  # a manifest or record: small, and kept by the caller

    async def _open(self, peer: str) -> FramedStream:
        try:
            return await self.bridge.open_stream(peer, wire.PROTOCOL_ID, self.settings.request_timeout_s)
        except (BridgeError, TimeoutError) as exc:
            raise _Drop(f"cannot open stream: {str(exc)[:120]}") from None

    async def _run(self, run: _FetchRun, hints: tuple[str, ...]) -> None:
        try:
            await self._run_group(run, hints)
        except ExceptionGroup as group:
            # The task group wraps what its body and its tasks raise; callers expect the error
            # itself: a FetchFailed, or a local fault such as a full disk.
            error: BaseException = group
            while isinstance(error, BaseExceptionGroup):
                error = error.exceptions[0]
            raise error from None

    async def _run_group(self, run: _FetchRun, hints: tuple[str, ...]) -> None:
        async with asyncio.TaskGroup() as tasks:
            while run.pending:
                self._readmit(run)
                full, partial = self._candidates(run.manifest.artifact_id, hints)
                for peer in full:
                    if peer not in run.has and peer not in run.dropped:
                        run.has[peer] = None
                now = time.monotonic()
                # Keep polling a peer we track chunk by chunk even once it announces the whole
                # artifact (a fetcher that finished): its last bitfield is stale.
                tracked = [p for p in full if run.has.get(p, None) is not None]
                for peer in dict.fromkeys([*partial, *tracked]):
                    if peer in run.dropped or run.has.get(peer, set()) is None:
                        continue
                    if peer not in run.polling and now - run.polled.get(peer, 0.0) >= self.settings.have_poll_s:
                        run.polling.add(peer)
                        tasks.create_task(self._poll_have(run, peer))
                for peer in list(run.has):
                    if peer in run.dropped:
                        continue
                    run.progress.providers.add(peer)
                    while run.workers[peer] < self.settings.streams_per_provider and run.available(peer):
                        run.workers[peer] += 1
                        tasks.create_task(self._worker(run, peer))
                stalled = time.monotonic() - run.last_progress
                if stalled > self.settings.stall_timeout_s:
                    raise FetchFailed(
                        f"no progress for {stalled:.0f} s with {len(run.pending)} chunks missing"
                        f" (providers dropped: {run.progress.dropped or 'none'})"
                    )
                run.changed.clear()
                try:
                    await asyncio.wait_for(run.changed.wait(), self.settings.have_poll_s)
                except TimeoutError:
                    pass

    async def _poll_have(self, run: _FetchRun, peer: str) -> None:
        try:
            stream = await self._open(peer)
        except _Drop:
            run.polling.discard(peer)
            return
        try:
            await stream.write_frame(HaveRequest(run.manifest.artifact_id).encode(), self.settings.request_timeout_s)
            answer = wire.decode_have(
                await stream.read_frame(wire.MAX_ITEM_BYTES, self.settings.request_timeout_s),
                len(run.manifest.chunks),
            )
        except (BridgeError, TimeoutError, Invalid):
            return
        finally:
            run.polling.discard(peer)
            run.polled[peer] = time.monotonic()
            await stream.close()
        if answer.bits is not None and (peer not in run.has or run.has[peer] is not None):
            run.has[peer] = {
                ref.cid for i, ref in enumerate(run.manifest.chunks) if wire.bit_set(answer.bits, i)
            }
            run.changed.set()

    async def _worker(self, run: _FetchRun, peer: str) -> None:
        stream: FramedStream | None = None
        # A batch's chunks are verified and written while the next batch is on the wire: the
        # stream does not sit idle waiting for the disk. At most two batches are held at once.
        previous: asyncio.Future[bool] | None = None
        settling: asyncio.Future[bool] | None = None
        try:
            stream = await self._open(peer)
            while batch := run.pick(peer):
                storing = await self._request(run, stream, peer, batch)
                previous, settling = settling, asyncio.ensure_future(self._settle_stored(run, peer, storing))
                # A failed write (a full disk) fails the fetch through whichever await sees it first.
                settling.add_done_callback(mark_retrieved)
                await _honest_or_drop(previous)
            await _honest_or_drop(settling)
        except _Drop as exc:
            self._drop(run, peer, exc.reason, exc.ban)
        finally:
            unsettled = [task for task in (previous, settling) if task is not None and not task.done()]
            if unsettled:
                await asyncio.wait(unsettled)
            run.workers[peer] -= 1
            if stream is not None:
                await stream.close()

    async def _request(
        self, run: _FetchRun, stream: FramedStream, peer: str, batch: list[str]
    ) -> list[tuple[str, asyncio.Future[str]]]:
        """Ask ``peer`` for ``batch``; return the chunks being verified and written (to settle)."""
        timeout = self.settings.request_timeout_s
        remaining = list(batch)
        # Chunks are verified and written in worker threads while the next ones are read.
        storing: list[tuple[str, asyncio.Future[str]]] = []
        try:
            async with asyncio.timeout(timeout):
                await stream.write_frame(GetRequest("chunk", tuple(batch)).encode(), timeout)
                async with contextlib.aclosing(stream.read_frames(len(batch), wire.MAX_ITEM_BYTES, timeout)) as frames:
                    for cid in batch:
                        item = wire.decode_item(await anext(frames), cid)
                        remaining.remove(cid)
                        run.answered(peer, run.sizes[cid], item.data is not None)
                        if item.data is None:
                            held = run.has.get(peer)
                            if held is not None:
                                held.discard(cid)
                            else:
                                run.has[peer] = set(run.sizes) - {cid}
                            run.settle(cid, stored=False)
                            continue
                        self.stats.bytes_in_by_kind["chunk"] += len(item.data)
                        self.stats.chunks_in += 1
                        run.progress.fetched_bytes += len(item.data)
                        writing = asyncio.ensure_future(asyncio.to_thread(self.store.put, item.data, cid, drop_cache=True))
                        # A full disk fails every write in flight, and the fetch stops at the first
                        # one it awaits: the others are retrieved here, so asyncio does not log them.
                        writing.add_done_callback(mark_retrieved)
                        storing.append((cid, writing))
        except TimeoutError:
            await self._settle_stored(run, peer, storing)
            self.stats.count_peer(self.stats.timeouts_by_peer, peer, "timeouts_by_peer")
            for cid in remaining:
                run.settle(cid, stored=False)
            # A frozen peer stays "connected" for a minute; cut it off so others are used.
            try:
                await self.bridge.disconnect(peer)
            except (BridgeError, TimeoutError):
                pass
            raise _Drop(f"no answer within {timeout:.0f} s") from None
        except (BridgeError, Invalid) as exc:
            await self._settle_stored(run, peer, storing)
            for cid in remaining:
                run.settle(cid, stored=False)
            # A malformed or out-of-order answer is a broken peer; a refusal ("busy") is not.
            ban = isinstance(exc, Invalid) and exc.reason != "refused"
            raise _Drop(f"{type(exc).__name__}: {str(exc)[:120]}", ban) from None
        finally:
            for cid in remaining:
                run.inflight.discard(cid)
                run.answered(peer, run.sizes[cid], False)
        return storing

    async def _settle_stored(self, run: _FetchRun, peer: str, storing: list[tuple[str, asyncio.Future[str]]]) -> bool:
        """Wait for the chunks being written; False if any failed its hash (the peer lied)."""
        honest = True
        for cid, writing in storing:
            try:
                await asyncio.shield(writing)
            except Invalid:
                honest = False
                self.stats.count_peer(self.stats.rejected_chunks_by_peer, peer, "rejected_chunks_by_peer")
                run.settle(cid, stored=False)
                log.warning("corrupt_chunk", peer=peer, chunk=cid, manifest=run.manifest.artifact_id)
                continue
            self.stats.chunks_verified += 1
            run.settle(cid, stored=True)
        storing.clear()
        return honest

    def _drop(self, run: _FetchRun, peer: str, reason: str, ban: bool = False) -> None:
        if peer not in run.dropped:
            run.dropped.add(peer)
            run.progress.dropped[peer] = reason
            if not ban:
                # Unreachable for now (not dialled yet, reset, frozen): it may rejoin later, after
                # a backoff that doubles per strike, if it is still a candidate then.
                run.strikes[peer] += 1
                backoff = self.settings.request_timeout_s * 2 ** (run.strikes[peer] - 1)
                run.retry_at[peer] = time.monotonic() + min(backoff, self.settings.stall_timeout_s)
            log.info("provider_dropped", peer=peer, manifest=run.manifest.artifact_id, reason=reason, ban=ban)
        if ban:
            run.retry_at.pop(peer, None)
        run.changed.set()

    def _readmit(self, run: _FetchRun) -> None:
        now = time.monotonic()
        for peer, at in list(run.retry_at.items()):
            if now >= at:
                del run.retry_at[peer]
                run.dropped.discard(peer)
                run.has.pop(peer, None)  # re-learnt from the candidates: seed or partial holder

    async def fetch_record(self, record_id: str, providers: tuple[str, ...] = ()) -> bytes | None:
        """A small record by id from any connected peer that has it, hash-verified; None if nobody does."""
        peers = list(dict.fromkeys((*providers, *self.bridge.connected_peers())))
        for peer in peers:
            try:
                data = await self._get_one(peer, "record", record_id)
            except (Invalid, _Drop):
                continue
            if data is not None:
                await asyncio.to_thread(self.store.put_record, data, record_id)
                return data
        return None

    async def fetch_blobs(self, cids: list[str], providers: list[str]) -> list[str]:
        """Fetch loose chunks (e.g. microshards) by id from ``providers``; return the ids still missing."""
        missing = await asyncio.to_thread(self.store.missing, cids)
        for peer in providers:
            if not missing:
                break
            try:
                stream = await self._open(peer)
            except _Drop:
                continue
            try:
                for start in range(0, len(missing), wire.MAX_IDS_PER_REQUEST):
                    batch = missing[start : start + wire.MAX_IDS_PER_REQUEST]
                    await stream.write_frame(GetRequest("chunk", tuple(batch)).encode(), self.settings.request_timeout_s)
                    for cid in batch:
                        frame = await stream.read_frame(wire.MAX_ITEM_BYTES, self.settings.request_timeout_s)
                        item = wire.decode_item(frame, cid)
                        if item.data is None:
                            continue
                        self.stats.bytes_in_by_kind["chunk"] += len(item.data)
                        self.stats.chunks_in += 1
                        await asyncio.to_thread(self.store.put, item.data, cid, drop_cache=True)
                        self.stats.chunks_verified += 1
            except Invalid as exc:
                self.stats.count_peer(self.stats.rejected_chunks_by_peer, peer, "rejected_chunks_by_peer")
                log.warning("blob_rejected", peer=peer, reason=exc.reason)
            except (BridgeError, TimeoutError) as exc:
                log.info("blob_fetch_failed", peer=peer, error=str(exc)[:120])
            finally:
                await stream.close()
            missing = await asyncio.to_thread(self.store.missing, missing)
        return missing

    def view(self) -> dict[str, Any]:
        return {**self.stats.view(), "fetches": [p.view() for p in self.fetches.values()]}
