"""A round of a ~100M-parameter swarm: seconds per round phase, peak RSS, and inner steps/s against bare loops.

First ``--peers`` bare training loops run side by side, each a process with one torch thread
doing per round what the daemon's trainer does (load the base weights, ``workload.train`` for
H steps, take the pseudo-gradient). Then as many real daemons train the same model together.
Each daemon's /status is sampled at every head change: the growth of ``training.phase_seconds``
between heads says where a round's wall time goes, and the ``update_published`` log events
count the inner steps done. The ratio of the swarm's inner steps/s to the bare loops' is the
share of the machine's training throughput the daemons keep.

Run from the repository root:
    python -m bench.bench_round [--peers 3] [--features 8192 --hidden 12288] [--inner-steps H] \
        [--rounds 5] [--evaluate true|false|both] [--overlap true|false|both] [--keep]

With ``--overlap both`` the swarm runs twice on the same bare-loop figures, without and with
``diloco.overlap`` (the next round trained while the last one's head is merged).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.swarm_harness import ONE_THREAD, Peer, Swarm

REPO = Path(__file__).resolve().parents[1]
ROUND_TARGET_S = 20.0  # inner steps of one round, when --inner-steps is not given
MIN_FREE_DISK = 8 * 2**30  # the run stops early below this much free disk under its data dir
GIB = 2**30


def vm_bytes(pid: int | str, field_name: str) -> int:
    """A ``/proc/<pid>/status`` size field in bytes (``VmHWM``: peak resident set), 0 if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tiny_options(args: argparse.Namespace, inner_steps: int) -> dict[str, Any]:
    """The widened tiny workload: one batch per microshard, two rounds of the swarm's data per epoch,
    so an epoch ends on a round's boundary and every round leases H microshards per peer."""
    return {
        "features": args.features,
        "hidden": args.hidden,
        "batch_size": args.batch_size,
        "examples_per_microshard": args.batch_size,
        "microshards": 2 * args.peers * inner_steps,
    }


# ---------------------------------------------------------------- bare loops


def bare_loop(spec: dict[str, Any]) -> dict[str, Any]:
    """One bare loop (in its own process): a warm-up round; then, once every loop side by side has
    warmed up, rounds of H steps for ``window_s`` (the round running at the end is cut short), or one
    round if ``window_s`` is 0."""
    import torch

    from workloads.tiny import create

    workload = create(**spec["options"])
    steps = spec["steps"]
    first = spec["index"] * steps
    data = [workload.microshard_bytes((first + i) % spec["options"]["microshards"]) for i in range(steps)]
    model = workload.init_model(0, "cpu")
    base = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in model.state_dict().items()}
    inner = workload.new_inner_state(model)
    ends: float | None = None

    def one_round(seed: int) -> tuple[int, float]:
        with torch.no_grad():
            model.load_state_dict(base)
        stop = None if ends is None else (lambda end=ends: time.time() >= end)
        metrics = workload.train(model, inner, data, steps, "cpu", should_stop=stop, seed=seed)
        with torch.no_grad():
            local = model.state_dict()
            delta = {name: torch.sub(base[name], local[name].detach().to("cpu", torch.float32)).contiguous()
                     for name in base}
        del delta
        return metrics.steps, metrics.seconds

    warm_steps, warm_s = one_round(0)
    barrier = Path(spec["barrier"])
    (barrier / str(spec["index"])).touch()
    while len(list(barrier.iterdir())) < spec["count"]:
        time.sleep(0.05)
    rounds: list[dict[str, float]] = []
    started = time.time()
    ends = started + spec["window_s"] if spec["window_s"] > 0 else None
    while not rounds or (ends is not None and time.time() < ends):
        began = time.perf_counter()
        done, train_s = one_round(len(rounds) + 1)
        rounds.append({"steps": done, "train_s": train_s, "round_s": time.perf_counter() - began})
    return {"rounds": rounds, "wall_s": time.time() - started, "peak_rss": vm_bytes("self", "VmHWM"),
            "parameters": workload.parameter_count()}


