"""Device parsing, option checking and model schema ids."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from protocol.cid import is_content_id
from workloads.base import (
    DeviceUnavailable,
    ParamSpec,
    WorkloadError,
    config_from_options,
    resolve_device,
    schema_id,
    seeded_generator,
)

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def test_cpu_resolves() -> None:
    assert resolve_device("cpu") == torch.device("cpu")


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_a_clear_error(device: str) -> None:
    with pytest.raises(DeviceUnavailable, match="CUDA is not available") as info:
        resolve_device(device)
    assert device in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("device", ["gpu", "mps", "tpu:0", ""])
def test_unknown_devices_are_rejected(device: str) -> None:
    with pytest.raises(DeviceUnavailable):
        resolve_device(device)


def test_schema_id_depends_on_every_field() -> None:
    base = [ParamSpec("w", (2, 3), "float32"), ParamSpec("b", (3,), "float32")]
    ids = {
        schema_id(base),
        schema_id(base[::-1]),
        schema_id([ParamSpec("w", (3, 2), "float32"), base[1]]),
        schema_id([ParamSpec("w", (2, 3), "bfloat16"), base[1]]),
        schema_id([ParamSpec("v", (2, 3), "float32"), base[1]]),
    }
    assert len(ids) == 5 and all(is_content_id(i) for i in ids)
    assert schema_id(list(base)) == schema_id(tuple(base))


def test_seeded_generator_is_a_pure_function_of_seed_and_label() -> None:
    draw = lambda seed, label: torch.randn(4, generator=seeded_generator(seed, label))  # noqa: E731
    assert torch.equal(draw(1, "a"), draw(1, "a"))
    assert not torch.equal(draw(1, "a"), draw(2, "a"))
    assert not torch.equal(draw(1, "a"), draw(1, "b"))


@dataclass(frozen=True)
class Example:
    size: int = 1
    rate: float = 0.5
    label: str = "x"
    flag: bool = False
    names: tuple[str, ...] = ()


def test_options_fill_a_config() -> None:
    config = config_from_options(Example, {"size": 3, "rate": 1, "names": ["a", "b"], "flag": True})
    assert config == Example(size=3, rate=1.0, names=("a", "b"), flag=True)
    assert isinstance(config.rate, float)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sise": 3}, "unknown option 'sise'"),
        ({"size": 1.5}, "'size' must be int"),
        ({"size": True}, "'size' must be int"),
        ({"rate": "fast"}, "'rate' must be float"),
        ({"flag": 1}, "'flag' must be bool"),
        ({"names": ["a", 2]}, "'names' must be"),
    ],
)
def test_bad_options_name_the_key(options: dict[str, object], message: str) -> None:
    with pytest.raises(WorkloadError, match=message):
        config_from_options(Example, options)
