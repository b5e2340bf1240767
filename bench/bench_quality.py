"""DiLoCo against synchronous data-parallel on the built-in character-level GPT: loss and bytes moved.

Run from the repository root:

    python -m bench.bench_quality [--quick] [--codec int8] [--H 50] [--rounds 20] \
        [--outer-lr 0.7] [--outer-momentum 0.9] [--seeds 0,1,2,3 --jobs 2] [--overlap 0,5,12,25] \
        [--skip-dp] [--out FILE.json]
    python -m bench.bench_quality --byzantine --quick --H 10 --rounds 12 --jobs 2 --threads 1

Both methods start from the same initial weights and see the same examples in the same order,
for the same number of samples. With ``--seeds`` both run at each seed (another init, another
data order) and the verdict is on the mean gap: one seed's final loss moves by a percent or two
with the order of the last minibatches, as much as the gap being measured. ``--jobs`` runs the
(method, seed) pairs in parallel processes; the results do not depend on it.

* DiLoCo: ``--workers`` simulated peers. Each round every worker loads the global weights into
  its own model, runs ``H`` inner AdamW steps through ``Workload.train`` (its AdamW state is kept
  across rounds, as the daemon's Trainer keeps it), and computes the pseudo-gradient
  ``base - local``. That pseudo-gradient goes through the wire format the daemon uses
  (``encode_state_dict`` with the chosen codec, the chunks joined back, ``decode_state_dict``),
  and the decoded pseudo-gradients are merged with ``node.merge.merge`` under the mean rule (its
  norm bound against the chain's reference norm, as in the daemon; an honest update it excludes
  stops the run) and the outer SGD (Nesterov) step, the outer momentum carried across rounds.
* Data-parallel (DP): one model and one AdamW (same lr, betas, weight decay, clipping), taking
  ``rounds * H`` steps. Step ``t`` of round ``r`` uses exactly the union of the minibatches the
  DiLoCo workers use at their inner step ``t`` of round ``r`` (the same sampler and seeds as
  ``Workload.train``), i.e. batch ``workers x batch_size``. The mean loss over that batch has
  the gradient of the average of the workers' gradients: what an all-reduce of per-worker
  gradients gives every step.

* Overlapped outer step (``--overlap K``, Streaming DiLoCo's eager updates, what the daemon's
  ``diloco.overlap`` does): after a worker publishes its pseudo-gradient for round ``r``
  (against ``G_{r-1}``), it does not wait for the merge. It trains on round ``r+1``'s data from
  its own weights at publish ``L_pub`` while the merge runs, and when the merged ``G_r`` arrives,
  ``K`` of its ``H`` inner steps later, it rebases at that step boundary,
  ``local = G_r + (local - L_pub)``, runs the remaining ``H - K`` steps and publishes
  ``G_r - local`` (one AdamW state throughout). Round 0 has nothing to overlap with; ``K >= H``
  rebases after the last step. ``--overlap 0,2,5`` runs DiLoCo once per value on the same seeds
  and slices and judges each against the run without overlap (always run, ``K = 0``, the code
  path above bit for bit): its final val loss, mean over seeds, within 1% of that run's. With
  ``--skip-dp`` only the DiLoCo runs are made.

Each round every worker gets its own disjoint slice of microshards (drawn without replacement
from a seeded permutation of the training split, a fresh permutation per epoch); DP sees the
union of the slices, so both see the same examples.

With ``--byzantine`` it runs DiLoCo only, under each aggregation rule (mean, trimmed_mean,
median, centered_clip), once clean and once with worker 0's update replaced by 100 times itself
or by its sign flip. Every ``--tail-every``-th round is an epoch tail in which only workers 0
and 1 deliver, so the attacker is 1 of 4 updates in most rounds and 1 of 2 in the tails, where
no in-round median exists. Each merge gets the chain's reference norm (the median of the last
eight merges' median update norms), as the daemon passes it; the hundredfold attack also runs
without it, bounded by the in-round median alone.

Bytes are counted per worker. DP: a full fp32 gradient (4 bytes per trainable parameter) is
all-reduced every step with a ring all-reduce, in which each worker sends and receives
``2 (n - 1) / n`` times the gradient size. DiLoCo: each round a worker sends one encoded
pseudo-gradient (artifact stream plus its manifest) and receives the other ``n - 1`` workers'
ones; every peer computes the merge itself (the merge is deterministic, as in the daemon), so no
weights are broadcast. Gossip records (update and head records, a few hundred bytes each) are
left out of both.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import platform
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from node.artifacts import decode_state_dict, encode_state_dict
from node.merge import MergeResult, NothingMerged, UpdateInput, merge, outer_rule
from protocol.codecs import BF16, FP32, INT8, Codec
from protocol.manifest import join_chunks
from workloads.base import seeded_generator
from workloads.registry import load_workload

# The DP baseline replays Workload.train's own minibatch sampler (so both methods see the same
# examples in the same order) and sets the scheduled lr the way train does: the functions train
# calls, not copies of them.
from workloads.supervised import _batches, _concat, _set_lr

CODECS: dict[str, Codec] = {"fp32": FP32, "bf16": BF16, "int8": INT8}
ROBUST_RULES = ("mean", "trimmed_mean", "median", "centered_clip")
ATTACKS: dict[str, float | None] = {"clean": None, "x100": 100.0, "flip": -1.0}
NORM_WINDOW = 8  # merges whose median update norms make the reference norm, as in the daemon

# A smaller charlm than the workload's default (4 layers, 128 wide, 128-character windows,
# batch 32) so that both methods fit in a few minutes on two CPU cores.
BENCH_MODEL = {
    "n_layer": 3,
    "n_head": 4,
    "n_embd": 96,
    "block_size": 64,
    "batch_size": 16,
    "microshard_chars": 8192,  # finer slices, so each worker's share of a round wastes little
    "eval_examples": 1024,
}
QUICK_MODEL = BENCH_MODEL | {"n_layer": 2, "n_embd": 64, "eval_examples": 256}


@dataclass
class Run:
    """One method's trajectory: validation loss after each evaluated round and what it moved."""

    name: str
    curve: list[tuple[int, int, float]] = field(default_factory=list)  # (round, samples, val loss)
    samples: int = 0
    seconds: float = 0.0
    bytes_sent: int = 0  # per worker
    bytes_received: int = 0  # per worker
    train_loss_last: float = float("nan")
    attacks_merged: int = 0  # rounds whose merge included the attacker's update
    honest_excluded: int = 0  # honest updates the merge excluded

    @property
    def final_loss(self) -> float:
        return self.curve[-1][2]

    @property
    def bytes_total(self) -> int:
        return self.bytes_sent + self.bytes_received


