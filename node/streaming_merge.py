"""The deterministic merge streamed from the store, a slice at a time: the same screening, norms and
weights and momentum manifest ids as ``node.merge.merge`` followed by ``store_artifact``."""

from __future__ import annotations

import math
import os
import threading
from bisect import bisect_right
from collections import OrderedDict, deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from node.artifacts import MissingContent, decode_state_dict, load_artifact, store_artifact, tensor_sources
from node.merge import _LEAF, UpdateInput, _median_of, aggregate, merge, outlier_bound, outer_step
from node.merge import _SLICE as NORM_PART
from node.store import ContentStore
from protocol.chunking import Chunking, FixedChunking, split
from protocol.codecs import FP32, Int8Codec
from protocol.errors import Invalid
from protocol.heads import AggregationRule
from protocol.manifest import ALIGN, ChunkRef, Manifest, TensorEntry, parse_manifest

Tensors = dict[str, torch.Tensor]

SLICE_ELEMENTS = 1 << 18  # per slice of a large tensor: 1 MB of fp32 per update, a multiple of int8's 256
_CACHED_CHUNKS = 4  # per artifact: the chunks a slice shares with its neighbours, read once
_WRITE_BATCH = 4 << 20  # bytes of finished output chunks stored together (one fsync per folder)
_STORING = 2  # batches being stored at once: two fsyncs in flight store faster than one after the other


class StoredUpdate(NamedTuple):
    """One update to merge: its record id, its sample count and its artifact's manifest id in the store."""

    update_id: str
    samples: int
    artifact: str


@dataclass(frozen=True)
class StoredMerge:
    """A merge whose weights and momentum went straight into the store, by manifest id."""

    weights_id: str
    momentum_id: str
    included: tuple[str, ...]
    excluded: tuple[tuple[str, str], ...]
    norms: tuple[tuple[str, float], ...] = ()

    @property
    def median_norm(self) -> float | None:
        """The median norm of the included updates, as ``MergeResult.median_norm``."""
        return _median_of([norm for _, norm in self.norms]) if self.norms else None


def merge_slice(
    weights: Mapping[str, torch.Tensor],
    momentum: Mapping[str, torch.Tensor] | None,
    updates: Sequence[UpdateInput],
    rule: AggregationRule,
) -> tuple[Tensors, Tensors]:
    """Aggregate screened updates' slices and step the parent's slices: ``merge`` after screening.

    Every op of mean, trimmed_mean and median and of the outer step is element-wise, so a slice
    gives the bits of the same elements of the whole merge. Not for centered_clip, whose clipping
    needs whole-update distances. ``updates`` must be in sorted-id order, as ``merge`` visits them.
    """
    with torch.no_grad():
        gradient = aggregate(updates, list(weights), rule)
        return outer_step(weights, momentum, gradient, rule)


class _StoredBytes:
    """Byte ranges of one stored artifact, read chunk by chunk and verified on the way in.

    Slices do not fall on chunk boundaries, so the chunks a range only partly covers are kept
    in a small cache for the neighbouring slices (which threads may read at the same time).
    """

    def __init__(self, store: ContentStore, manifest: Manifest) -> None:
        self.store = store
        self.manifest = manifest
        self.starts = manifest.chunk_offsets()
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.verified: set[int] = set()

    def read_into(self, start: int, out: np.ndarray) -> None:
        """Fill ``out`` (uint8, contiguous) with the stream's bytes from ``start``; MissingContent if any chunk fails."""
        stop = start + out.size
        index = max(bisect_right(self.starts, start) - 1, 0)
        while index < len(self.starts) and self.starts[index] < stop:
            first = self.starts[index]
            last = first + self.manifest.chunks[index].size
            low, high = max(first, start), min(last, stop)
            if (low, high) == (first, last):
                self._read_chunk(index, out[low - start : high - start])
            else:
                out[low - start : high - start] = self._cached_chunk(index)[low - first : high - first]
            index += 1

    def verify_unread(self) -> None:
        """Read and verify the chunks no range has touched yet, so a damaged artifact is found whole."""
        scratch = np.empty(max((c.size for c in self.manifest.chunks), default=0), dtype=np.uint8)
        for index, chunk in enumerate(self.manifest.chunks):
            if index not in self.verified:
                self._read_chunk(index, scratch[: chunk.size])

    def drop_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def _cached_chunk(self, index: int) -> np.ndarray:
        with self._lock:
            chunk = self._cache.get(index)
            if chunk is not None:
                self._cache.move_to_end(index)
                return chunk
        chunk = np.empty(self.manifest.chunks[index].size, dtype=np.uint8)
        self._read_chunk(index, chunk)
        with self._lock:
            self._cache[index] = chunk
            while len(self._cache) > _CACHED_CHUNKS:
                self._cache.popitem(last=False)
        return chunk

    def _read_chunk(self, index: int, out: np.ndarray) -> None:
        cid = self.manifest.chunks[index].cid
        if not self.store.read_into(cid, out):
            raise MissingContent([cid])
        self.verified.add(index)


