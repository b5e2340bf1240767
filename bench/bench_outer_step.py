"""Outer-step cost: decode 8 int8 pseudo-gradients and merge them (screen, mean, Nesterov) against a bandwidth floor.

The floor is measured in the same run: in-place adds over the same bytes the merge
must touch at least once (read every update, weights and momentum; write weights and
momentum), so the ratio says how far the deterministic merge is from memory speed.
``--streaming`` compares, from a real store, today's merge of fully decoded updates with
the streamed merge (node/streaming_merge.py), with its updates' norms measured as they
arrived and without, against a copy of the bytes a streamed merge must touch and against
the store's own work (verified reads of every input chunk, hashed and synced writes of the
new ones); each runs in its own process, which reports its time and peak RSS.

Run from the repository root:
python -m bench.bench_outer_step [--params 100e6] [--updates 8] [--streaming [--dir DIR]]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from node.artifacts import decode_state_dict, encode_state_dict, load_artifact, read_stream, store_artifact
from node.merge import UpdateInput, merge, outer_rule
from node.store import ContentStore
from node.streaming_merge import StoredUpdate, merge_from_store, update_norm
from protocol.chunking import FixedChunking
from protocol.codecs import FP32, INT8

GB = 1e9
FLOOR_SAMPLE = 3e9  # bytes: a larger model's floor copies this much of each input and scales the time


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


def in_memory(args: argparse.Namespace) -> None:
    """Decode and merge updates already in memory, against in-place adds over the same tensors."""
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


RULE = outer_rule("mean", 0.7, 0.9, True, 0.2, 3.0)
CHUNKING = FixedChunking()


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident set now, or its peak with ``VmHWM`` (Linux).

    Not ``ru_maxrss``: Linux carries it over an exec from the forked copy of the parent, so a
    child would report the bench's own footprint as its peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def forget(store: ContentStore, manifest_ids: list[str], keep: set[str]) -> None:
    """Delete a run's output artifacts, so that the next run writes them again instead of finding them."""
    for manifest_id in manifest_ids:
        manifest = store.get_manifest(manifest_id)
        if manifest is None:
            continue
        for chunk in manifest.chunks:
            if chunk.cid not in keep:
                (store.root / "chunks" / chunk.cid[3:5] / chunk.cid[3:]).unlink(missing_ok=True)
        (store.root / "manifests" / manifest_id[3:5] / manifest_id[3:]).unlink(missing_ok=True)


