"""How an artifact's byte stream is cut into chunks: fixed-size, or content-defined (FastCDC).

Both modes are pure functions of the bytes and their parameters, which the manifest records,
so every peer cuts the same stream at the same places.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import blake3
import numpy as np

from protocol.errors import Invalid

Buffer = bytes | bytearray | memoryview | np.ndarray

DEFAULT_CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE = 64
MAX_CHUNK_SIZE = 64 << 20

# The gear hash is h = (h << 1) + GEAR[byte] in 32-bit arithmetic, so h at position i is
# sum(GEAR[data[i - k]] << k for k < 32): it depends on exactly the last 32 bytes. That
# bounded window is what lets numpy compute every position in log2(32) = 5 vector passes.
_WINDOW = 32
_GEAR = np.frombuffer(blake3.blake3(b"p2p-node fastcdc gear v1").digest(length=1024), "<u4").astype(np.uint32)
# Normalised chunking (FastCDC "NC level 2"): cuts before the average size need 2 more zero
# bits than the average calls for and cuts after it 2 fewer, which narrows the size spread.
_NORMALISATION = 2
# Vector passes run over blocks this large so the working set stays in cache.
_HASH_BLOCK = 1 << 16


def _as_bytes(data: Buffer) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8)
    return np.frombuffer(data, dtype=np.uint8)


@dataclass(frozen=True)
class FixedChunking:
    """Chunks of exactly ``size`` bytes; the last one holds the remainder."""

    size: int = DEFAULT_CHUNK_SIZE

    def __post_init__(self) -> None:
        if not (type(self.size) is int and MIN_CHUNK_SIZE <= self.size <= MAX_CHUNK_SIZE):
            bounds = f"[{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]"
            raise Invalid("bad_chunking", f"fixed chunk size {self.size!r} outside {bounds}")

    def cut_points(self, data: Buffer) -> list[int]:
        """The end offset of every chunk of ``data``, in order (empty for empty data)."""
        total = _as_bytes(data).size
        return [*range(self.size, total, self.size), total] if total else []

    def check_sizes(self, sizes: Sequence[int], total: int) -> None:
        """Raise Invalid unless ``sizes`` is exactly how this mode cuts ``total`` bytes."""
        full, rest = divmod(total, self.size)
        expected = [self.size] * full + ([rest] if rest else [])
        if list(sizes) != expected:
            raise Invalid("chunk_layout", f"fixed chunks of {self.size} do not tile {total} bytes")

    def to_wire(self) -> dict[str, Any]:
        return {"mode": "fixed", "size": self.size}


@dataclass(frozen=True)
class ContentDefinedChunking:
    """FastCDC-style chunks between ``min_size`` and ``max_size``, ``avg_size`` on average.

    A cut falls after byte i when the top bits of the 32-byte-window gear hash at i are zero;
    because the window is short, an edit moves only the cuts within about one chunk of it.
    """

    min_size: int = DEFAULT_CHUNK_SIZE // 4
    avg_size: int = DEFAULT_CHUNK_SIZE
    max_size: int = DEFAULT_CHUNK_SIZE * 4

    def __post_init__(self) -> None:
        sizes = (self.min_size, self.avg_size, self.max_size)
        if not all(type(s) is int for s in sizes) or not (
            MIN_CHUNK_SIZE <= self.min_size <= self.avg_size <= self.max_size <= MAX_CHUNK_SIZE
        ):
            raise Invalid("bad_chunking", f"content-defined sizes {sizes!r} out of order or range")

    @property
    def _thresholds(self) -> tuple[int, int]:
        """Hash bounds below which a position may cut: (strict, before avg; loose, after)."""
        bits = max(self.avg_size.bit_length() - 1, _NORMALISATION + 1)
        strict = min(bits + _NORMALISATION, _WINDOW)
        return 1 << (_WINDOW - strict), 1 << (_WINDOW - bits + _NORMALISATION)

    def cut_points(self, data: Buffer) -> list[int]:
        """The end offset of every chunk of ``data``, in order (empty for empty data)."""
        view = _as_bytes(data)
        total = view.size
        strict_ends, loose_ends = self._candidates(view)
        cuts: list[int] = []
        start = 0
        while start < total:
            end = min(start + self.max_size, total)
            if total - start > self.min_size:
                i = int(np.searchsorted(strict_ends, start + self.min_size))
                if i < strict_ends.size and strict_ends[i] < start + self.avg_size:
                    end = int(strict_ends[i])
                else:
                    j = int(np.searchsorted(loose_ends, start + self.avg_size))
                    if j < loose_ends.size and loose_ends[j] < end:
                        end = int(loose_ends[j])
            cuts.append(end)
            start = end
        return cuts

    def _candidates(self, view: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Chunk ends (byte index + 1) where the strict and the loose mask hold, ascending."""
        strict, loose = self._thresholds
        hashes = _WindowHashes()
        strict_parts: list[np.ndarray] = []
        loose_parts: list[np.ndarray] = []
        # Positions before MIN_CHUNK_SIZE can never end a chunk, so the first block may start
        # without history; later blocks re-read the previous _WINDOW - 1 bytes as context.
        for start in range(0, view.size, _HASH_BLOCK):
            lead = min(start, _WINDOW - 1)
            h = hashes.of(view[start - lead : start + _HASH_BLOCK])[lead:]
            hits = np.flatnonzero(h < loose)
            if hits.size:
                loose_parts.append(hits + (start + 1))
                strict_parts.append(hits[h[hits] < strict] + (start + 1))
        empty = np.empty(0, dtype=np.int64)
        strict_ends = np.concatenate(strict_parts) if strict_parts else empty
        loose_ends = np.concatenate(loose_parts) if loose_parts else empty
        return strict_ends, loose_ends

    def check_sizes(self, sizes: Sequence[int], total: int) -> None:
        """Raise Invalid unless ``sizes`` could be a cut of ``total`` bytes in this mode."""
        if sum(sizes) != total:
            raise Invalid("chunk_layout", f"chunk sizes sum to {sum(sizes)}, not {total}")
        for index, size in enumerate(sizes):
            low = 1 if index == len(sizes) - 1 else self.min_size
            if not low <= size <= self.max_size:
                bounds = f"[{low}, {self.max_size}]"
                raise Invalid("chunk_layout", f"chunk {index} has {size} bytes, outside {bounds}")

    def to_wire(self) -> dict[str, Any]:
        return {"mode": "cdc", "min": self.min_size, "avg": self.avg_size, "max": self.max_size}