def _decode_range(source: _StoredBytes, entry: TensorEntry, start: int, stop: int) -> torch.Tensor:
    """Elements ``[start, stop)`` of a tensor, decoded exactly as ``decode_state_dict`` decodes them.

    The whole tensor keeps its shape; a part of one is flat. An int8 range is read as the whole
    blocks that cover it (scales, then values) and decoded by the codec itself, so every element
    meets the same arithmetic as in a full decode.
    """
    codec = entry.codec
    if isinstance(codec, Int8Codec):
        first_block, end_block = start // codec.block, -(-stop // codec.block)
        first, last = first_block * codec.block, min(end_block * codec.block, entry.numel)
        scale_bytes = (end_block - first_block) * 4
        data = np.empty(scale_bytes + last - first, dtype=np.uint8)
        source.read_into(entry.offset + first_block * 4, data[:scale_bytes])
        source.read_into(entry.offset + codec.blocks(entry.numel) * 4 + first, data[scale_bytes:])
    else:
        width = codec.encoded_size(1, entry.dtype)
        first, last = start, stop
        data = np.empty((stop - start) * width, dtype=np.uint8)
        source.read_into(entry.offset + start * width, data)
    whole = (first, last) == (0, entry.numel)
    shape = entry.shape if whole else (last - first,)
    part = TensorEntry(entry.name, shape, entry.dtype, codec, 0, data.size)
    decoded = decode_state_dict(Manifest((part,), FixedChunking(), (), data.size), data)[entry.name]
    return decoded if whole or (first, last) == (start, stop) else decoded[start - first : stop - first]


def _ranges(numel: int, size: int) -> Iterator[tuple[int, int]]:
    if numel <= size:
        yield 0, numel
        return
    for start in range(0, numel, size):
        yield start, min(start + size, numel)


def _stored(store: ContentStore, manifest_id: str | None) -> _StoredBytes | None:
    if manifest_id is None:
        return None
    manifest = store.get_manifest(manifest_id)
    return None if manifest is None else _StoredBytes(store, manifest)


def part_square_sum(part: torch.Tensor) -> float:
    """``node.merge._square_sum`` of at most ``NORM_PART`` elements, the same float from numpy.

    The same float64 squares, halvings and ``math.fsum`` (IEEE adds and multiplies round alike in
    numpy and torch), but on the calling thread: torch would fan each op of a million elements
    out to its own threads, which fight the merge's pool for the cores.
    """
    values = part.reshape(-1)
    wide = values.numpy() if values.dtype in (torch.float16, torch.float32, torch.float64) else values.double().numpy()
    squares = wide.astype(np.float64)
    np.multiply(squares, squares, out=squares)
    while squares.size > _LEAF:
        half = squares.size // 2
        head = squares[:half]
        np.add(head, squares[half : 2 * half], out=head)
        if squares.size % 2:
            head[:1] += squares[-1:]
        squares = head
    return math.fsum(squares.tolist())


def _norm_from_store(source: _StoredBytes) -> float:
    """The update's L2 norm, bit for bit ``node.merge._norm`` of its full decode.

    ``_square_sum`` sums each tensor's parts of ``NORM_PART`` elements on their own and adds the
    parts' sums exactly, so decoding one part at a time and adding their sums the same way
    gives the same float; then every chunk not read on the way is verified, as a full decode would.
    """
    tensor_sums = []
    for entry in source.manifest.tensors:
        parts = [part_square_sum(_decode_range(source, entry, a, b)) for a, b in _ranges(entry.numel, NORM_PART)]
        tensor_sums.append(math.fsum(parts))
    source.verify_unread()
    return math.sqrt(math.fsum(tensor_sums))


