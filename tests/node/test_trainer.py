"""The Trainer: torch off the event loop, stops at a step boundary, keeps its inner optimizer, exact deltas."""

from __future__ import annotations

import asyncio
import shutil
import statistics
import time
from pathlib import Path

import pytest
import torch
import uvloop

from node.trainer import INNER_STATE_FILE, InnerResult, Trainer
from workloads.base import TrainMetrics, Workload
from workloads.registry import load_workload
from workloads.tiny import Tiny

# A charlm small enough that a step is a few milliseconds on a loaded 2-core machine.
SMALL_CHARLM = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32, "batch_size": 8}
TICK_S = 0.01


def charlm() -> Workload:
    return load_workload("charlm", SMALL_CHARLM)


def run(coro):  # type: ignore[no-untyped-def]
    return uvloop.run(coro)


async def prepared(workload: Workload, data_dir: Path, seed: int = 0) -> Trainer:
    trainer = Trainer(workload, "cpu", data_dir, seed)
    await trainer.prepare()
    return trainer


def bare_delta(
    workload: Workload, base: dict[str, torch.Tensor], data: list[bytes], steps: int, seed: int
) -> dict[str, torch.Tensor]:
    """The pseudo-gradient of the same round run the plain way: fresh model and optimizer, main thread."""
    model = workload.init_model(0, "cpu")
    with torch.no_grad():
        model.load_state_dict(base)
    state = workload.new_inner_state(model)
    workload.train(model, state, data, steps, "cpu", seed=seed)
    return {name: base[name] - tensor.detach().float() for name, tensor in model.state_dict().items()}


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name].dtype == torch.float32 and actual[name].device.type == "cpu", name
        assert torch.equal(actual[name], expected[name]), f"{name} differs by {(actual[name] - expected[name]).abs().max()}"


def test_loop_stays_responsive_and_stop_lands_on_a_step_boundary(tmp_path):
    workload = charlm()
    data = [workload.microshard_bytes(0), workload.microshard_bytes(1)]

    async def main() -> tuple[dict[str, torch.Tensor], list[float], InnerResult, float, int]:
        trainer = await prepared(workload, tmp_path)
        base = trainer.initial_weights()
        ticks: list[float] = []
        training = asyncio.create_task(trainer.train_round(base, data, 10**9, seed=7))
        try:
            # Tick while training runs; a loop blocked by torch would not tick at all.
            start = time.perf_counter()
            while time.perf_counter() - start < 1.5:
                await asyncio.sleep(TICK_S)
                ticks.append(time.perf_counter())
            assert not training.done(), "a round of 10**9 steps ended by itself"
            trainer.request_stop()
            stopped_at = time.perf_counter()
            result = await asyncio.wait_for(training, 30)
            returned_after = time.perf_counter() - stopped_at
        finally:
            trainer.request_stop()
        assert trainer.inner is not None
        return base, ticks, result, returned_after, trainer.inner.steps

    base, ticks, result, returned_after, inner_steps = run(main())
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    # 1.5 s at 10 ms is ~150 ticks; scheduler noise on a busy box may stretch some, blocking would stop all.
    assert len(ticks) >= 40, f"only {len(ticks)} ticks in 1.5 s while training"
    assert statistics.median(gaps) < 0.05, f"median tick gap {statistics.median(gaps):.3f} s"
    assert max(gaps) < 0.5, f"the event loop stalled for {max(gaps):.3f} s"

    metrics = result.metrics
    assert metrics.stopped_early and 1 <= metrics.steps < 10**9
    assert returned_after < 10, f"stop took {returned_after:.1f} s to land"
    assert inner_steps == metrics.steps, "the inner step count must match the steps actually taken"
    # Whole steps only: the pseudo-gradient is exactly that of a bare run of metrics.steps steps.
    assert_same_tensors(result.delta, bare_delta(workload, base, data, metrics.steps, seed=7))


def test_a_time_budget_ends_the_round_on_a_step_boundary_without_counting_as_interrupted(tmp_path):
    workload = charlm()
    data = [workload.microshard_bytes(0), workload.microshard_bytes(1)]

    async def main() -> tuple[dict[str, torch.Tensor], InnerResult, float, bool]:
        trainer = await prepared(workload, tmp_path)
        base = trainer.initial_weights()
        started = time.perf_counter()
        result = await trainer.train_round(base, data, 10**9, seed=3, time_budget_s=0.5)
        return base, result, time.perf_counter() - started, trainer.interrupted

    base, result, took, interrupted = run(main())
    metrics = result.metrics
    assert metrics.stopped_early and not interrupted
    # A budget already spent before training starts still yields one step, not an empty update.
    (tmp_path / "spent").mkdir()

    async def spent() -> InnerResult:
        trainer = await prepared(workload, tmp_path / "spent")
        return await trainer.train_round(trainer.initial_weights(), data, 10**9, seed=3, time_budget_s=0.0)

    assert run(spent()).metrics.steps == 1
    assert 1 <= metrics.steps < 10**9
    assert 0.25 <= metrics.seconds < 5.0 and 0.5 <= took < 10.0  # the budget also covers decoding the data
    assert_same_tensors(result.delta, bare_delta(workload, base, data, metrics.steps, seed=3))


