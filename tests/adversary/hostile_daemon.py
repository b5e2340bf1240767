"""A real ``p2p-node start`` whose node classes are patched to misbehave in the mode named by a file.

``python -m tests.adversary.hostile_daemon --mode-file M --config F --report R``: every patch acts
only while ``M`` names its mode, so one peer plays each mode in turn; what it forged goes to ``R``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

MODES = (
    "honest",  # patched nothing: the launcher itself under test
    "inflated_samples",
    "replay",
    "stale_base",
    "x100",
    "sign_flip",
    "nan",
    "tail_nan",  # honest, except NaN for a round cut short by the end of its epoch
    "lease_flood",
    "record_flood",
    "forged_ancestors",
)
FLOOD_PER_S = 300
INFLATED_SAMPLES = 10**9

_report_path: Path | None = None
_mode_path: Path | None = None
_mode_cache: tuple[float, str] = (0.0, "honest")


def mode() -> str:
    """The mode in force now (re-read from the mode file at most every 0.1 s)."""
    global _mode_cache
    now = time.monotonic()
    if _mode_path is None or now - _mode_cache[0] < 0.1:
        return _mode_cache[1]
    with contextlib.suppress(OSError):
        text = _mode_path.read_text().strip()
        if text in MODES and text != _mode_cache[1]:
            report("mode", mode=text)
        _mode_cache = (now, text if text in MODES else _mode_cache[1])
    return _mode_cache[1]


def report(kind: str, **data: Any) -> None:
    """One JSON line in the report file: the test reads what this peer forged from there."""
    if _report_path is None:
        return
    with open(_report_path, "a") as out:
        out.write(json.dumps({"kind": kind, "at": time.time(), **data}) + "\n")


# ---------------------------------------------------------------- update records on the wire


def _patch_published_updates(rewrites: dict[str, Callable[[dict[str, Any]], dict[str, Any]]]) -> None:
    """Rewrite the body of every update record this peer signs in a mode of ``rewrites``, and
    report every update it publishes."""
    from node.gossip import Gossip
    from protocol.cid import content_id
    from protocol.kinds import UPDATE

    original = Gossip.publish

    async def publish(self: Gossip, kind: str, version: int, body: Any) -> bytes | None:
        if kind != UPDATE:
            return await original(self, kind, version, body)
        honest = dict(body)
        rewrite = rewrites.get(mode())
        forged = rewrite(dict(body)) if rewrite is not None else honest
        raw = await original(self, kind, version, forged)
        if raw is not None:
            report("update", mode=mode(), id=content_id(raw), round=forged["round"], artifact=forged["artifact"],
                   trained_artifact=honest["artifact"], samples=forged["samples"],
                   microshards=len(forged["microshards"]))
        return raw

    Gossip.publish = publish  # type: ignore[method-assign]


def _inflated(body: dict[str, Any]) -> dict[str, Any]:
    body["samples"] = INFLATED_SAMPLES
    return body


class _Replay:
    """Each round's update names the artifact this peer published the round before."""

    def __init__(self) -> None:
        self.previous: str | None = None

    def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
        trained = body["artifact"]
        if self.previous is not None and self.previous != trained:
            body["artifact"] = self.previous
        self.previous = trained
        return body

    def remember(self, body: dict[str, Any]) -> dict[str, Any]:
        """In other modes: only note the artifact, so the first replayed round has one to replay."""
        self.previous = body["artifact"]
        return body


# ---------------------------------------------------------------- pseudo-gradients


DELTA_SCALES = {"x100": 100.0, "sign_flip": -1.0, "nan": float("nan")}


