"""Inner-loop throughput inside a running daemon against the bare torch loop, in one process.

The daemon here is a real Node started in this process (its own libp2p host,
gossip, heartbeats, status port) joined to trainer peers started as
subprocesses, so lease, update and head records keep arriving while it trains.
It runs as a consumer, which leaves its Trainer to this script: each daemon run
is one ``Trainer.train_round`` (worker thread) of N steps on the event loop.
Each bare run is ``workload.train`` for the same N steps called straight from
the same thread that runs the loop, so the daemon is frozen meanwhile (its
libp2p thread still runs). Runs alternate to spread machine noise evenly.

Run from the repository root:
    python -m bench.bench_inner_loop [--steps 20] [--repeats 7] [--threads 1] [--peers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import torch
import uvloop

from node.config import load_config
from node.daemon import Node
from tests.swarm_harness import Peer, Swarm, wait_until
from workloads.base import Workload
from workloads.registry import load_workload

CHARLM = {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 64, "batch_size": 16}
TOML = (
    '[workload]\nname = "charlm"\n[workload.options]\n'
    + "".join(f"{k} = {v}\n" for k, v in CHARLM.items())
    + "\n[training]\nrole = \"{role}\"\ninner_steps = {inner_steps}\nevaluate = false\nlease_settle_s = 0.5\n"
)


def bare_run(workload: Workload, base: dict[str, torch.Tensor], data: list[bytes], steps: int, seed: int) -> tuple[float, float]:
    """(train-loop seconds, whole-call seconds) of the plain loop on a fresh model and optimizer."""
    started = time.perf_counter()
    model = workload.init_model(0, "cpu")
    with torch.no_grad():
        model.load_state_dict(base)
    state = workload.new_inner_state(model)
    metrics = workload.train(model, state, data, steps, "cpu", seed=seed)
    assert metrics.steps == steps
    return metrics.seconds, time.perf_counter() - started


async def bench(args: argparse.Namespace, root: Path) -> None:
    swarm = Swarm(root, swarm="bench")
    peers = [swarm.add(TOML.format(role="trainer", inner_steps=args.peer_steps)) for _ in range(args.peers)]
    # The in-process daemon's config; dead_after_missed covers a bare run freezing its loop.
    own = swarm.add(TOML.format(role="consumer", inner_steps=args.steps), heartbeat_s=1.0)
    config = load_config(str(own.config_path), {"membership.dead_after_missed": "30", "node.log_level": "warning"})
    for peer in peers:
        peer.start({"OMP_NUM_THREADS": "1"})
    node = Node(config)
    serving = asyncio.create_task(node.run())
    try:
        await _wait_ready(node, peers)
        trainer = node.outer.trainer  # type: ignore[union-attr]
        await trainer.prepare()
        workload = trainer.workload
        base = trainer.initial_weights()
        data = [workload.microshard_bytes(i) for i in range(2)]
        bare_run(workload, base, data, 2, 0)  # warm-up: allocator, kernels
        await trainer.train_round(base, data, 2, 0)

        bare_loop, bare_call, daemon_loop, daemon_call = [], [], [], []
        accepted_before = dict(node.gossip.stats()["accepted"])  # type: ignore[union-attr]
        for repeat in range(args.repeats):
            loop_s, call_s = bare_run(workload, base, data, args.steps, repeat)
            bare_loop.append(loop_s)
            bare_call.append(call_s)
            started = time.perf_counter()
            result = await trainer.train_round(base, data, args.steps, repeat)
            daemon_call.append(time.perf_counter() - started)
            daemon_loop.append(result.metrics.seconds)
            print(f"  run {repeat}: bare {args.steps / loop_s:7.2f} steps/s, daemon {args.steps / result.metrics.seconds:7.2f} steps/s", flush=True)
        accepted_after = dict(node.gossip.stats()["accepted"])  # type: ignore[union-attr]
        status = await asyncio.to_thread(own.get, "/status") or {}
    finally:
        node.request_stop()
        await asyncio.wait_for(serving, 30)
        swarm.stop_all()

    def rate(seconds: list[float]) -> float:
        return args.steps / statistics.median(seconds)

    print(f"charlm {CHARLM}, {args.steps} steps per run, {args.repeats} alternating runs, torch threads {torch.get_num_threads()}")
    print(f"swarm while measuring: {len(peers)} trainer peers (inner_steps {args.peer_steps}), live peers seen "
          f"{status.get('peers', {}).get('live')}, canonical round {status.get('training', {}).get('head_round')}")
    arrived = {kind: n - accepted_before.get(kind, 0) for kind, n in sorted(accepted_after.items())}
    print(f"records the daemon accepted while measuring: {arrived}")
    for label, bare, daemon in (("train loop", bare_loop, daemon_loop), ("whole call", bare_call, daemon_call)):
        print(f"{label:>10}: bare {rate(bare):7.2f} steps/s, daemon {rate(daemon):7.2f} steps/s, "
              f"ratio {rate(daemon) / rate(bare):.3f} (median of {args.repeats})")


async def _wait_ready(node: Node, peers: list[Peer]) -> None:
    deadline = time.monotonic() + 120
    while node.outer is None or node.outer.heads is None or node.membership is None:
        if time.monotonic() > deadline:
            raise RuntimeError("the in-process node did not start")
        await asyncio.sleep(0.2)
    await asyncio.to_thread(lambda: [p.wait_healthy(120) for p in peers])
    want = {p.peer_id for p in peers}
    await asyncio.to_thread(
        wait_until, lambda: want <= set(node.membership.table.live()), 120, 0.5, "the trainer peers to be live"  # type: ignore[union-attr]
    )
    # Let the trainers get a few rounds going so records are flowing while we measure.
    await asyncio.to_thread(
        wait_until, lambda: node.outer.heads.canonical().round >= 2, 120, 0.5, "the swarm to merge two rounds"  # type: ignore[union-attr]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="inner steps per timed run")
    parser.add_argument("--repeats", type=int, default=7, help="alternating bare/daemon pairs")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads, the same for both")
    parser.add_argument("--peers", type=int, default=2, help="trainer peers started as subprocesses")
    parser.add_argument("--peer-steps", type=int, default=2, help="inner steps of the subprocess trainers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_workload("charlm", CHARLM).dataset()  # fail fast on a bad workload before starting anything
    with tempfile.TemporaryDirectory(prefix="bench-inner-") as tmp:
        uvloop.run(bench(args, Path(tmp)))


if __name__ == "__main__":
    main()
