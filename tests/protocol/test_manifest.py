import copy
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import canonical
from protocol.chunking import ContentDefinedChunking, FixedChunking
from protocol.cid import content_id
from protocol.codecs import BF16, FP32, INT8, RAW, Int8Codec
from protocol.errors import Invalid
from protocol.manifest import (
    ALIGN,
    MAX_MANIFEST_SIZE,
    Artifact,
    TensorSource,
    build_artifact,
    chunks_by_id,
    decode_tensors,
    join_chunks,
    parse_manifest,
)

RNG = np.random.default_rng(7)


def sample_sources() -> list[TensorSource]:
    rng = np.random.default_rng(7)
    return [
        TensorSource("embed.weight", rng.standard_normal((64, 33)).astype(np.float32), FP32),
        TensorSource("block.0.norm", rng.standard_normal(33).astype(np.float16), BF16),
        TensorSource("block.0.mlp", rng.standard_normal((50, 21)).astype(np.float32), Int8Codec(64)),
        TensorSource("steps", np.array(12345, dtype=np.int64)),
        TensorSource("mask", rng.random(7) > 0.5),
        TensorSource("empty", np.zeros((0, 4), dtype=np.float32), FP32),
        TensorSource("bf16.weight", rng.standard_normal(10).astype(np.float32), BF16, dtype="bfloat16"),
    ]


def sample_artifact(chunking: FixedChunking | ContentDefinedChunking = FixedChunking(1024)) -> Artifact:
    return build_artifact(sample_sources(), chunking)


def test_round_trip_through_bytes_chunks_and_values() -> None:
    sources = sample_sources()
    artifact = build_artifact(sources, FixedChunking(1024))
    parsed = parse_manifest(artifact.manifest.encoded)
    assert parsed == artifact.manifest
    assert parsed.encoded == artifact.manifest.encoded
    assert parsed.artifact_id == content_id(artifact.manifest.encoded)
    decoded = decode_tensors(parsed, join_chunks(parsed, artifact.chunks))
    assert list(decoded) == [s.name for s in sources]
    for source in sources:
        value = decoded[source.name]
        assert value.shape == source.array.shape
        if source.codec in (FP32, RAW):
            assert value.tobytes() == source.array.astype(value.dtype).tobytes()
        else:
            assert np.allclose(value, source.array, rtol=2**-7, atol=0.05)


def test_layout_is_aligned_and_padding_is_zero() -> None:
    artifact = sample_artifact()
    end = 0
    for entry in artifact.manifest.tensors:
        assert entry.offset % ALIGN == 0
        assert not artifact.stream[end : entry.offset].any()
        end = entry.offset + entry.length
    assert end == artifact.manifest.size == len(artifact.stream)


def test_building_is_deterministic() -> None:
    assert sample_artifact().manifest.artifact_id == sample_artifact().manifest.artifact_id


def test_chunks_are_views_over_the_stream() -> None:
    artifact = sample_artifact()
    assert b"".join(artifact.chunks) == artifact.stream.tobytes()
    assert all(np.shares_memory(np.frombuffer(c, np.uint8), artifact.stream) for c in artifact.chunks)


def test_identical_chunks_are_listed_once_by_id() -> None:
    zeros = [TensorSource(f"z{i}", np.zeros(1024, dtype=np.float32), FP32) for i in range(4)]
    artifact = build_artifact(zeros, FixedChunking(4096))
    assert len(artifact.manifest.chunks) == 4
    assert len(chunks_by_id(artifact)) == 1


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3000), st.sampled_from(["fp32", "bf16", "int8", "raw"])), max_size=6),
    st.sampled_from([FixedChunking(64), FixedChunking(4096), ContentDefinedChunking(64, 256, 1024)]),
)
def test_any_artifact_round_trips(specs: list[tuple[int, str]], chunking: Any) -> None:
    codecs = {"fp32": FP32, "bf16": BF16, "int8": INT8, "raw": RAW}
    sources = [
        TensorSource(f"t{i}", RNG.standard_normal(n).astype(np.float32), codecs[name])
        for i, (n, name) in enumerate(specs)
    ]
    artifact = build_artifact(sources, chunking)
    parsed = parse_manifest(artifact.manifest.encoded)
    decoded = decode_tensors(parsed, join_chunks(parsed, [bytes(c) for c in artifact.chunks]))
    for source in sources:
        exact = source.codec in (FP32, RAW)
        tolerance = {"rtol": 0, "atol": 0} if exact else {"rtol": 2**-7, "atol": 0.05}
        assert np.allclose(decoded[source.name], source.array, **tolerance)