def _patch_training() -> None:
    """Scale the pseudo-gradient (x100, sign_flip, nan), or train from genesis' weights while the
    update names the current head as its base (stale_base)."""
    from node.trainer import Trainer

    from node.diloco import OuterLoop

    original = Trainer.train_round
    original_round = OuterLoop._train_and_publish
    holds_tail = False

    async def train_and_publish(self: OuterLoop, base: Any, epoch: int, shards: list[str], weights: Any,
                                max_steps: int, *args: Any) -> bool:
        nonlocal holds_tail
        holds_tail = mode() == "tail_nan" and self._steps_for(shards, max_steps) < max_steps
        if holds_tail:
            report("tail_nan", round=base.round + 1, microshards=len(shards),
                   holds_all=self._ledger(base).remaining <= frozenset(shards))
        try:
            return await original_round(self, base, epoch, shards, weights, max_steps, *args)
        finally:
            holds_tail = False

    async def train_round(self: Trainer, weights: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        now = mode()
        if now == "stale_base":
            weights = self.initial_weights()
        result = await original(self, weights, *args, **kwargs)
        factor = DELTA_SCALES.get("nan" if holds_tail else now)
        if factor is None:
            return result
        return dataclasses.replace(result, delta={name: t * factor for name, t in result.delta.items()})

    Trainer.train_round = train_round  # type: ignore[method-assign]
    OuterLoop._train_and_publish = train_and_publish  # type: ignore[method-assign]


# ---------------------------------------------------------------- leases


def _patch_lease_flood() -> None:
    """Every round, claim every microshard not yet done, then lease as much as the rule lets it."""
    from node.gossip import now_ms
    from node.leasing import LEASE_VERSION, Leasing
    from protocol.kinds import LEASE
    from protocol.leases import LeaseClaim

    original = Leasing.claim

    async def claim(self: Leasing, epoch: int, round: int, free: frozenset[str], wanted: int, speed: float,
                    total_speed: float, live_peers: list[str]) -> frozenset[str]:
        if mode() != "lease_flood":
            return await original(self, epoch, round, free, wanted, speed, total_speed, live_peers)
        if free:
            issued = now_ms()
            grab = LeaseClaim.create(self._peer, epoch, round, free, issued, issued + self._lease_ms)
            await self._gossip.publish(LEASE, LEASE_VERSION, grab.to_wire())
            report("lease_flood", round=round, microshards=len(free))
        return await original(self, epoch, round, free, len(free), total_speed, total_speed, live_peers)

    Leasing.claim = claim  # type: ignore[method-assign]


# ---------------------------------------------------------------- background misbehaviour


def _patch_outer_run(*side_tasks: Callable[[Any], Any]) -> None:
    """Run each ``side_task(outer_loop)`` beside the outer loop for the daemon's whole life."""
    from node.diloco import OuterLoop

    original = OuterLoop.run

    async def run(self: OuterLoop) -> None:
        async with asyncio.TaskGroup() as tasks:
            for side_task in side_tasks:
                tasks.create_task(side_task(self))
            tasks.create_task(original(self))

    OuterLoop.run = run  # type: ignore[method-assign]


def _random_cid(rng: random.Random) -> str:
    return "b3:" + rng.randbytes(32).hex()


async def _flood(outer: Any) -> None:
    """Valid signed records that cost the receivers state: leases for future rounds, evals of
    heads that do not exist, updates for rounds ahead naming artifacts that do not exist."""
    from node.diloco import UPDATE_VERSION
    from node.gossip import now_ms
    from node.leasing import LEASE_VERSION
    from protocol.evals import EVAL_KIND, EVAL_VERSION, EvalRecord
    from protocol.kinds import LEASE, UPDATE
    from protocol.leases import LeaseClaim
    from protocol.updates import InnerMetrics, UpdateRecord

    rng = random.Random(7)
    while outer.heads is None or outer.source is None:
        await asyncio.sleep(0.2)
    planned = sorted(outer.source.ids)
    sent = 0
    while True:
        if mode() != "record_flood":
            await asyncio.sleep(0.2)
            continue
        started = time.monotonic()
        current = outer.heads.canonical().round
        for _ in range(FLOOD_PER_S // 10):
            choice = sent % 3
            shards = sorted(rng.sample(planned, min(len(planned), rng.randint(1, 8))))
            if choice == 0:
                issued = now_ms()
                claim = LeaseClaim.create(outer.peer_id, rng.randint(0, 3), current + rng.randint(2, 50), shards,
                                          issued, issued + 3_600_000 - 1000)
                await outer.gossip.publish(LEASE, LEASE_VERSION, claim.to_wire())
            elif choice == 1:
                result = EvalRecord(_random_cid(rng), "val", rng.random(), rng.randint(1, 10_000))
                await outer.gossip.publish(EVAL_KIND, EVAL_VERSION, result.to_wire())
            else:
                update = UpdateRecord(
                    round=current + rng.randint(1, 4), base=_random_cid(rng), artifact=_random_cid(rng),
                    codec="int8", samples=64, tokens=0, microshards=tuple(shards), epoch=0,
                    metrics=InnerMetrics(loss=1.0, steps=10, inner_ms=100), peer=outer.peer_id,
                )
                await outer.gossip.publish(UPDATE, UPDATE_VERSION, update.to_wire())
            sent += 1
        report("flood", sent=sent)  # ten lines a second: a short phase still says how much it sent
        await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - started)))


def _binding(peer: str, base: str, round: int) -> str | None:
    """What an honest artifact names as made for (peer, base, round), where the protocol has it:
    a forger binds its artifacts as any peer does."""
    try:
        from protocol.updates import update_binding  # type: ignore[attr-defined]
    except ImportError:
        return None
    return str(update_binding(peer, base, round))