def test_pseudo_gradient_is_base_minus_local_exactly(tmp_path):
    workload = charlm()
    data = [workload.microshard_bytes(3)]

    async def main() -> tuple[InnerResult, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        trainer = await prepared(workload, tmp_path)
        base = trainer.initial_weights()
        # Move the base away from genesis so the check does not depend on the seeded init alone.
        base = {k: v + 0.01 * torch.sin(torch.arange(v.numel(), dtype=torch.float32)).view_as(v) for k, v in base.items()}
        result = await trainer.train_round(base, data, 5, seed=11)
        assert trainer.model is not None
        local = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        return result, base, local

    result, base, local = run(main())
    assert result.metrics.steps == 5 and not result.metrics.stopped_early
    assert_same_tensors(result.delta, {k: base[k] - local[k] for k in base})
    assert any(bool(result.delta[k].abs().max() > 0) for k in base), "training changed nothing"
    assert_same_tensors(result.delta, bare_delta(workload, base, data, 5, seed=11))


def test_inner_optimizer_state_survives_a_restart(tmp_path):
    workload = charlm()
    first_dir, restarted_dir, fresh_dir = tmp_path / "first", tmp_path / "restarted", tmp_path / "fresh"
    for d in (first_dir, fresh_dir):
        d.mkdir()
    data = [workload.microshard_bytes(5)]

    async def round_two(trainer: Trainer, base: dict[str, torch.Tensor]) -> InnerResult:
        return await trainer.train_round(base, data, 4, seed=2)

    async def main() -> tuple[InnerResult, InnerResult, InnerResult, int]:
        first = await prepared(workload, first_dir)
        genesis = first.initial_weights()
        one = await first.train_round(genesis, data, 4, seed=1)
        assert (first_dir / INNER_STATE_FILE).is_file()
        shutil.copytree(first_dir, restarted_dir)
        base = {k: genesis[k] - one.delta[k] for k in genesis}
        continued = await round_two(first, base)
        restarted = await prepared(workload, restarted_dir)  # a new process would do exactly this
        assert restarted.inner is not None
        restored_steps = restarted.inner.steps
        resumed = await round_two(restarted, base)
        fresh = await round_two(await prepared(workload, fresh_dir), base)
        return continued, resumed, fresh, restored_steps

    continued, resumed, fresh, restored_steps = run(main())
    assert restored_steps == 4
    assert_same_tensors(resumed.delta, continued.delta)
    # The check has teeth: without the saved AdamW moments the same round goes elsewhere.
    assert any(not torch.equal(fresh.delta[k], continued.delta[k]) for k in continued.delta)


def test_unreadable_inner_state_starts_fresh(tmp_path):
    (tmp_path / INNER_STATE_FILE).write_bytes(b"not a torch file")

    async def main() -> int:
        trainer = await prepared(Tiny(), tmp_path)
        assert trainer.inner is not None
        return trainer.inner.steps

    assert run(main()) == 0


class BrokenTiny(Tiny):
    """Tiny whose inner loop raises on demand, as a buggy workload would."""

    broken = True

    def train(self, *args, **kwargs) -> TrainMetrics:  # type: ignore[no-untyped-def]
        if self.broken:
            raise RuntimeError("inner loop exploded")
        return super().train(*args, **kwargs)


def test_a_failing_round_is_reported_then_cleared(tmp_path):
    workload = BrokenTiny()

    async def main() -> tuple[str | None, bool, str | None]:
        trainer = await prepared(workload, tmp_path)
        base = trainer.initial_weights()
        with pytest.raises(RuntimeError, match="exploded"):
            await trainer.train_round(base, [workload.microshard_bytes(0)], 3, seed=0)
        error = trainer.last_error
        saved = (tmp_path / INNER_STATE_FILE).exists()
        workload.broken = False
        await trainer.train_round(base, [workload.microshard_bytes(0)], 3, seed=0)
        return error, saved, trainer.last_error

    error, saved_after_failure, error_after_success = run(main())
    assert error == "RuntimeError: inner loop exploded"
    assert not saved_after_failure, "a failed round must not overwrite the inner state"
    assert error_after_success is None


def test_evaluation_loads_the_weights_into_an_empty_model_and_gives_the_seeded_models_loss(tmp_path):
    workload = charlm()
    weights = workload.init_model(7, "cpu").state_dict()

    async def main() -> float:
        trainer = await prepared(workload, tmp_path)
        return (await trainer.evaluate(weights)).loss

    model = workload.init_model(0, "cpu")
    with torch.no_grad():
        model.load_state_dict(weights)
    assert run(main()) == workload.evaluate(model, "val", "cpu").loss


def test_the_inner_state_is_saved_after_the_first_round_then_at_most_as_often_as_configured(tmp_path):
    workload = Tiny()
    data = [workload.microshard_bytes(0)]

    async def rounds(data_dir: Path, every_s: float) -> list[int]:
        data_dir.mkdir()
        trainer = Trainer(workload, "cpu", data_dir, 0, inner_state_every_s=every_s)
        await trainer.prepare()
        base = trainer.initial_weights()
        saved = []
        for seed in range(3):
            await trainer.train_round(base, data, 2, seed=seed)
            saved.append((data_dir / INNER_STATE_FILE).stat().st_mtime_ns)
        return saved

    rare = run(rounds(tmp_path / "rare", 3600.0))
    every = run(rounds(tmp_path / "every", 0.0))
    assert rare[0] == rare[1] == rare[2], "saved again within the interval"
    assert every[0] < every[1] < every[2], "not saved after every round"


def close_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    # Rebasing adds (head - local at publish) to the weights, a rounding away from loading the head.
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_round_trained_ahead_and_rebased_before_its_first_step_is_the_round_trained_from_the_head(tmp_path):
    workload = charlm()
    first, second = [workload.microshard_bytes(0)], [workload.microshard_bytes(1)]

    async def scenario() -> tuple[InnerResult, InnerResult]:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        ahead = await prepared(workload, tmp_path / "a")
        plain = await prepared(workload, tmp_path / "b")
        base = ahead.initial_weights()
        await ahead.train_round(base, first, 4, seed=1, keep_local=True)
        await plain.train_round(base, first, 4, seed=1)
        head = {name: tensor + 0.01 for name, tensor in base.items()}  # any head: a merge moved the weights
        ahead.rebase(head)
        rebased = await ahead.train_ahead(second, 5, seed=2)
        assert rebased is not None
        return rebased, await plain.train_round(head, second, 5, seed=2)

    rebased, plain = run(scenario())
    assert rebased.metrics.steps == plain.metrics.steps == 5
    close_tensors(rebased.delta, plain.delta)


def test_a_rebase_after_the_last_step_keeps_the_local_progress_against_the_head(tmp_path):
    workload = charlm()
    first, second = [workload.microshard_bytes(0)], [workload.microshard_bytes(1)]

    async def scenario() -> tuple[InnerResult, InnerResult]:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        ahead = await prepared(workload, tmp_path / "a")
        plain = await prepared(workload, tmp_path / "b")
        base = ahead.initial_weights()
        published = await ahead.train_round(base, first, 4, seed=1, keep_local=True)
        await plain.train_round(base, first, 4, seed=1)
        local_at_publish = {name: base[name] - published.delta[name] for name in base}
        before = ahead.inner_seconds
        training = asyncio.create_task(ahead.train_ahead(second, 5, seed=2))
        while ahead.inner_seconds <= before or ahead._round_started is not None:  # every step done, waiting for the head
            await asyncio.sleep(TICK_S)
        await asyncio.sleep(0.1)
        assert not training.done()
        ahead.rebase({name: tensor * 2 for name, tensor in base.items()})
        result = await training
        assert result is not None
        # The progress from the local weights, whatever head it is taken against.
        return result, await plain.train_round(local_at_publish, second, 5, seed=2)

    rebased, plain = run(scenario())
    assert rebased.metrics.steps == 5
    close_tensors(rebased.delta, plain.delta)


def test_an_abandoned_round_trained_ahead_ends_without_a_result_and_frees_the_trainer(tmp_path):
    import threading

    workload = charlm()
    data = [workload.microshard_bytes(0)]

    async def scenario() -> None:
        trainer = await prepared(workload, tmp_path)
        base = trainer.initial_weights()
        await trainer.train_round(base, data, 2, seed=1, keep_local=True)
        cancel = threading.Event()
        waiting = asyncio.create_task(trainer.train_ahead(data, 10_000, seed=2, cancel=cancel))
        await asyncio.sleep(0.2)
        trainer.abandon(cancel)
        assert await asyncio.wait_for(waiting, 30) is None
        with pytest.raises(RuntimeError):  # the local weights went with it: nothing to continue from
            await trainer.train_ahead(data, 1, seed=3)
        # Stopped for the daemon's shutdown while it waits for its head.
        await trainer.train_round(base, data, 2, seed=1, keep_local=True)
        waiting = asyncio.create_task(trainer.train_ahead(data, 1, seed=2))
        await asyncio.sleep(0.2)
        trainer.request_stop()
        assert await asyncio.wait_for(waiting, 30) is None
        result = await trainer.train_round(base, data, 2, seed=1)
        assert result.metrics.steps == 2

    run(scenario())