def round_slices(workload: Any, workers: int, rounds: int, need: int, seed: int) -> list[list[list[int]]]:
    """``[round][worker]`` -> microshard indices holding at least ``need`` examples: disjoint
    within a round, an epoch used up before any microshard repeats (a fresh seeded permutation
    of the split each epoch)."""
    sizes = [s.examples for s in workload.dataset().microshards]
    stream: list[int] = []
    epoch = 0
    slices: list[list[list[int]]] = []
    for _ in range(rounds):
        used: set[int] = set()
        round_: list[list[int]] = []
        for _ in range(workers):
            taken: list[int] = []
            while sum(sizes[i] for i in taken) < need:
                # At an epoch boundary keep a round free of repeats: defer what it already holds.
                pick = next((i for i in stream if i not in used), None)
                if pick is None:
                    if len(used) == len(sizes):
                        raise SystemExit(f"a round needs more than the split's {len(sizes)} microshards")
                    order = torch.randperm(len(sizes), generator=seeded_generator(seed, f"bench-epoch-{epoch}"))
                    stream += order.tolist()
                    epoch += 1
                    continue
                stream.remove(pick)
                used.add(pick)
                taken.append(pick)
            round_.append(taken)
        slices.append(round_)
    return slices


@dataclass(frozen=True)
class Scenario:
    """The rule a DiLoCo run merges with and, for ``--byzantine``, its attacker and epoch tails."""

    rule: str = "mean"
    attack: str = "clean"  # a key of ATTACKS: what worker 0's update is replaced by
    tail_every: int = 0  # every this many rounds only workers 0 and 1 deliver; 0: never
    chain_bound: bool = True  # pass the merge the chain's reference norm
    overlap: int = 0  # inner steps of round r+1 run before round r's merge is rebased in; 0: none

    @property
    def plain(self) -> bool:
        """The honest mean-rule merge of the DiLoCo-vs-DP comparison (with or without overlap)."""
        return replace(self, overlap=0) == Scenario()

    @property
    def label(self) -> str:
        if self.plain:
            return f"overlap {self.overlap}" if self.overlap else "diloco"
        return f"{self.rule}, {self.attack}{'' if self.chain_bound else ', no chain bound'}"