async def _forge_ancestors(outer: Any) -> None:
    """Every time the canonical head moves to round r, publish a head of round r+2 whose parent
    is a forged head of round r+1 (no updates, noise for weights) that is never announced itself:
    it is only served to peers that ask for it by id."""
    from node.artifacts import store_artifact
    from node.diloco import UPDATE_VERSION
    from node.merge import NothingMerged
    from protocol import canonical
    from protocol.codecs import FP32
    from protocol.kinds import UPDATE
    from protocol.updates import InnerMetrics, UpdateRecord

    forged_from: set[str] = set()
    generator = torch.Generator().manual_seed(11)
    while outer.heads is None or outer.source is None or outer.leasing is None:
        await asyncio.sleep(0.2)
    while True:
        await asyncio.sleep(0.5)
        if mode() != "forged_ancestors":
            continue
        base = outer.heads.canonical()
        if base.parent is None or base.id in forged_from or outer.view.phase in ("syncing", "starting"):
            continue
        forged_from.add(base.id)
        try:
            weights = await outer._ensure_state(base)
            noise = {name: tensor + 3.0 * torch.randn(tensor.shape, generator=generator)
                     for name, tensor in weights.items()}
            weights_id = await asyncio.to_thread(store_artifact, outer.store, noise, FP32, outer.chunking)
            outer.availability.add_held(weights_id)
            forged_parent = dataclasses.replace(
                base, parent=base.id, round=base.round + 1, updates=(), excluded=(), weights=weights_id,
                samples=0, tokens=0, microshards=(), eval=None, rollback=outer.heads.marker_for(base),
            )
            await asyncio.to_thread(outer.store.put_record, canonical.encode(forged_parent.to_wire()),
                                    forged_parent.id)
            # An update that claims the forged parent as its base, so that a head of round r+2 can be
            # merged from it; trained from the real weights, so its norm passes any screen.
            ledger = outer._ledger(base)
            shards = sorted(ledger.remaining)[:2] or sorted(outer.source.ids)[:2]
            data = await outer.source.bytes_of(shards)
            trained = await outer.trainer.train_round(weights, data, 2, 1)
            binding = _binding(outer.peer_id, forged_parent.id, base.round + 2)
            extra = (binding,) if binding is not None else ()
            artifact = await asyncio.to_thread(store_artifact, outer.store, trained.delta, FP32, outer.chunking, *extra)
            outer.availability.add_held(artifact)
            update = UpdateRecord(
                round=base.round + 2, base=forged_parent.id, artifact=artifact, codec="fp32",
                samples=max(1, trained.metrics.examples), tokens=trained.metrics.tokens,
                microshards=tuple(shards), epoch=ledger.rolled().epoch,
                metrics=InnerMetrics(loss=float(trained.metrics.loss_mean), steps=trained.metrics.steps,
                                     inner_ms=int(trained.metrics.seconds * 1000)),
                peer=outer.peer_id,
            )
            raw = await outer.gossip.publish(UPDATE, UPDATE_VERSION, update.to_wire())
            if raw is None:
                continue
            record = outer.gossip.validate(raw)
            await asyncio.to_thread(outer.store.put_record, raw, record.id)
            # Merged as any peer would merge it, the forged parent standing in for a real head.
            real_ledger = outer._ledger
            outer._ledger = lambda head: real_ledger(base) if head.id == forged_parent.id else real_ledger(head)
            try:
                head = await outer.receipt.compute(forged_parent, [record.id], outer.rule())
            except NothingMerged:
                report("forge_failed", base=base.id, why="merge gave no head")
                continue
            finally:
                del outer._ledger
            await outer.heads.publish(head)
            report("forged", base=base.id, base_round=base.round, parent=forged_parent.id, head=head.id,
                   round=head.round, update=record.id)
        except Exception as exc:  # the forger keeps trying; the test reads what it managed
            report("forge_failed", base=base.id, why=f"{type(exc).__name__}: {exc}"[:300])


# ---------------------------------------------------------------- the launcher


def install() -> None:
    """Patch the node classes for every mode (before the daemon builds anything)."""
    replay = _Replay()
    _patch_published_updates({"inflated_samples": _inflated, "replay": replay,
                              **{m: replay.remember for m in MODES if m not in ("inflated_samples", "replay")}})
    _patch_training()
    _patch_lease_flood()
    _patch_outer_run(_flood, _forge_ancestors)


def main(argv: list[str] | None = None) -> int:
    global _report_path, _mode_path
    parser = argparse.ArgumentParser(prog="hostile_daemon", description=__doc__)
    parser.add_argument("--mode-file", required=True, help=f"holds one of: {', '.join(MODES)}")
    parser.add_argument("--config", required=True)
    parser.add_argument("--report", required=True)
    args = parser.parse_args(argv)
    _report_path, _mode_path = Path(args.report), Path(args.mode_file)
    install()
    report("started", mode=mode(), pid=os.getpid())
    from node.cli import main as cli_main

    return cli_main(["start", "--config", args.config])


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
