from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

from node.artifacts import (
    MissingContent,
    decode_state_dict,
    encode_state_dict,
    load_artifact,
    materialise_safetensors,
    store_artifact,
    tensor_sources,
)
from node.store import ContentStore
from protocol.chunking import ContentDefinedChunking, FixedChunking
from protocol.codecs import BF16, FP32, INT8
from protocol.manifest import join_chunks, parse_manifest


def state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(300, 64, generator=generator),
        "layers.0.attn.qkv": torch.randn(64, 192, generator=generator).to(torch.bfloat16),
        "layers.0.norm.scale": torch.randn(64, generator=generator).to(torch.float16),
        "layers.0.mlp.bias": torch.randn(7, generator=generator).double(),
        "head.weight": torch.randn(64, 300, generator=generator).t(),  # not contiguous
        "steps": torch.tensor(42),
        "token_mask": torch.rand(33, generator=generator) > 0.5,
        "empty": torch.zeros(0, 5),
    }


def assert_same(loaded: dict[str, torch.Tensor], source: dict[str, torch.Tensor]) -> None:
    assert list(loaded) == list(source)
    for name, tensor in source.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        assert torch.equal(loaded[name], tensor), name


def test_store_and_load_are_exact_with_fp32(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    source = state_dict()
    manifest_id = store_artifact(store, source, codec=FP32, chunking=FixedChunking(16 << 10))
    assert_same(load_artifact(store, manifest_id), source)
    assert_same(load_artifact(ContentStore(tmp_path), manifest_id), source)


def test_bf16_is_exact_for_bfloat16_tensors_and_close_for_the_rest(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    source = state_dict()
    loaded = load_artifact(store, store_artifact(store, source, codec=BF16))
    assert torch.equal(loaded["layers.0.attn.qkv"], source["layers.0.attn.qkv"])
    assert torch.equal(loaded["steps"], source["steps"])
    weight = source["embed.weight"]
    assert loaded["embed.weight"].dtype == torch.float32
    assert ((loaded["embed.weight"] - weight).abs() <= weight.abs() * 2**-8).all()


def test_int8_stays_within_half_a_block_scale(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    source = state_dict()
    loaded = load_artifact(store, store_artifact(store, source, codec=INT8))
    weight = source["embed.weight"].reshape(-1, 256)
    scale = weight.abs().amax(dim=1, keepdim=True) / 127
    error = (loaded["embed.weight"].reshape(-1, 256) - weight).abs()
    assert (error <= scale / 2 * (1 + 1e-5)).all()
    assert torch.equal(loaded["token_mask"], source["token_mask"])


def test_fp32_tensors_pass_through_without_copies() -> None:
    source = state_dict()
    sources = tensor_sources(source)
    assert np.shares_memory(sources[0].array, source["embed.weight"].numpy())
    artifact = encode_state_dict(source)
    manifest = parse_manifest(artifact.manifest.encoded)
    stream = join_chunks(manifest, artifact.chunks)
    decoded = decode_state_dict(manifest, stream)
    assert np.shares_memory(decoded["embed.weight"].numpy(), stream)
    assert_same(decoded, source)


def test_bf16_round_trip_of_bfloat16_is_a_view() -> None:
    source = {"w": torch.randn(1000).to(torch.bfloat16)}
    artifact = encode_state_dict(source, codec=BF16)
    decoded = decode_state_dict(artifact.manifest, artifact.stream)
    assert torch.equal(decoded["w"], source["w"])
    assert np.shares_memory(decoded["w"].view(torch.int16).numpy(), artifact.stream)


def test_unsupported_dtypes_are_refused() -> None:
    with pytest.raises(ValueError):
        encode_state_dict({"z": torch.zeros(3, dtype=torch.complex64)})


def test_missing_chunks_are_listed(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    manifest_id = store_artifact(store, state_dict(), chunking=FixedChunking(4096))
    manifest = store.get_manifest(manifest_id)
    assert manifest is not None
    lost = manifest.chunks[3].cid
    (tmp_path / "chunks" / lost[3:5] / lost[3:]).unlink()
    with pytest.raises(MissingContent) as info:
        load_artifact(store, manifest_id)
    assert info.value.ids == [lost]
    with pytest.raises(MissingContent):
        load_artifact(store, "b3:" + "0" * 64)


def test_similar_models_share_most_chunks(tmp_path: Path) -> None:
    # What delta distribution relies on: a peer with one head fetches only what changed.
    store = ContentStore(tmp_path)
    chunking = ContentDefinedChunking(1024, 4096, 16384)
    generator = torch.Generator().manual_seed(7)
    first = {f"layer{i}": torch.randn(4096, generator=generator) for i in range(16)}
    store_artifact(store, first, chunking=chunking)
    second = dict(first)
    second["layer7"] = torch.randn(4096, generator=generator)
    artifact = encode_state_dict(second, chunking=chunking)
    missing = store.missing(c.cid for c in artifact.manifest.chunks)
    # One of 16 equal layers changed: its own chunks plus at most the boundary chunks on either side.
    changed_bytes = sum(c.size for c in artifact.manifest.chunks if c.cid in set(missing))
    assert 0 < len(missing) <= len(artifact.manifest.chunks) // 4
    assert changed_bytes <= 3 * 16384


@pytest.mark.parametrize("codec", [FP32, BF16, INT8])
def test_materialised_safetensors_load_with_plain_safetensors(tmp_path: Path, codec: object) -> None:
    store = ContentStore(tmp_path / "store")
    source = state_dict()
    manifest_id = store_artifact(store, source, codec=codec)  # type: ignore[arg-type]
    path = tmp_path / "model.safetensors"
    materialise_safetensors(store, manifest_id, path)
    loaded = safetensors.torch.load_file(path)
    assert_same({name: loaded[name] for name in source}, load_artifact(store, manifest_id))
    if codec is FP32:
        assert_same({name: loaded[name] for name in source}, source)
    with safetensors.safe_open(path, "pt") as handle:
        assert handle.metadata() == {"artifact": manifest_id}
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["model.safetensors"]
