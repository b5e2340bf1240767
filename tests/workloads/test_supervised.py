"""The shared inner loop, run through the tiny workload: exact steps, stopping, state, settings."""

from __future__ import annotations

import pytest
import torch

from workloads.base import InnerState, WorkloadError
from workloads.tiny import Tiny, TinyConfig


def state_bytes(model: torch.nn.Module) -> dict[str, bytes]:
    return {k: v.detach().cpu().numpy().tobytes() for k, v in model.state_dict().items()}


@pytest.fixture
def tiny() -> Tiny:
    return Tiny()


def shards(workload: Tiny, count: int = 4) -> list[bytes]:
    return [workload.microshard_bytes(i) for i in range(count)]


def test_train_runs_exactly_the_steps_asked(tiny: Tiny) -> None:
    model = tiny.init_model(0)
    state = tiny.new_inner_state(model)
    # 2 microshards = 128 examples = 4 batches, so 37 steps cycle through them ~9 times.
    metrics = tiny.train(model, state, shards(tiny, 2), 37)
    assert (metrics.steps, metrics.examples, metrics.tokens) == (37, 37 * 32, 37 * 32)
    assert not metrics.stopped_early and metrics.seconds > 0
    assert state.steps == 37
    assert state.optimizer.state_dict()["state"][0]["step"].item() == 37


def test_zero_steps_changes_nothing(tiny: Tiny) -> None:
    model = tiny.init_model(0)
    before = state_bytes(model)
    metrics = tiny.train(model, tiny.new_inner_state(model), [], 0)
    assert metrics.steps == 0 and state_bytes(model) == before


def test_should_stop_interrupts_at_a_step_boundary(tiny: Tiny) -> None:
    model = tiny.init_model(0)
    state = tiny.new_inner_state(model)
    calls = 0

    def should_stop() -> bool:
        nonlocal calls
        calls += 1
        return calls > 5

    metrics = tiny.train(model, state, shards(tiny), 100, should_stop=should_stop)
    assert metrics.steps == 5 and metrics.stopped_early and state.steps == 5
    assert metrics.examples == 5 * 32


def test_data_order_follows_the_seed(tiny: Tiny) -> None:
    def run(seed: int) -> dict[str, bytes]:
        model = tiny.init_model(0)
        tiny.train(model, tiny.new_inner_state(model), shards(tiny), 10, seed=seed)
        return state_bytes(model)

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_inner_state_round_trip_continues_identically(tiny: Tiny) -> None:
    model = tiny.init_model(0)
    state = tiny.new_inner_state(model)
    tiny.train(model, state, shards(tiny), 7, seed=1)
    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}
    saved_state = tiny.save_inner_state(state)

    tiny.train(model, state, shards(tiny), 7, seed=2)
    uninterrupted = state_bytes(model)

    restarted = tiny.init_model(99)
    restarted.load_state_dict(saved_weights)
    resumed = tiny.load_inner_state(restarted, saved_state)
    assert resumed.steps == 7
    tiny.train(restarted, resumed, shards(tiny), 7, seed=2)
    assert state_bytes(restarted) == uninterrupted


def test_corrupt_inner_state_is_a_workload_error(tiny: Tiny) -> None:
    model = tiny.init_model(0)
    with pytest.raises(WorkloadError, match="cannot load inner state"):
        tiny.load_inner_state(model, b"not a checkpoint")


def test_inner_state_from_another_model_shape_is_rejected() -> None:
    small, big = Tiny(), Tiny(TinyConfig(hidden=64))
    saved = small.save_inner_state(small.new_inner_state(small.init_model(0)))
    trained = small.init_model(0)
    state = small.new_inner_state(trained)
    small.train(trained, state, shards(small), 1)
    with pytest.raises(WorkloadError):
        big.load_inner_state(big.init_model(0), small.save_inner_state(state))
    assert isinstance(small.load_inner_state(small.init_model(0), saved), InnerState)