def test_a_tampered_chunk_is_rejected_on_join() -> None:
    artifact = sample_artifact()
    chunks = [bytes(c) for c in artifact.chunks]
    chunks[1] = bytes([chunks[1][0] ^ 1]) + chunks[1][1:]
    with pytest.raises(Invalid) as info:
        join_chunks(artifact.manifest, chunks)
    assert info.value.reason == "bad_chunk"
    with pytest.raises(Invalid):
        join_chunks(artifact.manifest, chunks[:-1])


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        (TensorSource("a", np.arange(4), FP32), "bad_dtype"),
        (TensorSource("a", np.ones(4, np.float32), RAW, dtype="bfloat16"), "bad_dtype"),
        (TensorSource("a", np.ones(4, np.float32), RAW, dtype="int32"), "bad_dtype"),
        (TensorSource("a", np.ones(4, np.complex64), RAW), "bad_dtype"),
        (TensorSource("a", np.array([1.0, np.nan], np.float32), INT8), "non_finite"),
    ],
)
def test_build_rejects_what_no_manifest_could_describe(source: TensorSource, reason: str) -> None:
    with pytest.raises(Invalid) as info:
        build_artifact([source], FixedChunking())
    assert info.value.reason == reason


def test_build_rejects_repeated_names() -> None:
    twice = [TensorSource("a", np.ones(2, np.float32), FP32)] * 2
    with pytest.raises(Invalid):
        build_artifact(twice, FixedChunking())


def mutate(wire: dict[str, Any], path: tuple[Any, ...], value: Any) -> bytes:
    changed = copy.deepcopy(wire)
    target = changed
    for key in path[:-1]:
        target = target[key]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return canonical.encode(changed)


DELETE = object()
BAD_EDITS = [
    (("size",), 1, "chunk_layout"),
    (("size",), -1, "malformed"),
    (("kind",), "head", "wrong_kind"),
    (("version",), 2, "unknown_version"),
    (("extra",), 1, "malformed"),
    (("binding",), "not a content id", "malformed"),
    (("binding",), 7, "malformed"),
    (("chunking",), {"mode": "fixed", "size": 2048}, "chunk_layout"),
    (("chunking",), {"mode": "zstd"}, "bad_chunking"),
    (("chunks", 0, 0), "b3:" + "A" * 64, "bad_cid"),
    (("chunks", 0, 0), "sha256:00", "bad_cid"),
    (("chunks", 0, 1), 1023, "chunk_layout"),
    (("chunks", 0), ["b3:" + "0" * 64], "malformed"),
    (("tensors", 0, "codec"), "fp8", "unknown_codec"),
    (("tensors", 2, "params"), {"block": 0}, "bad_codec_params"),
    (("tensors", 0, "dtype"), "complex64", "bad_dtype"),
    (("tensors", 3, "codec"), "int8", "bad_codec_params"),
    (("tensors", 3, "dtype"), "bfloat16", "bad_dtype"),
    (("tensors", 1, "name"), "embed.weight", "bad_name"),
    (("tensors", 1, "name"), "", "bad_name"),
    (("tensors", 0, "shape"), [64, -33], "bad_shape"),
    (("tensors", 0, "shape"), [1] * 17, "bad_shape"),
    (("tensors", 0, "shape"), [1 << 30, 1 << 30], "bad_shape"),
    (("tensors", 0, "shape"), [64, 34], "tensor_layout"),
    (("tensors", 1, "offset"), 0, "tensor_layout"),
    (("tensors", 1, "offset"), 8512, "tensor_layout"),
    (("tensors", 1, "offset"), True, "tensor_layout"),
    (("tensors", 0, "length"), 8000, "tensor_layout"),
    (("tensors", 0, "extra"), 1, "malformed"),
    (("tensors", 6), DELETE, "size_mismatch"),
]