class RebaseAt:
    """A ``should_stop`` hook for ``Workload.train`` that never stops it: at the step boundary
    after ``at`` inner steps it moves the model onto the newly merged global weights, keeping
    what it has trained since it published: ``local = merged + (local - published)``.

    ``train`` calls ``should_stop`` once before each step (call ``i`` when ``i`` steps are done),
    so the rebase lands exactly between steps ``at`` and ``at + 1``. Doing it inside one call of
    ``H`` steps rather than as two calls (``at`` steps, rebase, ``H - at`` steps) is what keeps it
    faithful: ``train`` builds its minibatch sampler per call from ``seed`` alone
    (``_batches(examples, batch_size, seed)``), so a second call would replay the first call's
    minibatches instead of continuing the round's order. The lr schedule (``state.steps +
    done``) and the AdamW state would be continuous either way. With ``at >= H`` ``train`` never
    reaches that boundary and the caller rebases after it returns (``apply``)."""

    def __init__(
        self, model: torch.nn.Module, merged: dict[str, torch.Tensor], published: dict[str, torch.Tensor], at: int
    ) -> None:
        self.model, self.merged, self.published, self.at = model, merged, published, at
        self.calls = 0
        self.done = False

    def __call__(self) -> bool:
        if self.calls == self.at:
            self.apply()
        self.calls += 1
        return False

    def apply(self) -> None:
        assert not self.done
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                param.copy_(self.merged[name] + (param - self.published[name]))
        self.done = True


def train_seed(seed: int, round_index: int, worker: int) -> int:
    """The seed a worker's Workload.train gets in a round (it fixes that worker's example order)."""
    return seed * 1_000_003 + round_index * 1_009 + worker


def wire_roundtrip(delta: dict[str, torch.Tensor], codec: Codec) -> tuple[dict[str, torch.Tensor], int]:
    """The pseudo-gradient as a peer fetching it decodes it, and the bytes it moved over the
    wire (the artifact's chunks plus its manifest)."""
    artifact = encode_state_dict(delta, codec)
    stream = join_chunks(artifact.manifest, [bytes(c) for c in artifact.chunks])
    decoded = decode_state_dict(artifact.manifest, stream)
    wire = sum(len(c) for c in artifact.chunks) + len(artifact.manifest.encoded)
    assert sum(len(c) for c in artifact.chunks) == artifact.manifest.size
    return {k: v.float() for k, v in decoded.items()}, wire


def weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.float32).clone().contiguous() for k, v in model.state_dict().items()}


