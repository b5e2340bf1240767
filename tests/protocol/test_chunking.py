import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.chunking import (
    _GEAR,
    ContentDefinedChunking,
    FixedChunking,
    chunking_from_wire,
    split,
)
from protocol.cid import content_id
from protocol.errors import Invalid

SMALL_CDC = ContentDefinedChunking(min_size=256, avg_size=1024, max_size=4096)


def reference_cdc(data: bytes, chunking: ContentDefinedChunking) -> list[int]:
    """FastCDC written the slow, obvious way: one byte at a time, hash reset per chunk."""
    strict, loose = chunking._thresholds
    gear = [int(g) for g in _GEAR]
    cuts = []
    start = 0
    while start < len(data):
        end = min(start + chunking.max_size, len(data))
        if len(data) - start > chunking.min_size:
            h = 0
            for i in range(start, end):
                h = ((h << 1) + gear[data[i]]) & 0xFFFFFFFF
                length = i + 1 - start
                if length < chunking.min_size:
                    continue
                if h < (strict if length < chunking.avg_size else loose):
                    end = i + 1
                    break
        cuts.append(end)
        start = end
    return cuts


def sizes_of(cuts: list[int]) -> list[int]:
    return list(np.diff([0, *cuts]))


@given(st.binary(max_size=20_000), st.integers(64, 5000))
def test_fixed_chunks_tile_the_data(data: bytes, size: int) -> None:
    chunking = FixedChunking(size)
    chunks = split(chunking, data)
    assert b"".join(chunks) == data
    assert all(len(c) == size for c in chunks[:-1])
    chunking.check_sizes([len(c) for c in chunks], len(data))


@settings(max_examples=30, deadline=None)
@given(st.binary(min_size=0, max_size=12_000), st.sampled_from([b"", b"\0" * 3000, b"ab" * 2000]))
def test_cdc_matches_the_byte_at_a_time_reference(data: bytes, filler: bytes) -> None:
    # Low-entropy filler exercises the max-size cut and runs where every position matches.
    data = filler + data + filler
    assert SMALL_CDC.cut_points(data) == reference_cdc(data, SMALL_CDC)


@settings(max_examples=25, deadline=None)
@given(st.integers(64, 2000), st.integers(0, 4000), st.integers(0, 20000), st.integers(0, 2**32))
def test_cdc_sizes_respect_bounds(min_size: int, spread: int, length: int, seed: int) -> None:
    chunking = ContentDefinedChunking(min_size, min_size + spread, min_size + 2 * spread + 64)
    data = np.random.default_rng(seed).bytes(length)
    chunks = split(chunking, data)
    assert b"".join(chunks) == data
    chunking.check_sizes([len(c) for c in chunks], len(data))


def test_cdc_is_fast_enough_and_near_its_average() -> None:
    data = os.urandom(16 << 20)
    chunking = ContentDefinedChunking(64 << 10, 256 << 10, 1 << 20)
    sizes = sizes_of(chunking.cut_points(data))
    assert sum(sizes) == len(data)
    assert 128 << 10 < np.mean(sizes) < 512 << 10


def test_cdc_cuts_survive_an_insertion_near_the_start() -> None:
    chunking = ContentDefinedChunking(4 << 10, 16 << 10, 64 << 10)
    data = os.urandom(4 << 20)
    edited = data[:1000] + os.urandom(37) + data[1000:]
    before = [content_id(c) for c in split(chunking, data)]
    after = [content_id(c) for c in split(chunking, edited)]
    unchanged = set(before) & set(after)
    # Only the chunk holding the insertion (and at most a neighbour) may change.
    assert len(before) - len(unchanged) <= 2
    assert before[-50:] == after[-50:]


def test_fixed_chunks_do_not_survive_an_insertion() -> None:
    # The contrast that motivates content-defined chunking.
    chunking = FixedChunking(16 << 10)
    data = os.urandom(1 << 20)
    before = {content_id(c) for c in split(chunking, data)}
    after = {content_id(c) for c in split(chunking, data[:1000] + b"x" + data[1000:])}
    assert len(before & after) == 0


def test_split_returns_read_only_views_without_copying() -> None:
    data = bytearray(os.urandom(10_000))
    chunks = split(FixedChunking(4096), data)
    data[0] ^= 0xFF
    assert chunks[0][0] == data[0]
    assert chunks[0].readonly


@pytest.mark.parametrize(
    "chunking", [FixedChunking(), FixedChunking(4096), ContentDefinedChunking(), SMALL_CDC]
)
def test_chunking_wire_round_trip(chunking: FixedChunking | ContentDefinedChunking) -> None:
    assert chunking_from_wire(chunking.to_wire()) == chunking


@pytest.mark.parametrize(
    "wire",
    [
        {"mode": "fixed", "size": 0},
        {"mode": "fixed", "size": 1 << 30},
        {"mode": "fixed", "size": True},
        {"mode": "fixed", "size": 4096, "extra": 1},
        {"mode": "cdc", "min": 4096, "avg": 1024, "max": 8192},
        {"mode": "cdc", "min": 8, "avg": 1024, "max": 8192},
        {"mode": "cdc", "min": 64, "avg": 1024},
        {"mode": "rabin", "size": 4096},
        [4096],
    ],
)
def test_bad_chunking_is_rejected(wire: object) -> None:
    with pytest.raises(Invalid) as info:
        chunking_from_wire(wire)
    assert info.value.reason == "bad_chunking"


def test_check_sizes_rejects_layouts_the_mode_cannot_produce() -> None:
    with pytest.raises(Invalid):
        FixedChunking(4096).check_sizes([4096, 100, 4096], 8292)
    with pytest.raises(Invalid):
        FixedChunking(4096).check_sizes([4096], 4097)
    with pytest.raises(Invalid):
        SMALL_CDC.check_sizes([100, 5000], 5100)
    with pytest.raises(Invalid):
        SMALL_CDC.check_sizes([300, 300], 601)
    SMALL_CDC.check_sizes([300, 1], 301)
    SMALL_CDC.check_sizes([], 0)
