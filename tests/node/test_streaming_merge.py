"""The streamed merge gives the heads of ``node.merge.merge``: same screening, norms and manifest ids."""

from __future__ import annotations

import math
import random
import tracemalloc
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import numpy as np

import pytest
import torch

from node.artifacts import MissingContent, encode_state_dict, load_artifact, store_artifact
from node.merge import NothingMerged, UpdateInput, _square_sum, merge, outer_rule
from node.store import ContentStore
from node.streaming_merge import StoredMerge, StoredUpdate, merge_from_store, part_square_sum, update_norm
from protocol.chunking import Chunking, ContentDefinedChunking, FixedChunking
from protocol.codecs import BF16, FP32, INT8, Codec, Int8Codec
from protocol.errors import Invalid
from protocol.heads import AggregationRule

SLICE = 1000  # elements per slice here: not a multiple of the int8 blocks, so slices split blocks
SHAPES = {"embed": (40, 130), "scale": (), "bias": (7,), "empty": (0, 3), "head": (3, 1500)}
CODECS: tuple[Codec, ...] = (FP32, BF16, INT8, Int8Codec(100))


def rule(name: str, outlier: float = 3.0) -> AggregationRule:
    return outer_rule(name, 0.7, 0.9, True, 0.25, outlier, clip_tau=0.0, clip_iters=3)


def state(shapes: Mapping[str, tuple[int, ...]], seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) * scale for name, shape in shapes.items()}


def reference(
    store: ContentStore,
    weights_id: str,
    momentum_id: str | None,
    updates: list[StoredUpdate],
    merge_rule: AggregationRule,
    reference_norm: float | None,
    chunking: Chunking,
) -> StoredMerge:
    """What the daemon does today: decode every update in full, merge, encode the results."""
    inputs = []
    for update in updates:
        try:
            delta = load_artifact(store, update.artifact)
        except MissingContent:
            delta = None
        inputs.append(UpdateInput(update.update_id, update.samples, delta))
    momentum = None if momentum_id is None else load_artifact(store, momentum_id)
    result = merge(load_artifact(store, weights_id), momentum, inputs, merge_rule, reference_norm=reference_norm)
    return StoredMerge(
        weights_id=encode_state_dict(result.weights, FP32, chunking).manifest.artifact_id,
        momentum_id=encode_state_dict(result.momentum, FP32, chunking).manifest.artifact_id,
        included=result.included,
        excluded=result.excluded,
        norms=result.norms,
    )


def round_inputs(
    store: ContentStore, rng: random.Random, shapes: dict[str, tuple[int, ...]], chunking: Chunking, count: int
) -> tuple[str, str | None, list[StoredUpdate]]:
    """Parent weights and momentum, ``count`` honest updates in mixed codecs and dtypes, and one of
    each kind that screening must drop: x100, NaN, wrong shapes, no artifact, a lost chunk."""
    seed = rng.randrange(1 << 30)
    weights_id = store_artifact(store, state(shapes, seed), FP32, chunking)
    momentum_id = store_artifact(store, state(shapes, seed + 1, 0.01), FP32, chunking) if rng.random() < 0.7 else None
    shared = state(shapes, seed + 2, 0.01)
    deltas = []
    for i in range(count):
        noise = state(shapes, seed + 10 + i, 0.003)
        delta = {k: shared[k] + noise[k] for k in shapes}
        dtype = rng.choice((torch.float32, torch.float32, torch.bfloat16, torch.float64))
        deltas.append(({k: v.to(dtype) for k, v in delta.items()}, rng.choice(CODECS)))
    deltas.append(({k: v * 100 for k, v in shared.items()}, INT8))
    victim = max(shapes, key=lambda k: math.prod(shapes[k]))
    poisoned = {**shared, victim: shared[victim].clone()}
    poisoned[victim].view(-1)[3] = math.nan
    deltas.append((poisoned, FP32))
    deltas.append(({**shared, victim: torch.zeros(7)}, FP32))
    updates = []
    for i, (delta, codec) in enumerate(deltas):
        binding = f"b3:{rng.randrange(1 << 256):064x}"
        artifact = store_artifact(store, delta, codec, chunking, binding)
        updates.append(StoredUpdate(f"b3:{rng.randrange(1 << 256):064x}", rng.choice((64, 100, 128)), artifact))
    updates.append(StoredUpdate(f"b3:{rng.randrange(1 << 256):064x}", 64, f"b3:{'ab' * 32}"))
    lost = store_artifact(store, shared, INT8, chunking, f"b3:{'cd' * 32}")
    manifest = store.get_manifest(lost)
    assert manifest is not None
    chunk = manifest.chunks[-1].cid
    (store.root / "chunks" / chunk[3:5] / chunk[3:]).unlink()
    updates.append(StoredUpdate(f"b3:{rng.randrange(1 << 256):064x}", 64, lost))
    rng.shuffle(updates)
    return weights_id, momentum_id, updates