def _screen(
    store: ContentStore,
    reference: Manifest,
    updates: Sequence[tuple[str, int, str]],
    outlier_factor: float,
    reference_norm: float | None,
    pool: ThreadPoolExecutor,
) -> tuple[list[tuple[StoredUpdate, _StoredBytes]], list[tuple[str, str]], dict[str, float]]:
    """``node.merge._screen`` over stored updates, their norms computed in parallel, one update per task."""
    shapes = [(e.name, e.shape) for e in reference.tensors]
    ordered = sorted((StoredUpdate(*u) for u in updates), key=lambda u: u.update_id)
    sources = [_stored(store, u.artifact) for u in ordered]

    def measure(source: _StoredBytes | None) -> str | float:
        if source is None:
            return "undecodable"
        try:
            if [(e.name, e.shape) for e in source.manifest.tensors] != shapes:
                source.verify_unread()
                return "wrong_shapes"
            return _norm_from_store(source)
        except (MissingContent, Invalid, ValueError):
            return "undecodable"
        finally:
            if source is not None:
                source.drop_cache()  # the slice pass reads other ranges; a pass's cache is its own

    kept: list[tuple[StoredUpdate, _StoredBytes]] = []
    excluded: list[tuple[str, str]] = []
    norms: dict[str, float] = {}
    for update, source, outcome in zip(ordered, sources, pool.map(measure, sources)):
        if isinstance(outcome, str):
            excluded.append((update.update_id, outcome))
        elif not math.isfinite(outcome):
            excluded.append((update.update_id, "non_finite"))
        else:
            assert source is not None
            norms[update.update_id] = outcome
            kept.append((update, source))
    bound = outlier_bound([norms[u.update_id] for u, _ in kept], outlier_factor, reference_norm)
    if bound is not None:
        excluded += [(u.update_id, "norm_outlier") for u, _ in kept if norms[u.update_id] > bound]
        kept = [(u, s) for u, s in kept if norms[u.update_id] <= bound]
    return kept, sorted(excluded), {u.update_id: norms[u.update_id] for u, _ in kept}


