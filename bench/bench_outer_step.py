"""Outer-step cost: decode 8 int8 pseudo-gradients and merge them (screen, mean, Nesterov) against a bandwidth floor.

The floor is measured in the same run: in-place adds over the same bytes the merge
must touch at least once (read every update, weights and momentum; write weights and
momentum), so the ratio says how far the deterministic merge is from memory speed.

Run from the repository root: python -m bench.bench_outer_step [--params 100e6] [--updates 8]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from node.artifacts import decode_state_dict, encode_state_dict
from node.merge import UpdateInput, merge, outer_rule
from protocol.codecs import INT8

GB = 1e9


def model(params: float, width: int = 4096) -> dict[str, torch.Tensor]:
    """A state dict of ``params`` fp32 parameters in width x width matrices plus a remainder."""
    generator = torch.Generator().manual_seed(0)
    total, tensors, index = int(params), {}, 0
    while total > 0:
        size = min(total, width * width)
        rows = max(size // width, 1)
        shape = (rows, width) if rows * width == size else (size,)
        tensors[f"layer{index}.weight"] = torch.randn(shape, generator=generator) * 0.02
        total -= size
        index += 1
    return tensors


def best_of(repeats: int, run: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=100e6)
    parser.add_argument("--updates", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    weights = model(args.params)
    momentum = {k: v * 0.1 for k, v in weights.items()}
    nbytes = sum(t.numel() * 4 for t in weights.values())
    print(f"model: {nbytes / 4 / 1e6:.1f}M fp32 parameters ({nbytes / GB:.2f} GB), {args.updates} int8 updates, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    encoded = [encode_state_dict({k: v * 0.01 * (i + 1) for k, v in weights.items()}, INT8) for i in range(args.updates)]
    decode_s = best_of(args.repeats, lambda: [decode_state_dict(a.manifest, a.stream) for a in encoded])
    decoded = [decode_state_dict(a.manifest, a.stream) for a in encoded]
    int8_bytes = sum(a.manifest.size for a in encoded)
    print(f"decode {args.updates} int8 artifacts: {decode_s:.3f} s "
          f"({int8_bytes / GB / decode_s:.2f} GB/s in, {args.updates * nbytes / GB / decode_s:.2f} GB/s fp32 out)")

    updates = [UpdateInput(f"b3:{i:064x}", 64 * (i + 1), d) for i, d in enumerate(decoded)]
    rule = outer_rule("mean", 0.7, 0.9, True, 0.2, 3.0)
    merge_s = best_of(args.repeats, lambda: merge(weights, momentum, updates, rule))

    # The floor: every byte the merge needs, touched once, with in-place adds.
    acc = {k: torch.zeros_like(v) for k, v in weights.items()}
    out_w = {k: v.clone() for k, v in weights.items()}
    out_m = {k: v.clone() for k, v in momentum.items()}

    def floor() -> None:
        for name in weights:
            total = acc[name]
            total.zero_()
            for update in decoded:
                total.add_(update[name])
            out_m[name].add_(total)
            out_w[name].add_(out_m[name])

    floor_s = best_of(args.repeats, floor)
    # Bytes moved by the floor: each add reads two tensors and writes one.
    floor_bytes = nbytes * (1 + 3 * args.updates + 3 + 3)
    touched = nbytes * (args.updates + 4)  # read updates, weights, momentum; write weights, momentum
    print(f"floor (in-place adds): {floor_s:.3f} s, {floor_bytes / GB / floor_s:.1f} GB/s")
    print(f"merge + Nesterov step: {merge_s:.3f} s, {touched / GB / merge_s:.2f} GB/s of necessary traffic, "
          f"{merge_s / floor_s:.2f}x the floor")
    print(f"outer step in all (decode + merge): {decode_s + merge_s:.3f} s")


if __name__ == "__main__":
    main()
