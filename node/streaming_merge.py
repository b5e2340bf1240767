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
from typing import NamedTuple, Protocol

import numpy as np
import torch

from node.artifacts import MissingContent, decode_state_dict, load_artifact, store_artifact, tensor_sources
from node.merge import _LEAF, NothingMerged, UpdateInput, _median_of, aggregate, merge, outlier_bound, outer_step
from node.merge import _SLICE as NORM_PART
from node.store import ContentStore
from protocol.chunking import Chunking, FixedChunking, split
from protocol.codecs import BF16, FP32, Int8Codec
from protocol.errors import Invalid
from protocol.heads import AggregationRule
from protocol.manifest import ALIGN, ChunkRef, Manifest, TensorEntry, parse_manifest

Tensors = dict[str, torch.Tensor]

SLICE_ELEMENTS = 1 << 18  # per slice of a large tensor: 1 MB of fp32 per update, a multiple of int8's 256
_CACHED_CHUNKS = 4  # per artifact: the chunks a slice shares with its neighbours, read once
_SQUARES_BLOCK = 1 << 15  # float64 squares made at a time for a norm's first halving: they stay in L2
_WRITE_BATCH = 4 << 20  # bytes of finished output chunks stored together (one fsync per folder)
_STORING = 8  # batches being stored at once: each waits on fsyncs, and more in flight overlap their latency


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
    in a small cache for the neighbouring slices. Threads read neighbouring slices at the same
    time: the first to want a chunk reads it and the others wait for it, so no chunk is read
    and hashed twice while it is cached.
    """

    def __init__(self, store: ContentStore, manifest: Manifest) -> None:
        self.store = store
        self.manifest = manifest
        self.starts = manifest.chunk_offsets()
        self._cache: OrderedDict[int, Future[np.ndarray]] = OrderedDict()
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
            pending = self._cache.get(index)
            if pending is not None:
                self._cache.move_to_end(index)
                reader = False
            else:
                pending = self._cache[index] = Future()
                reader = True
                while len(self._cache) > _CACHED_CHUNKS:
                    self._cache.popitem(last=False)
        if reader:
            chunk = np.empty(self.manifest.chunks[index].size, dtype=np.uint8)
            try:
                self._read_chunk(index, chunk)
            except BaseException as error:
                with self._lock:
                    if self._cache.get(index) is pending:
                        del self._cache[index]
                pending.set_exception(error)
                raise
            pending.set_result(chunk)
        return pending.result()

    def _read_chunk(self, index: int, out: np.ndarray) -> None:
        cid = self.manifest.chunks[index].cid
        if not self.store.read_into(cid, out):
            raise MissingContent([cid])
        self.verified.add(index)


class _Scratch(threading.local):
    """One thread's reusable buffers, grown on demand: a slice's reads and decodes allocate nothing."""

    def __init__(self) -> None:
        self.buffers: dict[str, np.ndarray] = {}

    def get(self, name: str, size: int, dtype: type[np.generic]) -> np.ndarray:
        nbytes = size * np.dtype(dtype).itemsize
        buffer = self.buffers.get(name)
        if buffer is None or buffer.size < nbytes:
            buffer = self.buffers[name] = np.empty(max(nbytes, 1), dtype=np.uint8)
        return buffer[:nbytes].view(dtype)


_SCRATCH = _Scratch()


def _decode_into(source: _StoredBytes, entry: TensorEntry, start: int, stop: int, out: np.ndarray) -> None:
    """Elements ``[start, stop)`` of a float32 tensor into ``out`` (float32), bit for bit as
    ``decode_state_dict`` decodes them: the codec's own element-wise arithmetic, without its
    allocations. An int8 range is read as the whole blocks that cover it (scales, then values)."""
    codec = entry.codec
    count = stop - start
    if isinstance(codec, Int8Codec):
        block = codec.block
        first_block, end_block = start // block, -(-stop // block)
        first, last = first_block * block, min(end_block * block, entry.numel)
        scales = _SCRATCH.get("scales", end_block - first_block, np.float32)
        values = _SCRATCH.get("values", last - first, np.int8)
        source.read_into(entry.offset + first_block * 4, scales.view(np.uint8))
        source.read_into(entry.offset + codec.blocks(entry.numel) * 4 + first, values.view(np.uint8))
        target = out if (first, last) == (start, stop) else _SCRATCH.get("blocks", last - first, np.float32)
        full = (last - first) // block
        if full:
            np.multiply(
                values[: full * block].reshape(full, block), scales[:full, None], out=target[: full * block].reshape(full, block)
            )
        if full * block < last - first:
            np.multiply(values[full * block :], scales[full], out=target[full * block :])
        if target is not out:
            np.copyto(out, target[start - first : stop - first])
    elif codec == BF16:
        bits = _SCRATCH.get("bits", count, np.uint16)
        source.read_into(entry.offset + start * 2, bits.view(np.uint8))
        wide = out.view(np.uint32)
        np.copyto(wide, bits)
        np.left_shift(wide, 16, out=wide)
    elif codec == FP32:
        source.read_into(entry.offset + start * 4, out.view(np.uint8))
    else:
        raise ValueError(f"{entry.name}: no float32 decode under {codec.name}")


def _decodes_into(entry: TensorEntry) -> bool:
    """Whether ``_decode_into`` decodes the tensor: float32 values under a float codec."""
    return entry.dtype == "float32" and (isinstance(entry.codec, Int8Codec) or entry.codec in (FP32, BF16))


def _decode_range(source: _StoredBytes, entry: TensorEntry, start: int, stop: int) -> torch.Tensor:
    """Elements ``[start, stop)`` of a tensor, decoded exactly as ``decode_state_dict`` decodes them.

    The whole tensor keeps its shape; a part of one is flat. A float32 tensor goes through
    ``_decode_into``; others are read as the whole int8 blocks that cover the range (scales,
    then values) and decoded by the codec itself, so every element meets the same arithmetic
    as in a full decode.
    """
    whole = (start, stop) == (0, entry.numel)
    if _decodes_into(entry):
        values = np.empty(stop - start, dtype=np.float32)
        _decode_into(source, entry, start, stop, values)
        decoded = torch.from_numpy(values)
        return decoded.reshape(entry.shape) if whole else decoded
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
    covers_whole = (first, last) == (0, entry.numel)
    shape = entry.shape if covers_whole else (last - first,)
    part = TensorEntry(entry.name, shape, entry.dtype, codec, 0, data.size)
    decoded = decode_state_dict(Manifest((part,), FixedChunking(), (), data.size), data)[entry.name]
    return decoded if covers_whole or (first, last) == (start, stop) else decoded[start - first : stop - first]


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
    return _halved_square_sum(wide)


def _halved_square_sum(values: np.ndarray) -> float:
    """``part_square_sum`` of a flat float array. The first halving adds the squares of the two
    halves a block at a time, as they are made, so the full-size float64 squares never exist."""
    if values.size <= _LEAF:
        squares = values.astype(np.float64)
        np.multiply(squares, squares, out=squares)
        return math.fsum(squares.tolist())
    half = values.size // 2
    squares = _SCRATCH.get("halves", half, np.float64)
    for low in range(0, half, _SQUARES_BLOCK):
        high = min(low + _SQUARES_BLOCK, half)
        head = _SCRATCH.get("head", high - low, np.float64)
        tail = _SCRATCH.get("tail", high - low, np.float64)
        np.multiply(values[low:high], values[low:high], out=head, dtype=np.float64)
        np.multiply(values[half + low : half + high], values[half + low : half + high], out=tail, dtype=np.float64)
        np.add(head, tail, out=squares[low:high])
    if values.size % 2:
        last = np.float64(values[-1])
        squares[:1] += last * last
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
        parts = []
        for start, stop in _ranges(entry.numel, NORM_PART):
            if _decodes_into(entry):
                values = _SCRATCH.get("norm", stop - start, np.float32)
                _decode_into(source, entry, start, stop, values)
                parts.append(_halved_square_sum(values))
            else:
                parts.append(part_square_sum(_decode_range(source, entry, start, stop)))
        tensor_sums.append(math.fsum(parts))
    source.verify_unread()
    return math.sqrt(math.fsum(tensor_sums))


def update_norm(store: ContentStore, artifact_id: str) -> float:
    """The L2 norm ``merge_from_store`` screens a stored update by, to the bit.

    For the daemon to measure each update as it arrives and hand the norms to the merge.
    Every chunk is read and verified. MissingContent when the store lacks the manifest or a
    chunk (or holds a corrupt one), Invalid when the artifact does not decode: the screen
    calls either "undecodable". A NaN or Inf value gives a non-finite norm, as in ``merge``.
    """
    source = _stored(store, artifact_id)
    if source is None:
        raise MissingContent([artifact_id])
    try:
        return _norm_from_store(source)
    except Invalid:
        raise
    except ValueError as error:
        raise Invalid("undecodable", str(error)) from error
    finally:
        _SCRATCH.buffers.clear()  # the caller's thread lives on; its buffers need not


def _screen(
    store: ContentStore,
    reference: Manifest,
    updates: Sequence[tuple[str, int, str]],
    outlier_factor: float,
    reference_norm: float | None,
    known: Mapping[str, float],
    pool: ThreadPoolExecutor,
) -> tuple[list[tuple[StoredUpdate, _StoredBytes]], list[tuple[str, str]], dict[str, float]]:
    """``node.merge._screen`` over stored updates, their norms computed in parallel, one update per
    task, or taken from ``known`` (by artifact id), whose artifacts were read whole when measured."""
    shapes = [(e.name, e.shape) for e in reference.tensors]
    ordered = sorted((StoredUpdate(*u) for u in updates), key=lambda u: u.update_id)
    sources = [_stored(store, u.artifact) for u in ordered]

    def measure(update: StoredUpdate, source: _StoredBytes | None) -> str | float:
        if source is None:
            return "undecodable"
        norm = known.get(update.artifact)
        try:
            if [(e.name, e.shape) for e in source.manifest.tensors] != shapes:
                if norm is None:
                    source.verify_unread()
                return "wrong_shapes"
            return _norm_from_store(source) if norm is None else norm
        except (MissingContent, Invalid, ValueError):
            return "undecodable"
        finally:
            source.drop_cache()  # the slice pass reads other ranges; a pass's cache is its own

    kept: list[tuple[StoredUpdate, _StoredBytes]] = []
    excluded: list[tuple[str, str]] = []
    norms: dict[str, float] = {}
    for update, source, outcome in zip(ordered, sources, pool.map(measure, ordered, sources)):
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


def _output_entries(
    names: Sequence[str], shapes: Sequence[tuple[int, ...]], dtypes: Mapping[str, torch.dtype]
) -> list[TensorEntry]:
    """The layout ``build_artifact`` gives the merged tensors of ``dtypes`` under FP32."""
    entries = []
    end = 0
    probe = {n: torch.empty(0, dtype=dtypes[n]) for n in names}
    for name, shape, source in zip(names, shapes, tensor_sources(probe, FP32)):
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
    norms: Mapping[str, float] | None = None,
) -> StoredMerge:
    """``merge`` then ``store_artifact`` (FP32, ``chunking``) of the weights and momentum, streamed.

    ``updates`` are (update id, samples, artifact manifest id). A first pass measures each
    update's norm a part at a time (one update per thread) and screens as ``merge`` does: a
    missing manifest or chunk is "undecodable". ``norms`` maps artifact ids to the value
    ``update_norm`` gave for them, measured as they arrived: those updates skip the first pass
    (their chunks are read once, by the second, and one lost since raises MissingContent).
    A second pass walks the parameters in slices (whole small tensors, ``slice_elements``
    ranges of large ones), reads each screened update's slice from the store, merges it on a
    thread pool and writes the results into the new artifacts in order, so memory holds a few
    slices and chunks per update and no whole decoded update (with fixed chunking; other
    chunkings cut the new artifacts whole at the end, which holds their 8P bytes). centered_clip
    clips whole-update distances, so under it this loads every update in full and calls
    ``merge`` (memory N x 4P, as ``merge`` needs; ``norms`` unused).

    NothingMerged when no update survives screening. MissingContent when the parent weights or
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
        kept, excluded, measured = _screen(
            store, reference, updates, outlier_factor, reference_norm, norms or {}, pool
        )
        if not kept:
            raise NothingMerged(excluded)
        weights_out, momentum_out = _stream_merge(
            store, weights, momentum, kept, rule, chunking, slice_elements, pool, threads
        )
    return StoredMerge(
        weights_id=weights_out,
        momentum_id=momentum_out,
        included=tuple(sorted(u.update_id for u, _ in kept)),
        excluded=tuple(excluded),
        norms=tuple(sorted(measured.items())),
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
    sources = [weights, *([momentum] if momentum is not None else []), *(source for _, source in kept)]
    merged: _SliceMerge
    if rule.name == "mean" and all(_decodes_into(e) for source in sources for e in source.manifest.tensors):
        merged = _Float32Mean(weights, momentum, kept, rule, slice_elements)
        dtypes = {e.name: torch.float32 for e in entries}
        weights_dtypes, momentum_dtypes = dtypes, dtypes
    else:
        merged, weights_dtypes, momentum_dtypes = _slice_merge(weights, momentum, kept, rule)
    names = [e.name for e in entries]
    shapes = [e.shape for e in entries]
    io = ThreadPoolExecutor(max_workers=_STORING, thread_name_prefix="merge-store")
    weights_writer = _ArtifactWriter(store, _output_entries(names, shapes, weights_dtypes), chunking, io)
    momentum_writer = _ArtifactWriter(store, _output_entries(names, shapes, momentum_dtypes), chunking, io)
    slices = ((i, a, b) for i, e in enumerate(entries) for a, b in _ranges(e.numel, slice_elements))
    window: deque[tuple[int, int, Future[tuple[np.ndarray, np.ndarray]]]] = deque()

    def write_next() -> None:
        index, start, future = window.popleft()
        new_w, new_m = future.result()
        for writer, data in ((weights_writer, new_w), (momentum_writer, new_m)):
            if start == 0:
                writer.pad_to(writer.entries[index].offset)
            writer.write(data.view(np.uint8))
            merged.written(data)

    with io:
        for index, start, stop in slices:
            window.append((index, start, pool.submit(merged, entries[index], start, stop)))
            if len(window) > 2 * threads:
                write_next()
        while window:
            write_next()
        return weights_writer.finish(), momentum_writer.finish()


class _SliceMerge(Protocol):
    """Merges one slice of a tensor into its new weights' and momentum's encoded values."""

    def __call__(self, entry: TensorEntry, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]: ...

    def written(self, data: np.ndarray) -> None:
        """``data``, returned by a call, is in the new artifact; its buffer may be used again."""


class _Float32Mean:
    """The mean and outer step of float32 inputs, each element through the same float32 ops in
    the same order as ``aggregate`` then ``outer_step``, in numpy on reused buffers: decoded
    update, times its weight, added to the sum; then the six ops of the step. torch's ops give
    the same bits (IEEE rounding of each op) but split large ones over threads of their own,
    which fight the merge's pool for the cores, and allocate their results."""

    def __init__(
        self,
        weights: _StoredBytes,
        momentum: _StoredBytes | None,
        kept: Sequence[tuple[StoredUpdate, _StoredBytes]],
        rule: AggregationRule,
        slice_elements: int,
    ) -> None:
        self.weights = weights
        self.momentum = momentum
        self.momentum_entries = {e.name: e for e in momentum.manifest.tensors} if momentum is not None else {}
        total = sum(u.samples for u, _ in kept)
        self.updates = [
            (source, {e.name: e for e in source.manifest.tensors}, np.float32(u.samples / total)) for u, source in kept
        ]
        self.lr = np.float32(float(rule.get("outer_lr", 0.7)))  # type: ignore[arg-type]
        self.mu = np.float32(float(rule.get("momentum", 0.9)))  # type: ignore[arg-type]
        self.nesterov = bool(rule.get("nesterov", True))
        self.slice_elements = slice_elements
        self._free: list[np.ndarray] = []  # written output buffers of a whole slice, for the next slices
        self._lock = threading.Lock()

    def __call__(self, entry: TensorEntry, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        count = stop - start
        gradient = _SCRATCH.get("gradient", count, np.float32)
        delta = _SCRATCH.get("delta", count, np.float32)
        gradient.fill(0)
        for source, found, weight in self.updates:
            _decode_into(source, found[entry.name], start, stop, delta)
            np.multiply(delta, weight, out=delta)
            np.add(gradient, delta, out=gradient)
        buffer, step = self._output(count), self._output(count)
        if self.momentum is None:
            buffer.fill(0)
        else:
            _decode_into(self.momentum, self.momentum_entries[entry.name], start, stop, buffer)
            np.multiply(buffer, self.mu, out=buffer)
        np.add(buffer, gradient, out=buffer)
        if self.nesterov:
            np.multiply(buffer, self.mu, out=step)
            np.add(step, gradient, out=step)
        else:
            np.copyto(step, buffer)
        np.multiply(step, self.lr, out=step)
        parent = _SCRATCH.get("parent", count, np.float32)
        _decode_into(self.weights, entry, start, stop, parent)
        np.subtract(parent, step, out=step)
        return step, buffer

    def written(self, data: np.ndarray) -> None:
        if data.size == self.slice_elements:
            with self._lock:
                self._free.append(data)

    def _output(self, count: int) -> np.ndarray:
        if count == self.slice_elements:
            with self._lock:
                if self._free:
                    return self._free.pop()
        return np.empty(count, dtype=np.float32)


class _AnySliceMerge:
    """``merge_slice`` over slices decoded into tensors of their source dtypes: every rule, any dtypes."""

    def __init__(
        self,
        weights: _StoredBytes,
        momentum: _StoredBytes | None,
        kept: Sequence[tuple[StoredUpdate, _StoredBytes]],
        rule: AggregationRule,
    ) -> None:
        self.weights = weights
        self.momentum = momentum
        self.momentum_entries = {e.name: e for e in momentum.manifest.tensors} if momentum is not None else {}
        self.kept = kept
        self.update_entries = [{e.name: e for e in source.manifest.tensors} for _, source in kept]
        self.rule = rule

    def __call__(self, entry: TensorEntry, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        new_w, new_m = self.tensors(entry, start, stop)
        return _encoded(entry.name, new_w), _encoded(entry.name, new_m)

    def tensors(self, entry: TensorEntry, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        name = entry.name
        w = {name: _decode_range(self.weights, entry, start, stop)}
        m = None
        if self.momentum is not None:
            m = {name: _decode_range(self.momentum, self.momentum_entries[name], start, stop)}
        deltas = [
            UpdateInput(u.update_id, u.samples, {name: _decode_range(source, found[name], start, stop)})
            for (u, source), found in zip(self.kept, self.update_entries)
        ]
        new_w, new_m = merge_slice(w, m, deltas, self.rule)
        return new_w[name], new_m[name]

    def written(self, data: np.ndarray) -> None:
        pass


def _slice_merge(
    weights: _StoredBytes,
    momentum: _StoredBytes | None,
    kept: Sequence[tuple[StoredUpdate, _StoredBytes]],
    rule: AggregationRule,
) -> tuple[_AnySliceMerge, dict[str, torch.dtype], dict[str, torch.dtype]]:
    """The general slice merge, and the dtypes of the tensors it makes.

    They follow torch's type promotion over the inputs' dtypes, which the manifests' layout
    needs before the first slice is written: an empty slice of each tensor gives them.
    """
    merged = _AnySliceMerge(weights, momentum, kept, rule)
    weights_dtypes, momentum_dtypes = {}, {}
    for entry in weights.manifest.tensors:
        new_w, new_m = merged.tensors(entry, 0, 0 if entry.shape else 1)
        weights_dtypes[entry.name], momentum_dtypes[entry.name] = new_w.dtype, new_m.dtype
    return merged, weights_dtypes, momentum_dtypes


def _merge_loaded(
    store: ContentStore,
    weights_id: str,
    momentum_id: str | None,
    updates: Sequence[tuple[str, int, str]],
    rule: AggregationRule,
    reference_norm: float | None,
    chunking: Chunking,
) -> StoredMerge:
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
    return StoredMerge(
        weights_id=store_artifact(store, result.weights, FP32, chunking),
        momentum_id=store_artifact(store, result.momentum, FP32, chunking),
        included=result.included,
        excluded=result.excluded,
        norms=result.norms,
    )

