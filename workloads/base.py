"""The Workload protocol the node trains through, its small result records and its one error type."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

from protocol import canonical
from protocol.cid import content_id
from protocol.dataset import DatasetDescription


class WorkloadError(Exception):
    """A workload could not be loaded, configured or fed; the message is one line saying why."""


class DeviceUnavailable(WorkloadError):
    """The configured torch device does not exist on this machine."""


@dataclass(frozen=True)
class ParamSpec:
    """One entry of a model schema: a state-dict key, its shape and its dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class TrainMetrics:
    """What one call to ``train`` did; ``examples`` and ``tokens`` count repeats when data cycles."""

    steps: int
    examples: int
    tokens: int
    loss_mean: float
    loss_last: float
    seconds: float
    stopped_early: bool


@dataclass(frozen=True)
class EvalMetrics:
    """Mean loss per example over a held-out split."""

    split: str
    loss: float
    examples: int
    tokens: int


@dataclass(frozen=True)
class Capability:
    """How fast this machine runs the workload's inner steps, measured on a throwaway model."""

    device: str
    device_name: str
    steps_per_second: float
    batch_size: int
    parameters: int


class InnerState:
    """The inner optimizer of one peer's model and how many inner steps it has taken.

    It holds references to the model's parameters: load new outer weights into
    the same model with ``load_state_dict`` rather than replacing the module.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, steps: int = 0) -> None:
        self.optimizer = optimizer
        self.steps = steps


class Workload(Protocol):
    """What the node needs from a workload. ``workloads.registry`` checks a loaded one has all of it.

    Every method is deterministic given its arguments: the same seed gives the
    same weights on every peer (genesis), the same dataset gives the same
    microshard content ids, and ``train`` visits examples in an order fixed by
    its ``seed``. Models are torch modules whose ``state_dict`` matches
    ``model_schema()`` key for key.
    """

    name: str
    supported_settings: Mapping[str, type]

    def model_schema(self) -> tuple[ParamSpec, ...]:
        """The ordered (name, shape, dtype) of every tensor in the model's state dict."""
        ...

    def schema_hash(self) -> str:
        """Content id of the canonical encoding of ``model_schema()``."""
        ...

    def init_model(self, seed: int, device: str = "cpu") -> torch.nn.Module:
        """A freshly initialised model, bit-identical on every peer for the same seed."""
        ...

    def dataset(self) -> DatasetDescription:
        """The training split: one entry per microshard with its bytes' content id and sizes."""
        ...

    def microshard_bytes(self, index: int) -> bytes:
        """The exact bytes of microshard ``index``; they hash to its listed content id."""
        ...

    def new_inner_state(self, model: torch.nn.Module) -> InnerState:
        """A fresh inner optimizer over ``model``'s parameters."""
        ...

    def save_inner_state(self, state: InnerState) -> bytes:
        """Serialise the inner optimizer so it survives a restart."""
        ...

    def load_inner_state(self, model: torch.nn.Module, data: bytes) -> InnerState:
        """Rebuild an inner optimizer over ``model`` from ``save_inner_state`` bytes."""
        ...

    def train(
        self,
        model: torch.nn.Module,
        state: InnerState,
        microshards: Sequence[bytes],
        steps: int,
        device: str = "cpu",
        should_stop: Callable[[], bool] | None = None,
        seed: int = 0,
    ) -> TrainMetrics:
        """Run exactly ``steps`` inner steps on the examples in ``microshards`` unless stopped."""
        ...

    def evaluate(self, model: torch.nn.Module, split: str = "val", device: str = "cpu") -> EvalMetrics:
        """Deterministic loss on a held-out split."""
        ...

    def probe(self, device: str = "cpu") -> Capability:
        """Measure inner steps per second on ``device`` with a throwaway model."""
        ...

    def settings(self) -> dict[str, Any]:
        """Current values of the runtime settings."""
        ...

    def apply_settings(self, changes: Mapping[str, Any]) -> None:
        """Validate all of ``changes`` against ``supported_settings``, then apply them together."""
        ...


REQUIRED_MEMBERS = (
    "name",
    "supported_settings",
    "model_schema",
    "schema_hash",
    "init_model",
    "dataset",
    "microshard_bytes",
    "new_inner_state",
    "save_inner_state",
    "load_inner_state",
    "train",
    "evaluate",
    "probe",
    "settings",
    "apply_settings",
)


def schema_id(schema: Sequence[ParamSpec]) -> str:
    """Content id of a model schema; two peers can only merge models with the same one."""
    return content_id(canonical.encode([[p.name, list(p.shape), p.dtype] for p in schema]))


def schema_of(model: torch.nn.Module) -> tuple[ParamSpec, ...]:
    """The schema of a module's state dict, in state-dict order."""
    return tuple(
        ParamSpec(name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
        for name, tensor in model.state_dict().items()
    )


def resolve_device(device: str | torch.device) -> torch.device:
    """Parse ``cpu``, ``cuda`` or ``cuda:N``; raise DeviceUnavailable when it is not on this machine."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceUnavailable(f"unknown device {device!r}: {exc}") from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type != "cuda":
        raise DeviceUnavailable(f"device {device!r} is not supported; use 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise DeviceUnavailable(
            f"device {device!r} requested but CUDA is not available "
            f"(torch {torch.__version__} is {build}, no usable GPU found); set device = \"cpu\""
        )
    count = torch.cuda.device_count()
    if parsed.index is not None and parsed.index >= count:
        raise DeviceUnavailable(f"device {device!r} requested but only {count} CUDA device(s) exist")
    return parsed


def seeded_generator(seed: int, label: str) -> torch.Generator:
    """A CPU generator seeded from (seed, label), so each tensor's values depend on nothing else."""
    digest = content_id(canonical.encode([seed, label]))
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(digest[3:19], 16))
    return generator


Config = TypeVar("Config")


def config_from_options(config_type: type[Config], options: Mapping[str, Any]) -> Config:
    """Build a frozen config dataclass from a TOML options table, rejecting unknown keys and bad types."""
    assert dataclasses.is_dataclass(config_type)
    fields = {f.name: f for f in dataclasses.fields(config_type)}
    hints = typing.get_type_hints(config_type)
    values: dict[str, Any] = {}
    for key, value in options.items():
        if key not in fields:
            raise WorkloadError(f"unknown option {key!r} (known: {', '.join(fields)})")
        values[key] = check_value(key, value, hints[key])
    return config_type(**values)


def check_value(key: str, value: Any, expected: Any) -> Any:
    """``value`` converted to ``expected`` (bool, int, float, str or tuple[str, ...]) or a WorkloadError."""
    if expected is bool and type(value) is bool:
        return value
    if expected is int and type(value) is int:
        return value
    if expected is float and type(value) in (int, float):
        return float(value)
    if expected is str and type(value) is str:
        return value
    if expected == tuple[str, ...] and isinstance(value, (list, tuple)) and all(type(v) is str for v in value):
        return tuple(value)
    name = getattr(expected, "__name__", str(expected))
    raise WorkloadError(f"option {key!r} must be {name}, got {type(value).__name__} {value!r:.40}")