@dataclass
class BareResult:
    rounds: list[list[dict[str, Any]]]
    walls: list[float]
    peaks: list[int]
    parameters: int

    @property
    def steps_per_s(self) -> float:
        return float(sum(sum(r["steps"] for r in rounds) / wall for rounds, wall in zip(self.rounds, self.walls)))

    @property
    def step_s(self) -> float:
        """Median seconds per inner step over every round of every loop."""
        per_step = sorted(r["train_s"] / r["steps"] for rounds in self.rounds for r in rounds if r["steps"])
        return float(per_step[len(per_step) // 2])


def run_bare(args: argparse.Namespace, steps: int, options: dict[str, Any], window_s: float, root: Path) -> BareResult:
    """``--peers`` bare loops side by side, each a process with one torch thread."""
    env = {**os.environ, **ONE_THREAD, "PYTHONUNBUFFERED": "1"}
    barrier = root / "barrier"
    barrier.mkdir(parents=True)
    processes = []
    try:
        for index in range(args.peers):
            spec = {"options": options, "steps": steps, "index": index,
                    "barrier": str(barrier), "count": args.peers, "window_s": window_s}
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "bench.bench_round", "--bare-loop", json.dumps(spec)],
                cwd=REPO, env=env, stdout=subprocess.PIPE, text=True,
            ))
        outputs = [json.loads(p.communicate(timeout=args.deadline)[0].strip().splitlines()[-1]) for p in processes]
    finally:
        stop_processes([p for p in processes if p.poll() is None])
    return BareResult([o["rounds"] for o in outputs], [o["wall_s"] for o in outputs],
                      [o["peak_rss"] for o in outputs], outputs[0]["parameters"])


def stop_processes(processes: list[subprocess.Popen[Any]]) -> None:
    """SIGTERM, then SIGKILL what is still running after 20 s."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    ends = time.monotonic() + 20.0
    for process in processes:
        try:
            process.wait(timeout=max(0.1, ends - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


# ---------------------------------------------------------------- the swarm


@dataclass
class Sample:
    at: float
    head_round: int
    phases: dict[str, float]
    eval_s: float
    inner_s: float


@dataclass
class PeerRun:
    peer: Peer
    samples: dict[int, Sample] = field(default_factory=dict)  # the first sample at each head round seen
    peak_rss: int = 0
    overlap: dict[str, int] = field(default_factory=dict)  # rounds trained ahead: used, abandoned by reason

    def sample(self) -> None:
        status = self.peer.get("/status", timeout=5.0) or {}
        training = status.get("training") or {}
        head_round = training.get("head_round")
        self.overlap = dict(training.get("overlap") or self.overlap)
        if head_round is None or head_round in self.samples:
            return
        self.samples[head_round] = Sample(time.monotonic(), head_round, dict(training.get("phase_seconds") or {}),
                                          float(training.get("eval_seconds") or 0.0),
                                          float(training.get("inner_seconds") or 0.0))

    def head_round(self) -> int:
        return max(self.samples, default=0)

    def published(self) -> dict[int, dict[str, Any]]:
        """This peer's ``update_published`` events by round (the last one of a round that was retried)."""
        events: dict[int, dict[str, Any]] = {}
        for line in self.peer.log().splitlines():
            if '"update_published"' not in line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            events[int(event["round"])] = event
        return events


def swarm_config(args: argparse.Namespace, steps: int, options: dict[str, Any], evaluate: bool, overlap: bool) -> str:
    lines = ['[workload]', 'name = "tiny"', '', '[workload.options]']
    lines += [f"{key} = {value}" for key, value in options.items()]
    lines += ['', '[training]', f"inner_steps = {steps}", f"evaluate = {'true' if evaluate else 'false'}", '']
    lines += ['[diloco]', f"overlap = {'true' if overlap else 'false'}", '']
    return "\n".join(lines)


def run_swarm(args: argparse.Namespace, steps: int, options: dict[str, Any], evaluate: bool, overlap: bool,
              root: Path) -> list[PeerRun]:
    """Start the daemons, sample them until ``--rounds`` heads after the first (or the deadline), stop them."""
    # Other work may change the tree while the bare loops run: the daemons run what is there now.
    print(f"\nstarting {args.peers} daemons (evaluate={evaluate}, overlap={overlap}) at commit {commit()}", flush=True)
    swarm = Swarm(root)
    runs = [PeerRun(swarm.add(extra_toml=swarm_config(args, steps, options, evaluate, overlap)))
            for _ in range(args.peers)]
    ends = time.monotonic() + args.deadline
    try:
        for run in runs:
            run.peer.start(extra_env=ONE_THREAD)
        for run in runs:
            run.peer.wait_healthy(max(1.0, ends - time.monotonic()))
        last = args.first_round + args.rounds
        while time.monotonic() < ends and min(r.head_round() for r in runs) < last:
            for run in runs:
                run.sample()
                if run.peer.process is not None and run.peer.process.poll() is not None:
                    raise RuntimeError(f"{run.peer.name} exited; its log ends:\n{run.peer.log()[-3000:]}")
            if shutil.disk_usage(root).free < MIN_FREE_DISK:
                print(f"stopping early: under {MIN_FREE_DISK / GIB:.0f} GiB free under {root}", flush=True)
                break
            time.sleep(0.2)
        if time.monotonic() >= ends:
            print(f"stopping at the deadline ({args.deadline:.0f} s) before head round {last}", flush=True)
        for run in runs:
            run.peak_rss = vm_bytes(run.peer.process.pid, "VmHWM") if run.peer.process else 0
    finally:
        stop_processes([r.peer.process for r in runs if r.peer.process is not None])
    return runs


