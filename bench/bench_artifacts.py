"""Throughput of state dict <-> artifact (memory and store) against safetensors and a naive baseline.

Run from the repository root: python -m bench.bench_artifacts [--layers 11] [--repeats 3]
"""

from __future__ import annotations

import argparse
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from node.artifacts import decode_state_dict, encode_state_dict, load_artifact, store_artifact
from node.store import ContentStore
from protocol.chunking import Chunking, ContentDefinedChunking, FixedChunking
from protocol.codecs import BF16, FP32, INT8, Codec
from protocol.manifest import join_chunks

NAIVE_SAMPLE = 1_000_000


def gpt_like_state_dict(layers: int, width: int = 768, vocab: int = 32_000) -> dict[str, torch.Tensor]:
    """A decoder-shaped state dict: ~24.6M embedding parameters plus ~7.1M per layer."""
    generator = torch.Generator().manual_seed(0)
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (vocab, width)}
    for i in range(layers):
        shapes |= {
            f"layers.{i}.attn.qkv.weight": (3 * width, width),
            f"layers.{i}.attn.qkv.bias": (3 * width,),
            f"layers.{i}.attn.out.weight": (width, width),
            f"layers.{i}.mlp.up.weight": (4 * width, width),
            f"layers.{i}.mlp.down.weight": (width, 4 * width),
            f"layers.{i}.norm1.scale": (width,),
            f"layers.{i}.norm2.scale": (width,),
        }
    shapes["norm.scale"] = (width,)
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def best_of(repeats: int, run: Callable[[], Any]) -> tuple[float, Any]:
    """The fastest of ``repeats`` runs (the first also pays for first-touch page faults)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def naive_pack(values: list[float]) -> bytes:
    return b"".join(struct.pack("<f", v) for v in values)


def naive_unpack(data: bytes) -> torch.Tensor:
    return torch.tensor([struct.unpack_from("<f", data, i)[0] for i in range(0, len(data), 4)])


class Table:
    """Prints each timing as it lands and keeps it for the closing ratios."""

    def __init__(self, megabytes: float) -> None:
        self.megabytes = megabytes
        self.seconds: dict[str, float] = {}

    def add(self, label: str, seconds: float) -> None:
        self.seconds[label] = seconds
        print(f"{label:<56} {seconds:8.3f} s {self.megabytes / seconds:8.0f} MB/s", flush=True)

    def ratio(self, slower: str, faster: str) -> float:
        return self.seconds[slower] / self.seconds[faster]


def bench_artifacts(table: Table, tensors: dict[str, torch.Tensor], repeats: int) -> None:
    configs: list[tuple[str, Codec, Chunking]] = [
        ("fp32, fixed 1 MiB", FP32, FixedChunking()),
        ("fp32, FastCDC 256K/1M/4M", FP32, ContentDefinedChunking()),
        ("bf16, fixed 1 MiB", BF16, FixedChunking()),
        ("int8/256, fixed 1 MiB", INT8, FixedChunking()),
    ]
    for label, codec, chunking in configs:
        seconds, artifact = best_of(repeats, lambda: encode_state_dict(tensors, codec, chunking))
        table.add(f"artifact encode+chunk+hash [{label}]", seconds)
        chunks = [bytes(chunk) for chunk in artifact.chunks]  # as if received from peers
        manifest = artifact.manifest
        seconds, _ = best_of(repeats, lambda: decode_state_dict(manifest, join_chunks(manifest, chunks)))
        table.add(f"artifact verify+join+decode [{label}]", seconds)
        del artifact, chunks


def bench_disk(table: Table, tensors: dict[str, torch.Tensor], repeats: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        store = ContentStore(f"{directory}/store")
        seconds, manifest_id = best_of(1, lambda: store_artifact(store, tensors))
        table.add("store_artifact into a store (synced) [fp32]", seconds)
        seconds, _ = best_of(repeats, lambda: load_artifact(store, manifest_id))
        table.add("load_artifact from the store (verified) [fp32]", seconds)
        path = Path(directory) / "model.safetensors"
        seconds, _ = best_of(repeats, lambda: safetensors.torch.save_file(tensors, path))
        table.add("safetensors save_file (not synced)", seconds)
        seconds, _ = best_of(repeats, lambda: safetensors.torch.load(path.read_bytes()))
        table.add("safetensors read file + load", seconds)


def bench_baselines(table: Table, tensors: dict[str, torch.Tensor], repeats: int, params: int) -> None:
    seconds, blob = best_of(repeats, lambda: safetensors.torch.save(tensors))
    table.add("safetensors save to bytes (no hash)", seconds)
    seconds, _ = best_of(repeats, lambda: safetensors.torch.load(blob))
    table.add("safetensors load from bytes (no hash)", seconds)
    del blob
    # A per-parameter Python loop over 100M values takes minutes: time 1M and scale up.
    sample = tensors["embed.weight"].reshape(-1)[:NAIVE_SAMPLE]
    scale = params / NAIVE_SAMPLE
    start = time.perf_counter()
    packed = naive_pack(sample.tolist())
    table.add("naive tolist+struct.pack (1M measured, scaled)", (time.perf_counter() - start) * scale)
    start = time.perf_counter()
    assert torch.equal(naive_unpack(packed), sample)
    table.add("naive struct.unpack+tensor (1M measured, scaled)", (time.perf_counter() - start) * scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=11, help="11 layers give ~102.5M parameters")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    tensors = gpt_like_state_dict(args.layers)
    params = sum(t.numel() for t in tensors.values())
    table = Table(params * 4 / 1e6)
    print(f"state dict: {len(tensors)} tensors, {params / 1e6:.1f}M fp32 params, {table.megabytes:.0f} MB")
    print(f"best of {args.repeats} runs; MB/s counts fp32 source bytes\n")
    bench_artifacts(table, tensors, args.repeats)
    bench_disk(table, tensors, args.repeats)
    bench_baselines(table, tensors, args.repeats, params)
    print()

    encode = "artifact encode+chunk+hash [fp32, fixed 1 MiB]"
    decode = "artifact verify+join+decode [fp32, fixed 1 MiB]"
    for name, encoder, decoder in [
        ("safetensors in memory", "safetensors save to bytes (no hash)",
         "safetensors load from bytes (no hash)"),
        ("naive", "naive tolist+struct.pack (1M measured, scaled)",
         "naive struct.unpack+tensor (1M measured, scaled)"),
    ]:
        print(
            f"fp32 artifact vs {name}: encode {table.ratio(encoder, encode):.2f}x,"
            f" decode {table.ratio(decoder, decode):.2f}x as fast"
        )


if __name__ == "__main__":
    main()