Chunking = FixedChunking | ContentDefinedChunking


class _WindowHashes:
    """Gear hashes of successive blocks in two reused scratch buffers: allocating fresh
    arrays per block costs more than the hashing itself."""

    def __init__(self) -> None:
        self._hashes = np.empty(_HASH_BLOCK + _WINDOW, dtype=np.uint32)
        self._shifted = np.empty_like(self._hashes)

    def of(self, block: np.ndarray) -> np.ndarray:
        """The hash at every position of ``block``, valid until the next call. Positions
        closer than _WINDOW to the block's start see only the bytes inside it."""
        h = self._hashes[: block.size]
        shifted = self._shifted[: block.size]
        np.take(_GEAR, block, out=h)
        span = 1
        # Doubling: after the pass for ``span``, h[i] sums the contributions of 2 * span bytes.
        while span < _WINDOW:
            np.left_shift(h[:-span], span, out=shifted[span:])
            np.add(h[span:], shifted[span:], out=h[span:])
            span *= 2
        return h


def split(chunking: Chunking, data: Buffer) -> list[memoryview]:
    """Cut ``data`` into chunks, as read-only views over it (no copies)."""
    view = _as_bytes(data).data.toreadonly()
    chunks = []
    start = 0
    for end in chunking.cut_points(view):
        chunks.append(view[start:end])
        start = end
    return chunks


def chunking_from_wire(value: Any) -> Chunking:
    """Parse a manifest's chunking field; raise Invalid for anything unknown or out of range."""
    if not isinstance(value, dict) or not isinstance(value.get("mode"), str):
        raise Invalid("bad_chunking", "chunking must be a map with a mode")
    mode = value["mode"]
    if mode == "fixed" and set(value) == {"mode", "size"}:
        return FixedChunking(value["size"])
    if mode == "cdc" and set(value) == {"mode", "min", "avg", "max"}:
        return ContentDefinedChunking(value["min"], value["avg"], value["max"])
    raise Invalid("bad_chunking", f"unknown chunking {mode!r} or fields {sorted(value)!r}")