# ---------------------------------------------------------------- report


def report_swarm(
    runs: list[PeerRun], args: argparse.Namespace, bare: BareResult, evaluate: bool, overlap: bool
) -> dict[str, Any]:
    first = args.first_round
    print(f"\nswarm: {args.peers} daemons, evaluate={evaluate}, overlap={overlap}; "
          f"window: head round {first} to the last head sampled")
    totals: dict[str, float] = {}
    wall_sum = eval_sum = steps_s = step_seconds = inner_sum = 0.0
    rates = []
    for run in runs:
        rounds = sorted(r for r in run.samples if r >= first)
        published = run.published()
        print(f"  {run.peer.name}: seconds per phase between heads (training split: steps / rest of the inner "
              "round / data and artifact)")
        for before, after in zip(rounds, rounds[1:]):
            a, b = run.samples[before], run.samples[after]
            deltas = {k: b.phases.get(k, 0.0) - a.phases.get(k, 0.0) for k in b.phases}
            event = published.get(after, {})
            inner = b.inner_s - a.inner_s
            cells = "  ".join(f"{k} {v:5.1f}" for k, v in sorted(deltas.items(), key=lambda kv: -kv[1]) if v >= 0.05)
            split = (f"  [steps {event.get('seconds', 0.0):.1f} / {inner - event.get('seconds', 0.0):.1f} / "
                     f"{deltas.get('training', 0.0) - inner:.1f}]" if event else "")
            print(f"    round {after:3d}: {b.at - a.at:5.1f} s  {cells}  eval {b.eval_s - a.eval_s:4.1f}{split}")
        if len(rounds) < 2:
            print("    (fewer than two heads in the window)")
            continue
        a, b = run.samples[rounds[0]], run.samples[rounds[-1]]
        wall = b.at - a.at
        wall_sum += wall
        eval_sum += b.eval_s - a.eval_s
        inner_sum += b.inner_s - a.inner_s
        for key in b.phases:
            totals[key] = totals.get(key, 0.0) + b.phases.get(key, 0.0) - a.phases.get(key, 0.0)
        done = [published[r] for r in range(rounds[0] + 1, rounds[-1] + 1) if r in published]
        steps = sum(int(e["steps"]) for e in done)
        step_seconds += sum(float(e["seconds"]) for e in done)
        rates.append(steps / wall)
        steps_s += steps / wall
        print(f"    {len(rounds) - 1} rounds in {wall:.1f} s ({wall / (len(rounds) - 1):.1f} s/round), "
              f"{steps} inner steps, {steps / wall:.3f} steps/s"
              + (f"; rounds trained ahead: {run.overlap}" if run.overlap else ""))
    if not wall_sum:
        return {}
    print(f"\n  share of the round loop's wall time per phase (all peers, {wall_sum:.0f} peer-seconds):")
    for key, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        if seconds >= 0.05:
            print(f"    {key:<12} {100 * seconds / wall_sum:5.1f}%  ({seconds:.1f} s)")
    print(f"    of which inner steps {100 * step_seconds / wall_sum:5.1f}%, the rest of the trainer's round "
          f"{100 * (inner_sum - step_seconds) / wall_sum:5.1f}%")
    print(f"    background evaluation: {eval_sum:.1f} s ({100 * eval_sum / wall_sum:.1f}% of the wall time)")
    bare_rate = bare.steps_per_s
    ratio = steps_s / bare_rate if bare_rate else 0.0
    print(f"\n  inner steps/s: swarm {steps_s:.3f}, bare loops {bare_rate:.3f}, "
          f"ratio {ratio:.3f} (target >= 0.85: {'met' if ratio >= 0.85 else 'not met'})")
    budget = 3 * 4 * bare.parameters
    print(f"  peak RSS (VmHWM) per daemon, and minus its bare loop's (target <= 3 x 4P = {budget / GIB:.2f} GiB):")
    for run, bare_peak in zip(runs, bare.peaks):
        extra = run.peak_rss - bare_peak
        print(f"    {run.peer.name}: {run.peak_rss / GIB:.2f} GiB, bare {bare_peak / GIB:.2f} GiB, "
              f"extra {extra / GIB:.2f} GiB = {extra / (4 * bare.parameters):.2f} x 4P "
              f"({'met' if extra <= budget else 'not met'})")
    return {"ratio": ratio, "steps_per_s": steps_s, "shares": {k: v / wall_sum for k, v in totals.items()}}