def floor_pass(store: ContentStore, spec: dict[str, object]) -> tuple[Callable[[], object], float]:
    """A copy of what a streamed merge must touch: every int8 update's bytes read once, the parent
    weights and momentum read once and new weights and momentum written once, on every core.

    Past ``FLOOR_SAMPLE`` bytes it copies the same share of each input and returns the factor
    that scales its time to the whole (memory speed does not depend on the size past caches)."""
    ids = [str(spec["weights"]), str(spec["momentum"]), *(str(u[2]) for u in spec["updates"])]  # type: ignore[attr-defined]
    manifests = [store.get_manifest(i) for i in ids]
    sizes = [m.size for m in manifests if m is not None]
    touched = sum(sizes) + sizes[0] + sizes[1]
    share = min(1.0, FLOOR_SAMPLE / touched)
    arrays = []
    for manifest in manifests:
        assert manifest is not None
        wanted = int(manifest.size * share)
        array = np.empty(sum(c.size for c in manifest.chunks[: -(-wanted // manifest.chunks[0].size)]), dtype=np.uint8)
        offset = 0
        for chunk in manifest.chunks:
            if offset >= array.size:
                break
            store.read_into(chunk.cid, array[offset : offset + chunk.size])
            offset += chunk.size
        arrays.append(array)
    inputs, updates = arrays[:2], arrays[2:]
    outputs = [np.empty_like(array) for array in inputs]
    for array in outputs:
        array.fill(0)  # fault the pages in: the floor is memory speed, not first-touch cost
    threads = len(os.sched_getaffinity(0))
    pieces = 64 * threads
    local = threading.local()

    def piece(index: int) -> None:
        if not hasattr(local, "buffer"):  # one small buffer per thread, so the update reads stay reads
            local.buffer = np.empty(max(u.size for u in updates) // pieces + 1, dtype=np.uint8)
        buffer = local.buffer
        for update in updates:
            low, high = update.size * index // pieces, update.size * (index + 1) // pieces
            np.copyto(buffer[: high - low], update[low:high])
        for source, target in zip(inputs, outputs):
            low, high = source.size * index // pieces, source.size * (index + 1) // pieces
            np.copyto(target[low:high], source[low:high])

    def run() -> None:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(piece, range(pieces)))

    copied = sum(a.size for a in arrays) + sum(a.size for a in inputs)
    return run, touched / copied


def store_pass(store: ContentStore, spec: dict[str, object]) -> Callable[[], list[str]]:
    """The store's part of a streamed merge, with no arithmetic: every input chunk read and
    verified once, and as many new bytes as the new weights and momentum (the parent's chunks
    with their bytes flipped, new content every run) hashed, written and synced in 4 MiB batches."""
    ids = [str(spec["weights"]), str(spec["momentum"]), *(str(u[2]) for u in spec["updates"])]  # type: ignore[attr-defined]
    manifests = [m for m in (store.get_manifest(i) for i in ids) if m is not None]
    parent = {c.cid for m in manifests[:2] for c in m.chunks}
    batches = [
        [(c.cid, c.size, c.cid in parent) for c in m.chunks[i : i + 4]]
        for m in manifests
        for i in range(0, len(m.chunks), 4)
    ]
    runs = iter(range(1, 256))
    local = threading.local()

    def batch(chunks: list[tuple[str, int, bool]], key: int) -> list[str]:
        if not hasattr(local, "buffer"):
            local.buffer = np.empty(4 * max(m.chunks[0].size for m in manifests), dtype=np.uint8)
        new = []
        offset = 0
        for cid, size, flip in chunks:
            out = local.buffer[offset : offset + size]
            if not store.read_into(cid, out):
                raise AssertionError(f"lost {cid}")
            if flip:
                np.bitwise_xor(out, key, out=out)
                new.append(out)
                offset += size
        return store.put_many([memoryview(n) for n in new]) if new else []

    def run() -> list[str]:
        key = next(runs)
        with ThreadPoolExecutor(8) as pool:
            return [cid for ids in pool.map(lambda b: batch(b, key), batches) for cid in ids]

    return run


def child(args: argparse.Namespace) -> None:
    """Run one path ``args.repeats`` times in this process; print its best time and peak RSS as JSON."""
    store = ContentStore(args.store)
    spec = json.loads(Path(args.spec).read_text())
    updates = [StoredUpdate(*u) for u in spec["updates"]]
    keep = set(spec["input_chunks"])
    before = rss_bytes()
    outputs: list[str] = []
    if args.child == "floor":
        copy, scale = floor_pass(store, spec)
        seconds = best_of(args.repeats, copy) * scale
    elif args.child == "norms":
        seconds = best_of(args.repeats, lambda: [update_norm(store, u.artifact) for u in updates])
    else:
        # Measured as each update arrives, while the round still trains: not part of the merge's time.
        norms = {u.artifact: update_norm(store, u.artifact) for u in updates} if args.child == "streaming" else None
        store_run = store_pass(store, spec) if args.child == "store" else None

        def run() -> list[str]:
            if store_run is not None:
                written = store_run()
                for cid in written:
                    (store.root / "chunks" / cid[3:5] / cid[3:]).unlink(missing_ok=True)
                return []
            if args.child in ("streaming", "cold"):
                result = merge_from_store(
                    store, spec["weights"], spec["momentum"], updates, RULE, chunking=CHUNKING, norms=norms
                )
                return [result.weights_id, result.momentum_id]
            weights = load_artifact(store, spec["weights"])
            momentum = load_artifact(store, spec["momentum"])
            inputs = [UpdateInput(u.update_id, u.samples, load_artifact(store, u.artifact)) for u in updates]
            merged = merge(weights, momentum, inputs, RULE)
            return [store_artifact(store, t, FP32, CHUNKING) for t in (merged.weights, merged.momentum)]

        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            outputs = run()
            times.append(time.perf_counter() - start)
            forget(store, outputs, keep)
        seconds = min(times)
    peak = rss_bytes("VmHWM")
    print(json.dumps({"seconds": seconds, "rss_before": before, "peak_rss": peak, "outputs": outputs}))


def available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def streaming(args: argparse.Namespace) -> None:
    """Write a parent and int8 updates into a store, then time each path in its own process."""
    with tempfile.TemporaryDirectory(prefix="bench-outer-", dir=args.dir) as root:
        store = ContentStore(root)
        # One set of tensors, scaled in place from parent to momentum to each update, so a model of
        # a billion parameters is built in one copy of itself (and one encoded stream at a time).
        tensors = model(args.params)
        nbytes = sum(t.numel() * 4 for t in tensors.values())
        spec: dict[str, object] = {"weights": store_artifact(store, tensors, FP32, CHUNKING)}
        scale = 0.1
        for tensor in tensors.values():
            tensor.mul_(scale)
        spec["momentum"] = store_artifact(store, tensors, FP32, CHUNKING)
        updates = []
        for i in range(args.updates):
            for tensor in tensors.values():
                tensor.mul_(0.01 * (i + 1) / scale)
            scale = 0.01 * (i + 1)
            updates.append([f"b3:{i:064x}", 64 * (i + 1), store_artifact(store, tensors, INT8, CHUNKING)])
        del tensors
        spec["updates"] = updates
        manifests = [store.get_manifest(str(i)) for i in (spec["weights"], spec["momentum"], *(u[2] for u in updates))]
        spec["input_chunks"] = sorted({c.cid for m in manifests if m is not None for c in m.chunks})
        update_bytes = sum(m.size for m in manifests[2:] if m is not None)
        spec_path = Path(root) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        threads = len(os.sched_getaffinity(0))
        print(f"model: {nbytes / 4 / 1e6:.1f}M fp32 parameters ({nbytes / GB:.2f} GB), {args.updates} int8 updates "
              f"({update_bytes / GB:.2f} GB) in a store with 1 MiB chunks, torch {torch.__version__}, {threads} cores")
        # Today's merge holds every decoded update, the parent, the new state and the int8 streams.
        needed = (args.updates + 6) * nbytes + update_bytes
        paths = ["floor", "store", "reference", "streaming", "cold", "norms"]
        if needed > 0.8 * available_memory():
            paths.remove("reference")
            print(f"today's merge skipped: it would need about {needed / GB:.0f} GB of memory, "
                  f"{available_memory() / GB:.0f} GB are available")
        results = {}
        for path in paths:
            command = [sys.executable, "-m", "bench.bench_outer_step", "--child", path, "--store", root,
                       "--spec", str(spec_path), "--repeats", str(args.repeats)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            results[path] = json.loads(done.stdout.strip().splitlines()[-1])
        touched = update_bytes + 4 * nbytes  # read updates, weights, momentum; write weights, momentum
        floor_s = results["floor"]["seconds"]
        sampled = " (timed on a share of it, scaled)" if touched > FLOOR_SAMPLE else ""
        print(f"floor (copy of the {touched / GB:.2f} GB a streamed merge must touch, {threads} threads){sampled}: "
              f"{floor_s:.3f} s, {touched / GB / floor_s:.1f} GB/s")
        print(f"{'from the store to stored weights and momentum':<48} {'time':>8} {'x floor':>8} "
              f"{'peak RSS':>9} {'above start':>12}")
        labels = {
            "store": "store's part alone: verified reads, synced writes",
            "reference": "decode all, merge, store (today)",
            "streaming": "streamed merge, norms measured on arrival",
            "cold": "streamed merge, norms measured in it",
            "norms": f"update_norm of the {args.updates} updates",
        }
        for path, label in labels.items():
            found = results.get(path)
            if found is None:
                continue
            above = (found["peak_rss"] - found["rss_before"]) / GB
            print(f"{label:<48} {found['seconds']:>7.2f}s {found['seconds'] / floor_s:>7.1f}x "
                  f"{found['peak_rss'] / GB:>7.2f} GB {above:>9.2f} GB")
        heads = {tuple(results[p]["outputs"]) for p in ("reference", "streaming", "cold") if p in results}
        print(f"same weights and momentum ids on every merge path: {len(heads) == 1}")
        if "reference" in results:
            ratio = results["reference"]["seconds"] / results["streaming"]["seconds"]
            print(f"streamed (norms on arrival) / today: {ratio:.1f}x faster")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=100e6)
    parser.add_argument("--updates", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--streaming", action="store_true", help="compare merges from a store, each in its own process")
    parser.add_argument("--dir", help="where the bench's store goes (a temporary folder in it, removed after)")
    parser.add_argument("--child", choices=("floor", "store", "reference", "streaming", "cold", "norms"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
    elif args.streaming:
        streaming(args)
    else:
        in_memory(args)


if __name__ == "__main__":
    main()
