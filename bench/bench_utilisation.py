"""Compute utilisation of a local swarm on charlm: time in inner steps over wall time, per peer, and where the rest goes.

Starts ``--peers`` real daemons on 127.0.0.1, waits for the first round to start,
then samples each peer's /status every 0.2 s for ``--seconds``: utilisation is the
growth of ``training.inner_seconds`` over the wall time since the first round began,
and the phase samples (leasing, training, publishing, waiting, merging, evaluating…)
say what the remaining time is spent on.

Run from the repository root:
    python -m bench.bench_utilisation [--peers 4] [--inner-steps 40] [--seconds 120] \
        [--inner-budget steps|time|both] [--microshard-chars 8192]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tests.swarm_harness import Peer, Swarm, wait_until


def training(peer: Peer) -> dict[str, Any]:
    return (peer.get("/status", timeout=5.0) or {}).get("training") or {}


def measure(args: argparse.Namespace, budget: str) -> float:
    """Run one swarm with ``training.inner_budget = budget``; print per-peer figures; return the swarm's."""
    settle = f"lease_settle_s = {args.lease_settle}\n" if args.lease_settle is not None else ""
    extra = (
        '[workload]\nname = "charlm"\n'
        + (f"[workload.options]\nmicroshard_chars = {args.microshard_chars}\n" if args.microshard_chars else "")
        + "\n"
        f"[training]\ninner_steps = {args.inner_steps}\ninner_budget = \"{budget}\"\nhead_reannounce_s = 2.0\n"
        f"evaluate = {'true' if args.evaluate else 'false'}\n{settle}"
    )
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory(prefix="bench-util-") as root:
        swarm = Swarm(Path(root))
        peers = [swarm.add(extra_toml=extra) for _ in range(args.peers)]
        try:
            for peer in peers:
                peer.start(extra_env=env)
            for peer in peers:
                peer.wait_healthy(120)
            wait_until(lambda: all(training(p).get("phase") not in (None, "starting", "syncing") for p in peers),
                       180, what="every peer in its first round")
            started = time.monotonic()
            first = [training(p) for p in peers]
            inner0 = [row.get("inner_seconds", 0.0) for row in first]
            round0 = [row.get("head_round", 0) for row in first]
            phases = [Counter() for _ in peers]
            while time.monotonic() - started < args.seconds:
                for peer, counts in zip(peers, phases):
                    counts[training(peer).get("phase", "unreachable")] += 1
                time.sleep(0.2)
            wall = time.monotonic() - started
            last = [training(p) for p in peers]
        finally:
            swarm.stop_all()
    print(f"{args.peers} peers, charlm (microshard_chars={args.microshard_chars or 'default'}), "
          f"inner_steps={args.inner_steps}, inner_budget={budget}, {args.threads} torch thread(s) each, "
          f"evaluate={args.evaluate}, {wall:.0f} s measured from the first round's start")
    total_inner = 0.0
    for index, (row, counts) in enumerate(zip(last, phases)):
        inner = row.get("inner_seconds", 0.0) - inner0[index]
        total_inner += inner
        rounds = row.get("head_round", 0) - round0[index]
        samples = sum(counts.values()) or 1
        split = ", ".join(f"{name} {100 * n / samples:.0f}%" for name, n in counts.most_common())
        print(f"  peer{index + 1}: utilisation {100 * inner / wall:.1f}% ({inner:.1f} s inner of {wall:.0f} s), "
              f"{rounds} rounds ({wall / max(rounds, 1):.1f} s/round), daemon's own figure "
              f"{100 * row.get('utilisation', 0.0):.1f}%; phases: {split}", flush=True)
    swarm_figure = total_inner / (wall * args.peers)
    print(f"swarm utilisation: {100 * swarm_figure:.1f}%\n", flush=True)
    return swarm_figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--inner-steps", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per peer")
    parser.add_argument("--evaluate", action="store_true", help="evaluate every head (off by default)")
    parser.add_argument("--lease-settle", type=float, default=None, help="training.lease_settle_s")
    parser.add_argument("--inner-budget", choices=("steps", "time", "both"), default="both",
                        help="training.inner_budget; both: one swarm of each, one after the other")
    parser.add_argument("--microshard-chars", type=int, default=None,
                        help="charlm microshard size (default: the workload's, 8192 = 153 microshards; 32768 gives 39)")
    args = parser.parse_args()
    budgets = ["steps", "time"] if args.inner_budget == "both" else [args.inner_budget]
    figures = {budget: measure(args, budget) for budget in budgets}
    print("  ".join(f"inner_budget={b}: {100 * f:.1f}%" for b, f in figures.items()) + "  (target >= 90%)")


if __name__ == "__main__":
    main()