def assert_same_head(store: ContentStore, streamed: StoredMerge | None, expected: StoredMerge | None) -> None:
    assert streamed == expected
    if streamed is not None:
        # Every chunk went into the store: the new head's state loads from it.
        load_artifact(store, streamed.weights_id)
        load_artifact(store, streamed.momentum_id)


@pytest.mark.parametrize("name", ["mean", "trimmed_mean", "median", "centered_clip"])
@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_streamed_merge_is_the_merge_byte_for_byte(tmp_path: Path, name: str, count: int) -> None:
    rng = random.Random(f"{name}-{count}")
    store = ContentStore(tmp_path)
    chunking = FixedChunking(rng.choice((4096, 65536)))
    weights_id, momentum_id, updates = round_inputs(store, rng, SHAPES, chunking, count)
    reference_norm = rng.choice((None, 0.5, 3.0))
    merge_rule = rule(name, rng.choice((0.0, 3.0)))
    expected = reference(store, weights_id, momentum_id, updates, merge_rule, reference_norm, chunking)
    streamed = merge_from_store(
        store, weights_id, momentum_id, updates, merge_rule,
        reference_norm=reference_norm, chunking=chunking, slice_elements=SLICE, workers=rng.choice((1, 3)),
    )
    assert_same_head(store, streamed, expected)
    reasons = dict(expected.excluded) if expected else {}
    assert "undecodable" in reasons.values() and "wrong_shapes" in reasons.values()


def test_norms_of_tensors_over_a_million_elements_match(tmp_path: Path) -> None:
    """node.merge sums a norm in parts of 2**20 elements; a tensor spanning several parts is summed alike."""
    rng = random.Random(7)
    store = ContentStore(tmp_path)
    chunking = FixedChunking()
    shapes = {"big": ((1 << 20) + 4099,), "small": (5, 5)}
    weights_id, momentum_id, updates = round_inputs(store, rng, shapes, chunking, 3)
    merge_rule = rule("mean")
    expected = reference(store, weights_id, momentum_id, updates, merge_rule, None, chunking)
    streamed = merge_from_store(store, weights_id, momentum_id, updates, merge_rule, chunking=chunking)
    assert_same_head(store, streamed, expected)


def test_content_defined_chunking_gives_the_same_ids(tmp_path: Path) -> None:
    rng = random.Random(11)
    store = ContentStore(tmp_path)
    chunking = ContentDefinedChunking(256, 1024, 4096)
    weights_id, momentum_id, updates = round_inputs(store, rng, SHAPES, chunking, 4)
    merge_rule = rule("trimmed_mean")
    expected = reference(store, weights_id, momentum_id, updates, merge_rule, 1.0, chunking)
    streamed = merge_from_store(
        store, weights_id, momentum_id, updates, merge_rule, reference_norm=1.0, chunking=chunking, slice_elements=SLICE
    )
    assert_same_head(store, streamed, expected)