class _ArtifactWriter:
    """Writes an artifact's stream in order. Under fixed chunking it fills one buffer while
    ``io`` stores the chunks of those filled before; other chunkings cut the whole stream at
    the end, as ``build_artifact`` does."""

    def __init__(
        self, store: ContentStore, entries: Sequence[TensorEntry], chunking: Chunking, io: ThreadPoolExecutor
    ) -> None:
        self.store = store
        self.entries = tuple(entries)
        self.chunking = chunking
        self.io = io
        self.size = entries[-1].offset + entries[-1].length if entries else 0
        self.fixed = isinstance(chunking, FixedChunking)
        if isinstance(chunking, FixedChunking):
            width = max(_WRITE_BATCH // chunking.size, 1) * chunking.size
            self.buffers = [np.empty(width, dtype=np.uint8) for _ in range(_STORING + 1)]
        else:
            self.buffers = [np.empty(self.size, dtype=np.uint8)]
        self.current = 0
        self.filled = 0
        self.position = 0
        self.stores: deque[Future[list[ChunkRef]]] = deque()
        self.refs: list[ChunkRef] = []

    def write(self, data: np.ndarray) -> None:
        while data.size:
            buffer = self.buffers[self.current]
            take = min(buffer.size - self.filled, data.size)
            buffer[self.filled : self.filled + take] = data[:take]
            self.filled += take
            self.position += take
            data = data[take:]
            if self.fixed and self.filled == buffer.size:
                self._store(buffer)
                self.current = (self.current + 1) % len(self.buffers)
                self.filled = 0
                while len(self.stores) >= len(self.buffers):  # the next buffer is free once stored
                    self.refs += self.stores.popleft().result()

    def pad_to(self, offset: int) -> None:
        self.write(np.zeros(offset - self.position, dtype=np.uint8))

    def finish(self) -> str:
        if self.position != self.size:
            raise AssertionError(f"wrote {self.position} of {self.size} bytes")
        self._store(self.buffers[self.current][: self.filled])
        while self.stores:
            self.refs += self.stores.popleft().result()
        manifest = Manifest(self.entries, self.chunking, tuple(self.refs), self.size)
        parse_manifest(manifest.encoded)  # as build_artifact: only what every peer accepts is stored
        return self.store.put_manifest(manifest.encoded, manifest.artifact_id)

    def _store(self, data: np.ndarray) -> None:
        def put(chunks: list[memoryview]) -> list[ChunkRef]:
            ids = self.store.put_many(chunks)
            return [ChunkRef(cid, len(chunk)) for cid, chunk in zip(ids, chunks)]

        self.stores.append(self.io.submit(put, split(self.chunking, data)))


def _output_entries(names: Sequence[str], shapes: Sequence[tuple[int, ...]], probe: Tensors) -> list[TensorEntry]:
    """The layout ``build_artifact`` gives the merged tensors under FP32 (``probe`` has their dtypes)."""
    entries = []
    end = 0
    for name, shape, source in zip(names, shapes, tensor_sources({n: probe[n] for n in names}, FP32)):
        offset = -(-end // ALIGN) * ALIGN
        length = source.codec.encoded_size(math.prod(shape), source.source_dtype)
        entries.append(TensorEntry(name, shape, source.source_dtype, source.codec, offset, length))
        end = offset + length
    return entries


def _encoded(name: str, tensor: torch.Tensor) -> np.ndarray:
    """The slice's bytes as ``build_artifact`` writes them under FP32."""
    (source,) = tensor_sources({name: tensor}, FP32)
    out = np.empty(source.codec.encoded_size(source.array.size, source.source_dtype), dtype=np.uint8)
    source.codec.encode_into(source.array, source.source_dtype, out)
    return out


def merge_from_store(
    store: ContentStore,
    weights_id: str,
    momentum_id: str | None,
    updates: Sequence[tuple[str, int, str]],
    rule: AggregationRule,
    *,
    reference_norm: float | None = None,
    chunking: Chunking = FixedChunking(),
    slice_elements: int = SLICE_ELEMENTS,
    workers: int | None = None,
) -> StoredMerge | None:
    """``merge`` then ``store_artifact`` (FP32, ``chunking``) of the weights and momentum, streamed.

    ``updates`` are (update id, samples, artifact manifest id). A first pass measures each
    update's norm a part at a time (one update per thread) and screens as ``merge`` does: a
    missing manifest or chunk is "undecodable". A second pass walks the parameters in slices
    (whole small tensors, ``slice_elements`` ranges of large ones), reads each screened
    update's slice from the store, merges it with ``merge_slice`` on a thread pool and writes
    the results into the new artifacts in order, so memory holds a few slices and chunks per
    update and no whole decoded update (with fixed chunking; other chunkings cut the new
    artifacts whole at the end, which holds their 8P bytes). centered_clip clips whole-update distances, so under it this
    loads every update in full and calls ``merge`` (memory N x 4P, as ``merge`` needs).

    None when no update survives screening. MissingContent when the parent weights or
    momentum, or a screened update's chunk, cannot be read.
    """
    if reference_norm is not None and not (math.isfinite(reference_norm) and reference_norm >= 0):
        raise ValueError(f"reference_norm must be finite and non-negative, not {reference_norm}")
    if slice_elements < 1:
        raise ValueError(f"slice_elements must be positive, not {slice_elements}")
    if rule.name == "centered_clip":
        return _merge_loaded(store, weights_id, momentum_id, updates, rule, reference_norm, chunking)
    weights = _stored(store, weights_id)
    momentum = _stored(store, momentum_id)
    if weights is None or (momentum_id is not None and momentum is None):
        raise MissingContent([i for i in (weights_id, momentum_id) if i is not None and not store.has_manifest(i)])
    reference = weights.manifest
    if momentum is not None and [(e.name, e.shape) for e in momentum.manifest.tensors] != [
        (e.name, e.shape) for e in reference.tensors
    ]:
        raise ValueError(f"momentum {momentum_id} does not match the weights {weights_id}")
    outlier_factor = float(rule.get("outlier_factor", 0.0) or 0.0)
    threads = max(workers or _cores(), 1)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="merge") as pool:
        kept, excluded, norms = _screen(store, reference, updates, outlier_factor, reference_norm, pool)
        if not kept:
            return None
        weights_out, momentum_out = _stream_merge(
            store, weights, momentum, kept, rule, chunking, slice_elements, pool, threads
        )
    return StoredMerge(
        weights_id=weights_out,
        momentum_id=momentum_out,
        included=tuple(sorted(u.update_id for u, _ in kept)),
        excluded=tuple(excluded),
        norms=tuple(sorted(norms.items())),
    )


def _cores() -> int:
    if hasattr(os, "sched_getaffinity"):  # the cores this process may use, not the machine's
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _stream_merge(
    store: ContentStore,
    weights: _StoredBytes,
    momentum: _StoredBytes | None,
    kept: Sequence[tuple[StoredUpdate, _StoredBytes]],
    rule: AggregationRule,
    chunking: Chunking,
    slice_elements: int,
    pool: ThreadPoolExecutor,
    threads: int,
) -> tuple[str, str]:
    """The slice pass: merge slices on ``pool``, a bounded window ahead, and write them in order."""
    entries = weights.manifest.tensors
    momentum_entries = {e.name: e for e in momentum.manifest.tensors} if momentum is not None else {}
    update_entries = [{e.name: e for e in source.manifest.tensors} for _, source in kept]

    def inputs(entry: TensorEntry, start: int, stop: int) -> tuple[Tensors, Tensors | None, list[UpdateInput]]:
        name = entry.name
        w = {name: _decode_range(weights, entry, start, stop)}
        m = None if momentum is None else {name: _decode_range(momentum, momentum_entries[name], start, stop)}
        deltas = [
            UpdateInput(u.update_id, u.samples, {name: _decode_range(source, found[name], start, stop)})
            for (u, source), found in zip(kept, update_entries)
        ]
        return w, m, deltas

    # The merged tensors' dtypes follow torch's type promotion over the inputs' dtypes, which
    # the manifests' layout needs before the first slice is written: an empty slice gives them.
    probe_w: Tensors = {}
    probe_m: Tensors = {}
    for entry in entries:
        w, m, deltas = inputs(entry, 0, 0 if entry.shape else 1)
        new_w, new_m = merge_slice(w, m, deltas, rule)
        probe_w[entry.name], probe_m[entry.name] = new_w[entry.name], new_m[entry.name]
    names = [e.name for e in entries]
    shapes = [e.shape for e in entries]
    io = ThreadPoolExecutor(max_workers=_STORING, thread_name_prefix="merge-store")
    weights_writer = _ArtifactWriter(store, _output_entries(names, shapes, probe_w), chunking, io)
    momentum_writer = _ArtifactWriter(store, _output_entries(names, shapes, probe_m), chunking, io)

    def merged(entry: TensorEntry, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        w, m, deltas = inputs(entry, start, stop)
        new_w, new_m = merge_slice(w, m, deltas, rule)
        return _encoded(entry.name, new_w[entry.name]), _encoded(entry.name, new_m[entry.name])

    slices = ((i, a, b) for i, e in enumerate(entries) for a, b in _ranges(e.numel, slice_elements))
    window: deque[tuple[int, int, Future[tuple[np.ndarray, np.ndarray]]]] = deque()
    with io:
        for index, start, stop in slices:
            window.append((index, start, pool.submit(merged, entries[index], start, stop)))
            if len(window) > 2 * threads:
                _write_next(window, weights_writer, momentum_writer)
        while window:
            _write_next(window, weights_writer, momentum_writer)
        return weights_writer.finish(), momentum_writer.finish()


def _write_next(
    window: deque[tuple[int, int, Future[tuple[np.ndarray, np.ndarray]]]],
    weights_writer: _ArtifactWriter,
    momentum_writer: _ArtifactWriter,
) -> None:
    index, start, future = window.popleft()
    new_w, new_m = future.result()
    for writer, data in ((weights_writer, new_w), (momentum_writer, new_m)):
        if start == 0:
            writer.pad_to(writer.entries[index].offset)
        writer.write(data)


def _merge_loaded(
    store: ContentStore,
    weights_id: str,
    momentum_id: str | None,
    updates: Sequence[tuple[str, int, str]],
    rule: AggregationRule,
    reference_norm: float | None,
    chunking: Chunking,
) -> StoredMerge | None:
    """The whole-update path: load everything, ``merge``, store the results."""
    weights = load_artifact(store, weights_id)
    momentum = None if momentum_id is None else load_artifact(store, momentum_id)
    inputs = []
    for update in map(StoredUpdate._make, updates):
        try:
            delta: Tensors | None = load_artifact(store, update.artifact)
        except (MissingContent, Invalid, ValueError):
            delta = None
        inputs.append(UpdateInput(update.update_id, update.samples, delta))
    result = merge(weights, momentum, inputs, rule, reference_norm=reference_norm)
    if result is None:
        return None
    return StoredMerge(
        weights_id=store_artifact(store, result.weights, FP32, chunking),
        momentum_id=store_artifact(store, result.momentum, FP32, chunking),
        included=result.included,
        excluded=result.excluded,
        norms=result.norms,
    )

