"""The tiny workload: seeded data, falling loss, frozen layers."""

from __future__ import annotations

import pytest
import torch

from protocol.cid import matches
from protocol.dataset import DatasetDescription, plan_microshards
from workloads.base import WorkloadError, schema_of
from workloads.tiny import Tiny, TinyConfig


def weights(model: torch.nn.Module) -> dict[str, bytes]:
    return {k: v.numpy().tobytes() for k, v in model.state_dict().items()}


def test_same_seed_same_weights_without_touching_global_rng() -> None:
    rng_before = torch.get_rng_state()
    a, b = Tiny().init_model(7), Tiny().init_model(7)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert weights(a) == weights(b)
    assert weights(a) != weights(Tiny().init_model(8))


def test_schema_matches_the_model() -> None:
    tiny = Tiny()
    assert schema_of(tiny.init_model(0)) == tiny.model_schema()
    assert tiny.schema_hash() == Tiny().schema_hash() != Tiny(TinyConfig(hidden=8)).schema_hash()


def test_dataset_is_stable_and_content_addressed() -> None:
    tiny = Tiny()
    description = tiny.dataset()
    assert description.dataset_id == Tiny().dataset().dataset_id
    assert DatasetDescription.from_wire(description.to_wire()) == description
    assert len(plan_microshards(description)) == 32
    for index, source in enumerate(description.microshards):
        data = tiny.microshard_bytes(index)
        assert matches(source.data_cid, data)
        x, y = tiny.decode_microshard(data)
        assert x.shape == (source.examples, 16) and y.shape == (source.examples,)
    assert len({m.data_cid for m in description.microshards}) == 32
    assert Tiny(TinyConfig(data_seed=1)).dataset().dataset_id != description.dataset_id


def test_labels_are_not_trivial() -> None:
    _, y = Tiny().split_examples("val")
    counts = torch.bincount(y, minlength=4)
    assert counts.min() > len(y) // 10


def test_loss_falls() -> None:
    tiny = Tiny()
    model = tiny.init_model(0)
    state = tiny.new_inner_state(model)
    before = tiny.evaluate(model)
    tiny.train(model, state, [tiny.microshard_bytes(i) for i in range(16)], 300)
    after = tiny.evaluate(model)
    assert after.examples == before.examples == 512
    assert after.loss < 0.6 * before.loss
    assert tiny.evaluate(model).loss == after.loss


def test_frozen_layers_do_not_change() -> None:
    tiny = Tiny(TinyConfig(freeze=("hidden",)))
    model = tiny.init_model(0)
    before = weights(model)
    tiny.train(model, tiny.new_inner_state(model), [tiny.microshard_bytes(0)], 20)
    after = weights(model)
    assert after["hidden.weight"] == before["hidden.weight"]
    assert after["hidden.bias"] == before["hidden.bias"]
    assert after["out.weight"] != before["out.weight"]


def test_freeze_must_name_a_parameter() -> None:
    with pytest.raises(WorkloadError, match="matches no parameter"):
        Tiny(TinyConfig(freeze=("encoder",)))


def test_malformed_microshard_bytes_are_rejected() -> None:
    tiny = Tiny()
    data = tiny.microshard_bytes(0)
    with pytest.raises(WorkloadError, match="whole number"):
        tiny.decode_microshard(data[:-1])
    with pytest.raises(WorkloadError, match="label"):
        tiny.decode_microshard(data[:-1] + b"\xff")


def test_unknown_split_is_rejected() -> None:
    with pytest.raises(WorkloadError, match="no split 'test'"):
        Tiny().evaluate(Tiny().init_model(0), split="test")
