"""Torch state dicts as content-addressed artifacts: encode, store, load, export to safetensors."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from node.store import ContentStore, fsync_dir
from protocol.chunking import Chunking, FixedChunking
from protocol.codecs import BF16, FP32, RAW, Codec
from protocol.manifest import (
    Artifact,
    Manifest,
    TensorSource,
    build_artifact,
    chunks_by_id,
)

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


class MissingContent(LookupError):
    """The store lacks a manifest or some of its chunks; ``ids`` lists what to fetch."""

    def __init__(self, ids: list[str]) -> None:
        super().__init__(f"{len(ids)} item(s) missing, first {ids[0]}" if ids else "nothing missing")
        self.ids = ids


def tensor_sources(tensors: Mapping[str, torch.Tensor], codec: Codec = FP32) -> list[TensorSource]:
    """Describe a state dict for ``build_artifact``: floating tensors use ``codec``, the rest
    are stored raw. CPU float32, float16 and integer tensors are passed as zero-copy views."""
    sources = []
    for name, tensor in tensors.items():
        dtype = _DTYPE_NAMES.get(tensor.dtype)
        if dtype is None:
            raise ValueError(f"{name}: unsupported dtype {tensor.dtype}")
        values = tensor.detach().cpu()
        if values.dtype == torch.bfloat16:
            # numpy has no bfloat16; float32 holds every bfloat16 value exactly.
            values = values.float()
        chosen = codec if tensor.is_floating_point() else RAW
        sources.append(TensorSource(name, values.numpy(), chosen, dtype))
    return sources


def encode_state_dict(
    tensors: Mapping[str, torch.Tensor],
    codec: Codec = FP32,
    chunking: Chunking = FixedChunking(),
    binding: str | None = None,
) -> Artifact:
    """Encode, chunk and hash a state dict in memory, keeping its order."""
    return build_artifact(tensor_sources(tensors, codec), chunking, binding)


def decode_state_dict(manifest: Manifest, stream: np.ndarray) -> dict[str, torch.Tensor]:
    """Tensors in their source dtypes, in manifest order. Raw tensors, float32 under fp32 and
    bfloat16 under bf16 are views over ``stream`` (no copies); the rest are decoded anew."""
    if stream.size != manifest.size:
        raise ValueError(f"stream has {stream.size} bytes, manifest {manifest.size}")
    tensors = {}
    for entry in manifest.tensors:
        target = TORCH_DTYPES[entry.dtype]
        if entry.codec == BF16 and target == torch.bfloat16:
            bits = entry.encoded_bytes(stream).view(np.int16)
            tensors[entry.name] = torch.from_numpy(bits).view(torch.bfloat16).reshape(entry.shape)
        else:
            tensors[entry.name] = torch.from_numpy(entry.values(stream)).to(target)
    return tensors


def store_artifact(
    store: ContentStore,
    tensors: Mapping[str, torch.Tensor],
    codec: Codec = FP32,
    chunking: Chunking = FixedChunking(),
    binding: str | None = None,
) -> str:
    """Encode a state dict into ``store``; return its manifest id. The manifest is written
    last, so a stored manifest always has its chunks (until GC removes unpinned ones)."""
    artifact = encode_state_dict(tensors, codec, chunking, binding)
    distinct = chunks_by_id(artifact)
    store.put_many(distinct.values(), distinct.keys())
    return store.put_manifest(artifact.manifest.encoded, artifact.manifest.artifact_id)


def read_stream(store: ContentStore, manifest_id: str) -> tuple[Manifest, np.ndarray]:
    """A stored artifact's manifest and byte stream, every chunk verified on the way in.
    Raises MissingContent listing the ids the store lacks."""
    manifest = store.get_manifest(manifest_id)
    if manifest is None:
        raise MissingContent([manifest_id])
    stream = np.empty(manifest.size, dtype=np.uint8)
    missing = []
    for ref, offset in zip(manifest.chunks, manifest.chunk_offsets()):
        if not store.read_into(ref.cid, stream[offset : offset + ref.size]):
            missing.append(ref.cid)
    if missing:
        raise MissingContent(list(dict.fromkeys(missing)))
    return manifest, stream


def load_artifact(store: ContentStore, manifest_id: str) -> dict[str, torch.Tensor]:
    """A stored artifact as an ordered dict of CPU tensors in their source dtypes."""
    return decode_state_dict(*read_stream(store, manifest_id))


def materialise_safetensors(store: ContentStore, manifest_id: str, path: str | os.PathLike[str]) -> None:
    """Write a stored artifact as a standard .safetensors file, atomically.

    Each tensor has its source dtype (bf16 and int8 codecs are decoded back to it, so an
    int8-coded float32 tensor is written as its dequantised float32 values); the file's
    metadata names the artifact id.
    """
    save_safetensors(load_artifact(store, manifest_id), Path(path), {"artifact": manifest_id})


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write ``tensors`` as a .safetensors file atomically (temp file, fsync, rename, fsync the folder)."""
    fd, temp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        safetensors.torch.save_file(dict(tensors), temp, metadata=metadata)
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