def commit() -> str:
    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip()

    dirty = git("status", "--porcelain", "--", "node", "protocol", "workloads")
    return git("rev-parse", "--short", "HEAD") + (" (with local changes under node/, protocol/ or workloads/)"
                                                   if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--features", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=12288, help="with --features 8192: 100.7M parameters")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--inner-steps", type=int, default=None,
                        help=f"H (default: what takes about {ROUND_TARGET_S:.0f} s with --peers loops side by side)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds measured after --first-round's head")
    parser.add_argument("--first-round", type=int, default=1, help="head round that opens the measured window")
    parser.add_argument("--bare-seconds", type=float, default=75.0, help="measured window of the bare loops")
    parser.add_argument("--evaluate", choices=("true", "false", "both"), default="true")
    parser.add_argument("--overlap", choices=("true", "false", "both"), default="false",
                        help="diloco.overlap in the swarm (both: one swarm run without, one with)")
    parser.add_argument("--deadline", type=float, default=1500.0, help="seconds allowed to each swarm run")
    parser.add_argument("--keep", action="store_true", help="keep the data directory")
    parser.add_argument("--bare-loop", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # A background job starts with SIGINT ignored, and SIGTERM would skip the clean-up below:
    # both end the run through the ``finally`` blocks that stop the daemons and loops.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.bare_loop:
        print(json.dumps(bare_loop(json.loads(args.bare_loop))), flush=True)
        return

    root = Path(tempfile.mkdtemp(prefix="bench-round-", dir="/tmp"))
    print(f"commit {commit()}; load average {os.getloadavg()}; "
          f"{shutil.disk_usage(root).free / GIB:.0f} GiB free under {root}", flush=True)
    try:
        steps = args.inner_steps
        if steps is None:
            probe = run_bare(args, 3, tiny_options(args, 3), 0.0, root / "probe")
            steps = max(1, round(ROUND_TARGET_S / probe.step_s))
            print(f"step time with {args.peers} loops side by side: {probe.step_s:.2f} s -> H = {steps}", flush=True)
        options = tiny_options(args, steps)
        bare = run_bare(args, steps, options, args.bare_seconds, root / "bare")
        print(f"P = {bare.parameters:,} parameters (4P = {4 * bare.parameters / GIB:.2f} GiB), H = {steps}, "
              f"batch {args.batch_size}, {args.peers} processes of one torch thread on {os.cpu_count()} cores")
        print(f"bare loops: {bare.steps_per_s:.3f} steps/s in all, {bare.step_s:.2f} s/step, round "
              + ", ".join(f"{sum(r['round_s'] for r in rs) / len(rs):.1f} s" for rs in bare.rounds)
              + ", peak RSS " + ", ".join(f"{p / GIB:.2f} GiB" for p in bare.peaks)
              + f"; load average {os.getloadavg()}", flush=True)
        figures: dict[tuple[bool, bool], dict[str, Any]] = {}
        for evaluate in ([True, False] if args.evaluate == "both" else [args.evaluate == "true"]):
            for overlap in ([False, True] if args.overlap == "both" else [args.overlap == "true"]):
                where = root / f"swarm-eval-{evaluate}-overlap-{overlap}"
                runs = run_swarm(args, steps, options, evaluate, overlap, where)
                figures[evaluate, overlap] = report_swarm(runs, args, bare, evaluate, overlap)
                print(f"  load average {os.getloadavg()}", flush=True)
                if not args.keep:
                    shutil.rmtree(where, ignore_errors=True)
        print("\nratio of inner steps/s, swarm to bare loops: " + ", ".join(
            f"evaluate={str(e).lower()} overlap={str(o).lower()} {f['ratio']:.3f}"
            for (e, o), f in figures.items() if f) + " (target >= 0.85)")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