def test_a_bound_manifest_names_its_binding_and_an_unbound_one_is_unchanged() -> None:
    """An update's artifact names what it was made for; every other artifact keeps its id."""
    plain = sample_artifact().manifest
    assert "binding" not in plain.to_wire()
    binding = content_id(b"peer, base, round")
    bound = build_artifact(sample_sources(), FixedChunking(1024), binding).manifest
    assert parse_manifest(bound.encoded).binding == binding
    assert bound.artifact_id != plain.artifact_id
    assert bound.chunks == plain.chunks  # the same bytes: only the manifest differs


@pytest.mark.parametrize(("path", "value", "reason"), BAD_EDITS)
def test_inconsistent_manifests_are_rejected_with_a_reason(
    path: tuple[Any, ...], value: Any, reason: str
) -> None:
    wire = sample_artifact().manifest.to_wire()
    with pytest.raises(Invalid) as info:
        parse_manifest(mutate(wire, path, value))
    assert info.value.reason == reason


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_bytes_never_parse_to_a_different_meaning(data: st.DataObject) -> None:
    original = sample_artifact().manifest.encoded
    position = data.draw(st.integers(0, len(original) - 1))
    flip = data.draw(st.integers(1, 255))
    mutated = original[:position] + bytes([original[position] ^ flip]) + original[position + 1 :]
    try:
        parsed = parse_manifest(mutated)
    except Invalid:
        return
    # A byte can still land in free text (a name, a cid digit); then the id changes with it.
    assert parsed.encoded == mutated
    assert parsed.artifact_id != content_id(original)


@given(st.integers(0, 2000))
def test_truncated_manifests_are_rejected(cut: int) -> None:
    original = sample_artifact().manifest.encoded
    with pytest.raises(Invalid):
        parse_manifest(original[: min(cut, len(original) - 1)])


def test_non_canonical_and_oversized_manifests_are_rejected() -> None:
    wire = sample_artifact().manifest.to_wire()
    with pytest.raises(Invalid) as info:
        parse_manifest(canonical.encode(wire) + b"\x00")
    assert info.value.reason == "malformed"
    with pytest.raises(Invalid) as info:
        parse_manifest(b"\x00" * (MAX_MANIFEST_SIZE + 1))
    assert info.value.reason == "oversized"


def test_a_billion_parameter_manifest_fits_the_limits() -> None:
    # 1.1e9 fp32 parameters in 400 tensors, cut into 1 MiB chunks.
    per_tensor = 1_100_000_000 // 400
    tensors = []
    offset = 0
    for i in range(400):
        length = per_tensor * 4
        tensors.append(
            {"name": f"model.layers.{i}.mlp.weight", "shape": [per_tensor], "dtype": "float32",
             "codec": "fp32", "params": {}, "offset": offset, "length": length}
        )
        offset += length
    size = offset
    n_chunks = -(-size // (1 << 20))
    chunks = [[content_id(i.to_bytes(4, "big")), 1 << 20] for i in range(n_chunks)]
    chunks[-1][1] = size - (n_chunks - 1) * (1 << 20)
    wire = {"kind": "artifact", "version": 1, "size": size, "chunking": FixedChunking().to_wire(),
            "chunks": chunks, "tensors": tensors}
    encoded = canonical.encode(wire)
    assert len(encoded) < MAX_MANIFEST_SIZE / 8
    manifest = parse_manifest(encoded)
    assert len(manifest.chunks) == n_chunks and manifest.encoded == encoded


def test_values_that_only_compare_equal_are_rejected() -> None:
    wire = sample_artifact().manifest.to_wire()
    with pytest.raises(Invalid) as info:
        parse_manifest(mutate(wire, ("version",), True))
    assert info.value.reason == "unknown_version"
    with pytest.raises(Invalid) as info:
        parse_manifest(mutate(wire, ("tensors", 2, "params", "block"), 64.0))
    assert info.value.reason == "bad_codec_params"


def test_build_refuses_what_receivers_would_reject() -> None:
    with pytest.raises(Invalid):
        build_artifact([TensorSource("x" * 600, np.ones(2, np.float32), FP32)], FixedChunking())
    with pytest.raises(Invalid):
        build_artifact([TensorSource("deep", np.ones([1] * 17, np.float32), FP32)], FixedChunking())