def run_diloco(
    workload: Any, args: argparse.Namespace, slices: list[list[list[int]]], shard_bytes: Sequence[bytes],
    scenario: Scenario = Scenario(),
) -> Run:
    run = Run(f"DiLoCo ({args.codec}, outer lr {args.outer_lr:g}, mom {args.outer_momentum:g}"
              f"{', nesterov' if args.outer_momentum > 0 else ''}"
              f"{'' if scenario.plain else '; ' + scenario.label}"
              f"{f'; overlap {scenario.overlap} of H={args.H}' if scenario.overlap else ''})")
    if scenario.overlap and scenario.tail_every:
        raise SystemExit("overlap with epoch tails is not simulated (a worker that skips a round has no publish)")
    codec = CODECS[args.codec]
    rule = outer_rule(scenario.rule, args.outer_lr, args.outer_momentum, args.outer_momentum > 0, 0.2, 10.0)
    factor = ATTACKS[scenario.attack]
    median_norms: list[float] = []
    global_weights = weights_of(workload.init_model(args.seed))
    momentum: dict[str, torch.Tensor] | None = None
    models = [workload.init_model(args.seed) for _ in range(args.workers)]
    states = [workload.new_inner_state(m) for m in models]
    # With overlap: each worker's weights when it published its last pseudo-gradient (L_pub).
    published: list[dict[str, torch.Tensor] | None] = [None] * args.workers
    started = time.perf_counter()
    evaluator = workload.init_model(args.seed)
    run.curve.append((0, 0, workload.evaluate(evaluator, "val").loss))
    for r, round_slices_ in enumerate(slices):
        updates = []
        wires = []
        losses = []
        tail = scenario.tail_every > 0 and r % scenario.tail_every == scenario.tail_every - 1
        for k, (model, state) in enumerate(zip(models, states)):
            if tail and k >= 2:
                continue
            shards = [shard_bytes[i] for i in round_slices_[k]]
            last_publish = published[k]
            if last_publish is None:  # no overlap, or round 0: start the round from the global weights
                with torch.no_grad():
                    model.load_state_dict(global_weights)
                metrics = workload.train(model, state, shards, args.H, seed=train_seed(args.seed, r, k))
            else:  # go on from the weights at publish; round r-1's merge (global_weights) lands after K steps
                rebase = RebaseAt(model, global_weights, last_publish, scenario.overlap)
                metrics = workload.train(
                    model, state, shards, args.H, should_stop=rebase, seed=train_seed(args.seed, r, k)
                )
                assert rebase.calls == metrics.steps == args.H and not metrics.stopped_early
                if not rebase.done:  # K >= H: every step ran from the stale weights
                    rebase.apply()
            losses.append(metrics.loss_last)
            run.samples += metrics.examples
            with torch.no_grad():
                local = model.state_dict()
                delta = {n: torch.sub(global_weights[n], local[n].detach().float()).contiguous() for n in global_weights}
            if scenario.overlap:
                published[k] = weights_of(model)
            if k == 0 and factor is not None:
                delta = {n: torch.mul(t, factor) for n, t in delta.items()}
            decoded, wire = wire_roundtrip(delta, codec)
            wires.append(wire)
            updates.append(UpdateInput(f"worker-{k:03d}", metrics.examples, decoded))
        reference = statistics.median(median_norms[-NORM_WINDOW:]) if median_norms and scenario.chain_bound else None
        try:
            result: MergeResult | None = merge(global_weights, momentum, updates, rule, reference_norm=reference)
        except NothingMerged:
            result = None
        excluded = {update_id for update_id, _ in result.excluded} if result else {u.update_id for u in updates}
        honest_excluded = excluded - ({"worker-000"} if factor is not None else set())
        if honest_excluded and scenario.plain:
            raise SystemExit(f"round {r}: the merge excluded updates: {result.excluded if result else 'all'}")
        run.honest_excluded += len(honest_excluded)
        run.attacks_merged += int(factor is not None and "worker-000" not in excluded)
        if result is not None:
            global_weights, momentum = result.weights, result.momentum
            median_norms.append(result.median_norm)  # type: ignore[arg-type]
        total_wire = sum(wires)
        run.bytes_sent += total_wire // len(wires)  # the workers' artifacts are (nearly) the same size
        run.bytes_received += total_wire - total_wire // len(wires)
        run.train_loss_last = sum(losses) / len(losses)
        if (r + 1) % args.eval_every == 0 or r + 1 == len(slices):
            with torch.no_grad():
                evaluator.load_state_dict(global_weights)
            loss = workload.evaluate(evaluator, "val").loss
            run.curve.append((r + 1, run.samples, loss))
            what = scenario.label
            print(f"  seed {args.seed} {what} round {r + 1:3d}/{len(slices)}  samples {run.samples:7d}  val {loss:.4f}"
                  f"  ({time.perf_counter() - started:6.1f} s)", flush=True)
    run.seconds = time.perf_counter() - started
    return run


def dp_batches(
    workload: Any, slices: list[list[int]], shard_bytes: Sequence[bytes], batch_size: int, seed: int, r: int
) -> Iterator[tuple[torch.Tensor, ...]]:
    """The union of the workers' minibatches, step by step, for one round."""
    streams = [
        _batches(_concat([workload.decode_microshard(shard_bytes[i]) for i in worker_slice]),
                 batch_size, train_seed(seed, r, k))
        for k, worker_slice in enumerate(slices)
    ]
    while True:
        parts = [next(s) for s in streams]
        yield tuple(torch.cat(fields) for fields in zip(*parts, strict=True))


