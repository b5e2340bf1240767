"""What an idle daemon costs: CPU per daemon in local swarms of growing size, nothing training.

For each swarm size it starts that many ``p2p-node start`` processes on 127.0.0.1 as consumers
(no training, no evaluation; every other setting at its default), waits until each one sees
all the others alive, lets the swarm settle, and then reads each process's CPU time (user +
system, all threads, from /proc) and gossip counters over a window. What is left is the
swarm's background work: membership heartbeats, availability announcements, gossipsub's own
heartbeats and control traffic, and the DHT. Every peer receives every record, so the cost per
daemon grows with the swarm.

Run from the repository root: python -m bench.bench_idle [--peers 2,4,8] [--seconds 20]
Linux only (the CPU times come from /proc).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.bench_exchange import cpu_seconds

QUIET = '[training]\nrole = "consumer"\nevaluate = false\n'


def accepted(peer) -> int:
    status = peer.get("/status") or {}
    return sum((status.get("gossip") or {}).get("accepted", {}).values())


def measure(root: Path, size: int, settle_s: float, window_s: float) -> dict[str, float]:
    from tests.swarm_harness import Swarm, wait_until

    swarm = Swarm(root / f"swarm{size}")
    peers = [swarm.add(QUIET, heartbeat_s=2.0) for _ in range(size)]
    try:
        for peer in peers:
            peer.start()
        for peer in peers:
            peer.wait_healthy(120)
        wait_until(
            lambda: all(len(peer.live_peers()) >= size - 1 for peer in peers), 120, what="every peer to see all others"
        )
        time.sleep(settle_s)
        cpu0 = [cpu_seconds(peer.process.pid) for peer in peers]
        records0 = [accepted(peer) for peer in peers]
        started = time.monotonic()
        time.sleep(window_s)
        elapsed = time.monotonic() - started
        cpu = [(cpu_seconds(peer.process.pid) - c) / elapsed for peer, c in zip(peers, cpu0)]
        records = [(accepted(peer) - r) / elapsed for peer, r in zip(peers, records0)]
        return {"mean": statistics.mean(cpu), "max": max(cpu), "records": statistics.mean(records)}
    finally:
        swarm.stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", default="2,4,8", help="swarm sizes, comma-separated")
    parser.add_argument("--seconds", type=float, default=20.0, help="measuring window per size")
    parser.add_argument("--settle", type=float, default=10.0, help="wait after the swarm converged")
    args = parser.parse_args()
    sizes = [int(n) for n in args.peers.split(",")]
    root = Path(tempfile.mkdtemp(prefix="bench-idle-"))
    print(f"{'peers':>5} {'CPU per daemon, mean':>21} {'max':>6} {'records accepted/s':>19}")
    try:
        for size in sizes:
            row = measure(root, size, args.settle, args.seconds)
            print(f"{size:>5} {100 * row['mean']:>20.1f}% {100 * row['max']:>5.1f}% {row['records']:>19.1f}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)  # the daemons' data directories


if __name__ == "__main__":
    main()