def test_settings_apply_to_the_next_train_call(tiny: Tiny) -> None:
    model = tiny.init_model(0)
    state = tiny.new_inner_state(model)
    tiny.apply_settings({"lr": 0.5, "batch_size": 8})
    assert tiny.settings() == {
        "lr": 0.5, "batch_size": 8, "weight_decay": 0.0, "grad_clip": 0.0,
        "warmup_steps": 0, "decay_steps": 0, "min_lr_ratio": 0.1,
    }
    metrics = tiny.train(model, state, shards(tiny), 3)
    assert metrics.examples == 24
    assert {g["lr"] for g in state.optimizer.param_groups} == {0.5}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"momentum": 0.9}, "unsupported setting 'momentum'"),
        ({"lr": "high"}, "'lr' must be float"),
        ({"lr": -1.0}, "'lr' must be > 0"),
        ({"batch_size": 0}, "'batch_size' must be >= 1"),
        ({"lr": 0.1, "batch_size": 2.5}, "'batch_size' must be int"),
        ({"warmup_steps": 10, "decay_steps": 10}, "'decay_steps' \\(10\\) must exceed 'warmup_steps'"),
        ({"min_lr_ratio": 1.5}, "'min_lr_ratio' must be between 0 and 1"),
        ({"warmup_steps": -1}, "must be >= 0"),
    ],
)
def test_bad_settings_are_rejected_whole(tiny: Tiny, changes: dict[str, object], message: str) -> None:
    before = tiny.settings()
    with pytest.raises(WorkloadError, match=message):
        tiny.apply_settings(changes)
    assert tiny.settings() == before


def test_the_inner_lr_schedule_warms_up_decays_and_holds_its_floor() -> None:
    tiny = Tiny(TinyConfig(lr=0.1, warmup_steps=4, decay_steps=14, min_lr_ratio=0.1))
    assert [round(tiny.lr_at(s), 6) for s in range(4)] == [0.025, 0.05, 0.075, 0.1]
    assert tiny.lr_at(4) == pytest.approx(0.1)
    assert tiny.lr_at(9) == pytest.approx(0.055)  # half way through the cosine: the mean of lr and floor
    assert tiny.lr_at(14) == pytest.approx(0.01) and tiny.lr_at(1000) == pytest.approx(0.01)
    assert all(tiny.lr_at(s) >= tiny.lr_at(s + 1) for s in range(4, 30))
    assert Tiny().lr_at(12345) == Tiny().settings()["lr"]  # no schedule: constant


def test_train_follows_the_schedule_across_calls() -> None:
    scheduled = Tiny(TinyConfig(lr=0.1, warmup_steps=4, decay_steps=14))
    model = scheduled.init_model(0)
    state = scheduled.new_inner_state(model)
    scheduled.train(model, state, shards(scheduled), 3)
    assert [g["lr"] for g in state.optimizer.param_groups] == [pytest.approx(scheduled.lr_at(2))] * 2
    scheduled.train(model, state, shards(scheduled), 7)  # counts on from the persisted step count
    assert state.steps == 10
    assert [g["lr"] for g in state.optimizer.param_groups] == [pytest.approx(scheduled.lr_at(9))] * 2


def test_train_rejects_an_unsupported_device(tiny: Tiny) -> None:
    model = tiny.init_model(0)
    with pytest.raises(WorkloadError, match="not supported"):
        tiny.train(model, tiny.new_inner_state(model), shards(tiny), 1, device="meta")


def test_train_without_data_is_an_error(tiny: Tiny) -> None:
    model = tiny.init_model(0)
    with pytest.raises(WorkloadError, match="at least one microshard"):
        tiny.train(model, tiny.new_inner_state(model), [], 1)
    with pytest.raises(WorkloadError, match="no complete example"):
        tiny.train(model, tiny.new_inner_state(model), [b""], 1)


def test_probe_measures_steps_per_second(tiny: Tiny) -> None:
    capability = tiny.probe("cpu")
    assert capability.device == "cpu" and capability.steps_per_second > 0
    assert capability.parameters == sum(p.numel() for p in tiny.init_model(0).parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_train_and_evaluate_on_cuda(tiny: Tiny) -> None:
    model = tiny.init_model(0, "cuda")
    assert next(model.parameters()).is_cuda
    cpu_model = tiny.init_model(0, "cpu")
    assert all(torch.equal(a.cpu(), b) for a, b in zip(model.state_dict().values(), cpu_model.state_dict().values()))
    state = tiny.new_inner_state(model)
    before = tiny.evaluate(model, device="cuda").loss
    metrics = tiny.train(model, state, shards(tiny), 50, device="cuda")
    assert metrics.steps == 50
    assert tiny.evaluate(model, device="cuda").loss < before
    resumed = tiny.load_inner_state(model, tiny.save_inner_state(state))
    assert resumed.optimizer.state_dict()["state"][0]["exp_avg"].is_cuda
    assert tiny.probe("cuda").device.startswith("cuda")