def run_dp(
    workload: Any, args: argparse.Namespace, slices: list[list[list[int]]], shard_bytes: Sequence[bytes],
    gradient_bytes: int,
) -> Run:
    run = Run(f"data-parallel (fp32 ring all-reduce, batch {args.workers}x{workload.settings()['batch_size']})")
    settings = workload.settings()
    model = workload.init_model(args.seed)
    optimizer = workload.new_inner_state(model).optimizer
    # DP follows the same inner lr schedule as each DiLoCo worker (step t of the run has the lr
    # of inner step t), scaled when --dp-lr asks for another peak lr.
    lr_scale = 1.0 if args.dp_lr is None else args.dp_lr / settings["lr"]
    step = 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    n = args.workers
    per_step = 2 * (n - 1) * gradient_bytes // n  # ring all-reduce: sent, and again received, per worker
    started = time.perf_counter()
    run.curve.append((0, 0, workload.evaluate(model, "val").loss))
    model.train()
    for r, round_slices_ in enumerate(slices):
        batches = dp_batches(workload, round_slices_, shard_bytes, settings["batch_size"], args.seed, r)
        for _ in range(args.H):
            batch = next(batches)
            _set_lr(optimizer, lr_scale * workload.lr_at(step))
            step += 1
            loss = workload.batch_loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if settings["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(trainable, settings["grad_clip"])
            optimizer.step()
            run.samples += batch[0].shape[0]
            run.bytes_sent += per_step
            run.bytes_received += per_step
        run.train_loss_last = float(loss.detach())
        if (r + 1) % args.eval_every == 0 or r + 1 == len(slices):
            loss_val = workload.evaluate(model, "val").loss
            model.train()
            run.curve.append((r + 1, run.samples, loss_val))
            print(f"  seed {args.seed} dp     round {r + 1:3d}/{len(slices)}  samples {run.samples:7d}  val {loss_val:.4f}"
                  f"  ({time.perf_counter() - started:6.1f} s)", flush=True)
    run.seconds = time.perf_counter() - started
    return run


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return f"{n:.1f} GB"


BYTE_ACCOUNTING = (
    "per worker. DP: fp32 gradient (4 B x parameters) ring all-reduced every step; each worker sends"
    " and receives 2(n-1)/n x gradient size per step. DiLoCo: per round each worker sends its encoded"
    " pseudo-gradient (artifact chunks + manifest) and receives the other n-1; the merge is computed"
    " locally by every peer, so no weights are broadcast. Gossip records are not counted."
)


def setup(args: argparse.Namespace, options: dict[str, Any]) -> tuple[Any, list[list[list[int]]]]:
    """The workload and the seed's ``[round][worker]`` microshard slices."""
    workload = load_workload("charlm", options)
    batch_size = workload.settings()["batch_size"]
    return workload, round_slices(workload, args.workers, args.rounds, args.H * batch_size, args.seed)


def run_task(
    args: argparse.Namespace, options: dict[str, Any], method: str, seed: int, scenario: Scenario = Scenario()
) -> Run:
    """One method at one seed, from scratch; a top-level function, so --jobs can run it in a
    process of its own."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(seed)
    args = argparse.Namespace(**(vars(args) | {"seed": seed}))
    workload, slices = setup(args, options)
    shard_bytes = [workload.microshard_bytes(i) for i in range(len(workload.dataset().microshards))]
    if method == "diloco":
        return run_diloco(workload, args, slices, shard_bytes, scenario)
    gradient_bytes = 4 * sum(math.prod(p.shape) for p in workload.model_schema())
    return run_dp(workload, args, slices, shard_bytes, gradient_bytes)


def run_view(r: Run) -> dict[str, Any]:
    return {
        "name": r.name,
        "final_val_loss": r.final_loss,
        "train_loss_last": r.train_loss_last,
        "samples": r.samples,
        "bytes_sent_per_worker": r.bytes_sent,
        "bytes_received_per_worker": r.bytes_received,
        "bytes_total_per_worker": r.bytes_total,
        "seconds": r.seconds,
        "curve": [{"round": a, "samples": b, "val_loss": c} for a, b, c in r.curve],
    }


def run_all(
    args: argparse.Namespace, options: dict[str, Any], tasks: Sequence[tuple[str, int, Scenario]]
) -> list[Run]:
    """``run_task`` for each (method, seed, scenario), in ``--jobs`` processes."""
    if args.jobs > 1:
        spawn = multiprocessing.get_context("spawn")  # torch does not survive fork with threads running
        with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs, mp_context=spawn) as pool:
            futures = [pool.submit(run_task, args, options, *task) for task in tasks]
            return [f.result() for f in futures]
    return [run_task(args, options, *task) for task in tasks]


def byzantine(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """Final loss of DiLoCo under each rule, clean and with one attacker, at one seed."""
    if args.workers < 3:
        raise SystemExit("--byzantine needs at least 3 workers (the attacker is one of them)")
    settings = [("clean", True), ("x100", True), ("flip", True), ("x100", False)]
    tasks = [("diloco", args.seed, Scenario(rule, attack, args.tail_every, bound))
             for rule in ROBUST_RULES for attack, bound in settings]
    tails = f"the last of every {args.tail_every} rounds a tail of 2 updates" if args.tail_every else "no tails"
    print(f"charlm {options}: {args.workers} workers x {args.rounds} rounds x H={args.H}, {tails}; seed"
          f" {args.seed}, {args.jobs} job(s)", flush=True)
    wall = time.perf_counter()
    runs = run_all(args, options, tasks)
    wall = time.perf_counter() - wall
    by_key = {(task[2].rule, task[2].attack, task[2].chain_bound): run for task, run in zip(tasks, runs, strict=True)}
    print()
    print(f"{'rule':<14} {'clean':>8} {'x100':>8} {'flip':>8} {'x100, no chain bound':>21}   attacker merged"
          " (x100 / flip / x100 unbounded), honest excluded")
    for rule in ROBUST_RULES:
        row = [by_key[(rule, attack, bound)] for attack, bound in settings]
        print(f"{rule:<14} {row[0].final_loss:8.4f} {row[1].final_loss:8.4f} {row[2].final_loss:8.4f}"
              f" {row[3].final_loss:21.4f}   {row[1].attacks_merged} / {row[2].attacks_merged} /"
              f" {row[3].attacks_merged} of {args.rounds}, {sum(r.honest_excluded for r in row)}")
    print(f"wall time {wall:.1f} s")
    if args.out is not None:
        report = {
            "bench": "quality-byzantine", "workload": "charlm", "options": options, "workers": args.workers,
            "rounds": args.rounds, "H": args.H, "tail_every": args.tail_every, "codec": args.codec,
            "outer_lr": args.outer_lr, "outer_momentum": args.outer_momentum, "seed": args.seed,
            "torch": torch.__version__, "threads": args.threads, "wall_seconds": wall,
            "runs": [{"rule": t[2].rule, "attack": t[2].attack, "chain_bound": t[2].chain_bound,
                      "attacks_merged": r.attacks_merged, "honest_excluded": r.honest_excluded, **run_view(r)}
                     for t, r in zip(tasks, runs, strict=True)],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


OVERLAP_TARGET = 0.01  # overlapped final val loss (mean over seeds) within 1% of the same run without overlap


def overlap_verdict(
    runs: dict[int, dict[str, Run]], seeds: Sequence[int], overlaps: Sequence[int], H: int
) -> dict[str, Any]:
    """Each overlap's final val loss against the run without it, per seed and mean over seeds; printed and returned."""
    base = {seed: runs[seed]["diloco"].final_loss for seed in seeds}
    dp = {seed: runs[seed]["dp"].final_loss for seed in seeds} if "dp" in runs[seeds[0]] else None
    print()
    print(f"Overlapped outer step (H={H}): final val loss and gap to the same run without overlap (K=0)")
    print(f"{'K':>4} {'K/H':>5}  " + "  ".join(f"{'seed ' + str(seed):>17}" for seed in seeds)
          + f"  {'mean':>17}  {'gap range':>17}" + ("  vs DP (mean)" if dp else "") + "  target")
    by_value: dict[str, Any] = {}
    for k in overlaps:
        key = "diloco" if k == 0 else f"diloco_overlap_{k}"
        losses = {seed: runs[seed][key].final_loss for seed in seeds}
        gaps = {seed: (losses[seed] - base[seed]) / base[seed] for seed in seeds}
        mean_loss, mean_gap = statistics.fmean(losses.values()), statistics.fmean(gaps.values())
        met = mean_gap <= OVERLAP_TARGET
        vs_dp = statistics.fmean((losses[s] - dp[s]) / dp[s] for s in seeds) if dp else None
        cells = "  ".join(f"{losses[s]:.4f} ({gaps[s]:+.2%})" for s in seeds)
        print(f"{k:>4} {k / H:5.0%}  {cells}  {mean_loss:.4f} ({mean_gap:+.2%})"
              f"  {f'{min(gaps.values()):+.2%}..{max(gaps.values()):+.2%}':>17}"
              + (f"  {vs_dp:>+12.2%}" if vs_dp is not None else "")
              + ("" if k == 0 else f"  {'MET' if met else 'MISSED'}"))
        by_value[str(k)] = {
            "final_val_loss_by_seed": {str(s): v for s, v in losses.items()},
            "gap_vs_no_overlap_by_seed": {str(s): v for s, v in gaps.items()},
            "final_val_loss_mean": mean_loss,
            "gap_vs_no_overlap_mean": mean_gap,
            **({"gap_vs_dp_mean": vs_dp} if vs_dp is not None else {}),
            "met": met,
        }
    print(f"target: overlap within {OVERLAP_TARGET:.0%} of the same run without it (final val loss, mean over"
          f" {len(seeds)} seed{'s' if len(seeds) > 1 else ''})")
    return {"H": H, "values": list(overlaps), "target": {"loss_within": OVERLAP_TARGET,
            "met": all(v["met"] for v in by_value.values())}, "by_value": by_value}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run (< 1 min)")
    parser.add_argument("--codec", choices=sorted(CODECS), default="int8", help="pseudo-gradient codec")
    parser.add_argument("--H", type=int, default=None, help="inner steps per round (default 50; quick 10)")
    parser.add_argument("--rounds", type=int, default=None, help="outer rounds (default 20; quick 3)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--outer-lr", type=float, default=0.7)
    parser.add_argument("--outer-momentum", type=float, default=0.9, help="0 disables momentum (and Nesterov)")
    parser.add_argument("--dp-lr", type=float, default=None, help="DP inner lr (default: the same as DiLoCo's)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="override a charlm option (n_layer, n_embd, block_size, batch_size, lr, ...)")
    parser.add_argument("--eval-every", type=int, default=None, help="evaluate every N rounds (default ~10 points)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=str, default=None, metavar="S,S,...",
                        help="run both methods at each of these seeds and judge the mean gap (overrides --seed)")
    parser.add_argument("--jobs", type=int, default=1, help="runs (method x seed) in parallel, one process each")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--skip-dp", action="store_true", help="run DiLoCo only (no DP baseline, no DP verdict)")
    parser.add_argument("--overlap", type=str, default="0", metavar="K[,K,...]",
                        help="overlapped outer step: round r's merge is rebased in after K of round r+1's inner"
                             " steps (0: none); a list runs DiLoCo once per value, K=0 always among them, and"
                             " judges each against K=0 (final val loss within 1%%)")
    parser.add_argument("--skip-diloco", action="store_true", help="run the data-parallel baseline only (no verdict)")
    parser.add_argument("--byzantine", action="store_true",
                        help="DiLoCo under each rule, clean and with one attacker (x100, sign flip); no DP")
    parser.add_argument("--tail-every", type=int, default=3,
                        help="with --byzantine: every Nth round only 2 of the workers deliver (0: never)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    options: dict[str, Any] = dict(QUICK_MODEL if args.quick else BENCH_MODEL)
    for item in args.option:
        key, _, value = item.partition("=")
        options[key] = json.loads(value) if value and value[0] in "0123456789-.[" else value
    args.H = args.H if args.H is not None else (10 if args.quick else 50)
    args.rounds = args.rounds if args.rounds is not None else (3 if args.quick else 20)
    args.eval_every = args.eval_every or max(1, args.rounds // 10)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [args.seed]
    overlaps = sorted({0} | {int(k) for k in args.overlap.split(",")})
    if overlaps[0] < 0:
        raise SystemExit("--overlap takes inner step counts >= 0")
    if args.byzantine:
        if overlaps != [0]:
            raise SystemExit("--overlap is not simulated with --byzantine")
        return byzantine(args, options)
    if overlaps != [0] and args.skip_diloco:
        raise SystemExit("--overlap needs the DiLoCo runs (drop --skip-diloco)")
    methods = [m for m, skip in (("dp", args.skip_dp), ("diloco", args.skip_diloco)) if not skip]

    workload, slices = setup(args, options)
    batch_size = workload.settings()["batch_size"]
    params = sum(math.prod(p.shape) for p in workload.model_schema())
    gradient_bytes = 4 * params  # every parameter of the charlm is trainable and fp32
    per_worker = sum(len(w) for r in slices for w in r) / (args.workers * args.rounds)
    split_examples = sum(s.examples for s in workload.dataset().microshards)
    total_samples = args.workers * args.rounds * args.H * batch_size

    print(f"charlm {options}: {params:,} parameters, fp32 gradient {human(gradient_bytes)}")
    print(f"{args.workers} workers x {args.rounds} rounds x H={args.H} x batch {batch_size} = {total_samples:,} samples"
          f" ({total_samples / split_examples:.2f} epochs of {split_examples:,}); {per_worker:.1f} microshards"
          f" per worker per round (>= H x batch examples each); torch {torch.__version__}, {args.threads} threads"
          f" per run; seeds {seeds}, {args.jobs} job(s)"
          f"{f'; overlap K = {overlaps} of H={args.H}' if overlaps != [0] else ''}", flush=True)

    wall = time.perf_counter()
    # Run keys: "dp", "diloco" (no overlap) and "diloco_overlap_K".
    tasks = [(method if method == "dp" or k == 0 else f"diloco_overlap_{k}", seed, Scenario(overlap=k))
             for seed in seeds for method in methods for k in (overlaps if method == "diloco" else [0])]
    finished = run_all(args, options, [("dp" if key == "dp" else "diloco", seed, scenario)
                                       for key, seed, scenario in tasks])
    runs: dict[int, dict[str, Run]] = {seed: {} for seed in seeds}
    for (key, seed, _), run in zip(tasks, finished, strict=True):
        runs[seed][key] = run
    wall = time.perf_counter() - wall

    print()
    print(f"{'seed':>4} {'method':<72} {'val loss':>9} {'samples':>9} {'sent/wkr':>10} {'recv/wkr':>10}"
          f" {'total/wkr':>10} {'time':>8}")
    for seed in seeds:
        for r in runs[seed].values():
            print(f"{seed:>4} {r.name:<72} {r.final_loss:9.4f} {r.samples:9,} {human(r.bytes_sent):>10}"
                  f" {human(r.bytes_received):>10} {human(r.bytes_total):>10} {r.seconds:7.1f}s")
    report: dict[str, Any] = {
        "bench": "quality",
        "workload": "charlm",
        "options": options,
        "parameters": params,
        "workers": args.workers,
        "rounds": args.rounds,
        "H": args.H,
        "batch_size_per_worker": batch_size,
        "total_samples": total_samples,
        "epochs": total_samples / split_examples,
        "codec": args.codec,
        "outer_lr": args.outer_lr,
        "outer_momentum": args.outer_momentum,
        "nesterov": args.outer_momentum > 0,
        "dp_lr": args.dp_lr if args.dp_lr is not None else workload.settings()["lr"],
        "seeds": seeds,
        "overlaps": overlaps,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "wall_seconds": wall,
        "byte_accounting": BYTE_ACCOUNTING,
    }
    if len(seeds) == 1:
        report["seed"] = seeds[0]
        report["runs"] = {key: run_view(r) for key, r in runs[seeds[0]].items()}
    else:
        report["runs_by_seed"] = {str(seed): {key: run_view(r) for key, r in runs[seed].items()} for seed in seeds}
    if {"dp", "diloco"} <= set(methods):
        gaps = {seed: (runs[seed]["diloco"].final_loss - runs[seed]["dp"].final_loss) / runs[seed]["dp"].final_loss
                for seed in seeds}
        gap = statistics.fmean(gaps.values())
        dp, diloco = runs[seeds[0]]["dp"], runs[seeds[0]]["diloco"]
        ratio = dp.bytes_total / diloco.bytes_total
        ratio_sent = dp.bytes_sent / diloco.bytes_sent
        # The plainest accounting: DP pushes one full fp32 gradient per step, DiLoCo one encoded
        # pseudo-gradient per round (what each worker uploads, nothing received).
        ratio_plain = args.rounds * args.H * gradient_bytes / diloco.bytes_sent
        loss_ok, bytes_ok = gap <= 0.02, ratio >= 50
        print()
        for seed in seeds:
            print(f"seed {seed}: DiLoCo {runs[seed]['diloco'].final_loss:.4f} vs DP {runs[seed]['dp'].final_loss:.4f}"
                  f" ({gaps[seed]:+.2%})")
        spread = f" (seeds range {min(gaps.values()):+.2%} to {max(gaps.values()):+.2%})" if len(seeds) > 1 else ""
        print(f"DiLoCo vs DP: val loss gap {gap:+.2%}{' mean of ' + str(len(seeds)) + ' seeds' if len(seeds) > 1 else ''}"
              f"{spread}; bytes per worker {ratio:.1f}x fewer (ring, sent+received), {ratio_sent:.1f}x fewer"
              f" (ring, sent only), {ratio_plain:.1f}x fewer (one gradient per step vs one update per round)")
        print(f"target (loss within 2%, >= 50x fewer bytes): loss {'MET' if loss_ok else 'MISSED'},"
              f" bytes {'MET' if bytes_ok else 'MISSED'}")
        report |= {"loss_gap": gap, "bytes_ratio": ratio, "bytes_ratio_sent_only": ratio_sent,
                   "bytes_ratio_one_gradient_per_step": ratio_plain,
                   "target": {"loss_within": 0.02, "bytes_ratio_at_least": 50, "loss_met": loss_ok,
                              "bytes_met": bytes_ok, "met": loss_ok and bytes_ok}}
        if len(seeds) > 1:
            report["loss_gap_by_seed"] = {str(seed): g for seed, g in gaps.items()}
    if len(overlaps) > 1:
        report["overlap"] = overlap_verdict(runs, seeds, overlaps, args.H)
    print(f"wall time {wall:.1f} s")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