def test_a_round_with_nothing_usable_merges_nothing(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    weights_id = store_artifact(store, state(SHAPES, 0))
    updates = [StoredUpdate(f"b3:{'01' * 32}", 64, f"b3:{'ef' * 32}")]
    with pytest.raises(NothingMerged) as nothing:
        merge_from_store(store, weights_id, None, updates, rule("mean"))
    assert nothing.value.excluded == ((updates[0].update_id, "undecodable"),)


def test_missing_parent_state_is_reported_for_fetching(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    absent = f"b3:{'ef' * 32}"
    with pytest.raises(MissingContent) as caught:
        merge_from_store(store, absent, None, [], rule("mean"))
    assert caught.value.ids == [absent]


def test_memory_holds_slices_not_whole_updates(tmp_path: Path) -> None:
    """Decoded update bytes pass through numpy, which tracemalloc sees: each update adds a few
    slices and chunks to the peak, far less than a decoded copy of it."""
    store = ContentStore(tmp_path)
    shapes = {"layer": (1 << 21,)}
    weights_id = store_artifact(store, state(shapes, 0))
    chunking = FixedChunking(1 << 16)
    updates = [
        StoredUpdate(f"b3:{i:064x}", 64, store_artifact(store, state(shapes, i + 1, 0.01), INT8, chunking))
        for i in range(6)
    ]
    decoded_update = (1 << 21) * 4
    peaks = []
    for count in (2, 6):
        tracemalloc.start()
        result = merge_from_store(store, weights_id, None, updates[:count], rule("mean"), slice_elements=1 << 14)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert result is not None and len(result.included) == count
    assert peaks[1] - peaks[0] < decoded_update / 2, peaks


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 12345, 65537, (1 << 20) - 1, 1 << 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_part_sums_of_squares_are_node_merges_to_the_bit(size: int, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(size)
    values = (torch.randn(size, generator=generator) * torch.rand(size, generator=generator) * 1e3).to(dtype)
    assert part_square_sum(values) == _square_sum(values, None)
    if size:
        values[size // 2] = math.inf
        assert part_square_sum(values) == _square_sum(values, None) == math.inf


def known_norms(store: ContentStore, updates: list[StoredUpdate]) -> dict[str, float]:
    """What the daemon keeps as updates arrive: ``update_norm`` of each artifact that measures."""
    norms = {}
    for update in updates:
        try:
            norms[update.artifact] = update_norm(store, update.artifact)
        except (MissingContent, Invalid):
            pass
    return norms


@pytest.mark.parametrize("name", ["mean", "trimmed_mean", "median"])
def test_norms_measured_on_arrival_give_the_same_head(tmp_path: Path, name: str) -> None:
    rng = random.Random(f"known-{name}")
    store = ContentStore(tmp_path)
    chunking = FixedChunking(4096)
    weights_id, momentum_id, updates = round_inputs(store, rng, SHAPES, chunking, 4)
    merge_rule = rule(name)
    norms = known_norms(store, updates)
    expected = reference(store, weights_id, momentum_id, updates, merge_rule, 0.5, chunking)
    streamed = merge_from_store(
        store, weights_id, momentum_id, updates, merge_rule,
        reference_norm=0.5, chunking=chunking, slice_elements=SLICE, workers=2, norms=norms,
    )
    assert_same_head(store, streamed, expected)
    assert expected is not None
    assert {u: n for u, n in expected.norms} == {
        u.update_id: norms[u.artifact] for u in updates if u.update_id in expected.included
    }


def test_update_norm_is_the_screens_norm_or_says_why_not(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    shapes = {"big": ((1 << 20) + 4099,), "small": (5, 5)}
    delta = state(shapes, 3, 0.01)
    artifact = store_artifact(store, delta, INT8)
    result = merge(state(shapes, 4), None, [UpdateInput("u", 64, load_artifact(store, artifact))], rule("mean"))
    assert result is not None
    assert update_norm(store, artifact) == dict(result.norms)["u"]

    delta["small"][2, 2] = math.inf
    assert math.isinf(update_norm(store, store_artifact(store, delta, FP32)))
    with pytest.raises(MissingContent) as absent:
        update_norm(store, f"b3:{'ab' * 32}")
    assert absent.value.ids == [f"b3:{'ab' * 32}"]
    manifest = store.get_manifest(artifact)
    assert manifest is not None
    lost = manifest.chunks[0].cid
    (store.root / "chunks" / lost[3:5] / lost[3:]).unlink()
    with pytest.raises(MissingContent) as missing:
        update_norm(store, artifact)
    assert missing.value.ids == [lost]


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("with_momentum", [True, False])
def test_float32_rounds_under_every_codec_merge_alike(tmp_path: Path, nesterov: bool, with_momentum: bool) -> None:
    """The daemon's usual round: float32 updates under the float codecs, int8 blocks that slices split."""
    store = ContentStore(tmp_path)
    chunking = FixedChunking(4096)
    shapes = {"embed": (40, 130), "scale": (), "empty": (0, 3), "head": (3, 1501)}
    weights_id = store_artifact(store, state(shapes, 0), FP32, chunking)
    momentum_id = store_artifact(store, state(shapes, 1, 0.01), FP32, chunking) if with_momentum else None
    codecs: tuple[Codec, ...] = (FP32, BF16, INT8, Int8Codec(100), Int8Codec(7))
    updates = [
        StoredUpdate(f"b3:{i:064x}", 50 + 7 * i, store_artifact(store, state(shapes, 10 + i, 0.01), codec, chunking))
        for i, codec in enumerate(codecs)
    ]
    merge_rule = outer_rule("mean", 0.7, 0.9, nesterov, 0.0, 0.0)
    expected = reference(store, weights_id, momentum_id, updates, merge_rule, None, chunking)
    for workers, slice_elements in ((1, 333), (3, 1000), (2, 1 << 18)):
        streamed = merge_from_store(
            store, weights_id, momentum_id, updates, merge_rule,
            chunking=chunking, slice_elements=slice_elements, workers=workers, norms=known_norms(store, updates),
        )
        assert_same_head(store, streamed, expected)


class CountingStore(ContentStore):
    """A store that counts the chunks read from it."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads: Counter[str] = Counter()

    def read_into(self, cid: str, out: np.ndarray) -> bool:
        self.reads[cid] += 1
        return super().read_into(cid, out)


def test_with_norms_known_each_input_chunk_is_read_once(tmp_path: Path) -> None:
    """Reading is hashing: the merge reads every input chunk once, even where slices share it."""
    store = CountingStore(tmp_path)
    shapes = {"layer": ((1 << 20) + 777,), "bias": (300,)}
    chunking = FixedChunking(1 << 18)
    weights_id = store_artifact(store, state(shapes, 0), FP32, chunking)
    momentum_id = store_artifact(store, state(shapes, 1, 0.01), FP32, chunking)
    updates = [
        StoredUpdate(f"b3:{i:064x}", 64, store_artifact(store, state(shapes, i + 2, 0.01), INT8, chunking))
        for i in range(3)
    ]
    norms = known_norms(store, updates)
    store.reads.clear()
    result = merge_from_store(
        store, weights_id, momentum_id, updates, rule("mean"), slice_elements=10_000, workers=2, norms=norms
    )
    assert result is not None and len(result.included) == 3
    inputs = [store.get_manifest(i) for i in (weights_id, momentum_id, *(u.artifact for u in updates))]
    expected = Counter(c.cid for m in inputs if m is not None for c in m.chunks)
    assert store.reads == expected


def test_a_corrupt_update_chunk_at_merge_time_fails_the_merge_writes_no_head_and_a_refetch_repairs_it(
    tmp_path: Path,
) -> None:
    """A chunk that rots on disk between its arrival (norm measured) and the merge: the merge
    raises MissingContent for the round to retry, the rotten chunk is gone so that a fetch
    replaces it, and no new weights or momentum artifact is left whole in the store."""
    store = ContentStore(tmp_path)
    shapes = {"layer": (50_000,), "bias": (300,)}
    chunking = FixedChunking(1 << 14)
    weights_id = store_artifact(store, state(shapes, 0), FP32, chunking)
    momentum_id = store_artifact(store, state(shapes, 1, 0.01), FP32, chunking)
    updates = [
        StoredUpdate(f"b3:{i:064x}", 64, store_artifact(store, state(shapes, i + 2, 0.01), INT8, chunking))
        for i in range(3)
    ]
    norms = known_norms(store, updates)
    expected = reference(store, weights_id, momentum_id, updates, rule("mean"), None, chunking)
    assert expected is not None
    manifest = store.get_manifest(updates[1].artifact)
    assert manifest is not None and len(manifest.chunks) > 2
    victim = manifest.chunks[len(manifest.chunks) // 2].cid
    original = store.get(victim)
    assert original is not None
    path = store._path("chunks", victim)
    rotten = bytearray(path.read_bytes())
    rotten[len(rotten) // 2] ^= 0xFF  # same size: only reading it whole finds out
    path.write_bytes(bytes(rotten))

    with pytest.raises(MissingContent):
        merge_from_store(
            store, weights_id, momentum_id, updates, rule("mean"),
            chunking=chunking, slice_elements=SLICE, workers=2, norms=norms,
        )
    assert not store.has(victim)
    for artifact in (expected.weights_id, expected.momentum_id):
        written = store.get_manifest(artifact)
        assert written is None or store.missing(c.cid for c in written.chunks), "a half-written head is whole"

    store.put(original)  # what the exchange's refetch does
    repaired = merge_from_store(
        store, weights_id, momentum_id, updates, rule("mean"),
        chunking=chunking, slice_elements=SLICE, workers=2, norms=norms,
    )
    assert_same_head(store, repaired, expected)
