"""Minibatch training shared by the built-in workloads: init, inner loop, evaluation, settings."""

from __future__ import annotations

import dataclasses
import io
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from protocol.dataset import DatasetDescription
from workloads.base import (
    Capability,
    EvalMetrics,
    InnerState,
    ParamSpec,
    TrainMetrics,
    WorkloadError,
    check_value,
    resolve_device,
    schema_id,
    schema_of,
    seeded_generator,
)

Batch = tuple[torch.Tensor, ...]

PROBE_STEPS = 3


@dataclass(frozen=True)
class InnerSettings:
    """The inner-loop knobs an operator may change while the swarm runs."""

    lr: float
    batch_size: int
    weight_decay: float
    grad_clip: float  # 0 disables clipping
    # The inner learning-rate schedule, counted in this peer's inner steps (``InnerState.steps``,
    # which persists across rounds and restarts): linear warm-up over ``warmup_steps``, then a
    # cosine decay from ``lr`` to ``lr * min_lr_ratio`` that ends ``decay_steps`` after the start
    # and stays there. ``decay_steps`` 0 keeps ``lr`` constant after the warm-up.
    warmup_steps: int = 0
    decay_steps: int = 0
    min_lr_ratio: float = 0.1

    @classmethod
    def of(cls, config: Any) -> InnerSettings:
        """The inner settings a workload's config dataclass holds under the same field names."""
        return cls(**{field.name: getattr(config, field.name) for field in dataclasses.fields(cls)})

    def lr_at(self, step: int) -> float:
        """The inner learning rate of inner step ``step`` (0-based)."""
        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if not self.decay_steps:
            return self.lr
        span = max(self.decay_steps - self.warmup_steps, 1)
        progress = min(max(step - self.warmup_steps, 0) / span, 1.0)
        floor = self.lr * self.min_lr_ratio
        return floor + (self.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def validate(self) -> None:
        if not self.lr > 0:
            raise WorkloadError(f"setting 'lr' must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise WorkloadError(f"setting 'batch_size' must be >= 1, got {self.batch_size}")
        if self.weight_decay < 0:
            raise WorkloadError(f"setting 'weight_decay' must be >= 0, got {self.weight_decay}")
        if self.grad_clip < 0:
            raise WorkloadError(f"setting 'grad_clip' must be >= 0, got {self.grad_clip}")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise WorkloadError("settings 'warmup_steps' and 'decay_steps' must be >= 0")
        if self.decay_steps and self.decay_steps <= self.warmup_steps:
            raise WorkloadError(
                f"setting 'decay_steps' ({self.decay_steps}) must exceed 'warmup_steps' ({self.warmup_steps}) or be 0"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise WorkloadError(f"setting 'min_lr_ratio' must be between 0 and 1, got {self.min_lr_ratio}")


class SupervisedWorkload(ABC):
    """A Workload whose inner step is AdamW on the mean loss of a minibatch of examples.

    A subclass says how to build its model, initialise each parameter, turn
    microshard bytes into example tensors and score a batch; the rest is shared.
    """

    name: str
    supported_settings: Mapping[str, type] = {
        "lr": float,
        "batch_size": int,
        "weight_decay": float,
        "grad_clip": float,
        "warmup_steps": int,
        "decay_steps": int,
        "min_lr_ratio": float,
    }
    eval_batch_size = 64
    tokens_per_example = 1

    def __init__(self, settings: InnerSettings) -> None:
        settings.validate()
        self._settings = settings

    # -- what a subclass provides ------------------------------------------------

    @abstractmethod
    def build_model(self) -> torch.nn.Module:
        """The model's modules, built on the meta device; ``init_parameter`` then fills every
        parameter, so the model must not rely on buffers (they would stay uninitialised)."""

    @abstractmethod
    def init_parameter(self, name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
        """Fill one parameter in place from its own generator."""

    @abstractmethod
    def decode_microshard(self, data: bytes) -> Batch:
        """Example tensors (first dimension = examples) from one microshard's bytes."""

    @abstractmethod
    def batch_loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Mean loss over the examples of ``batch`` (already on the model's device)."""

    @abstractmethod
    def split_examples(self, split: str) -> Batch:
        """Example tensors of a held-out split, in a fixed order."""

    @abstractmethod
    def dataset(self) -> DatasetDescription: ...

    @abstractmethod
    def microshard_bytes(self, index: int) -> bytes: ...

    def is_frozen(self, name: str) -> bool:
        """Whether parameter ``name`` stays fixed during inner training."""
        return False

    # -- model ---------------------------------------------------------------------

    @cached_property
    def _schema(self) -> tuple[ParamSpec, ...]:
        with torch.device("meta"):
            return schema_of(self.build_model())

    def model_schema(self) -> tuple[ParamSpec, ...]:
        return self._schema

    def schema_hash(self) -> str:
        return schema_id(self._schema)

    def init_model(self, seed: int, device: str = "cpu") -> torch.nn.Module:
        target = resolve_device(device)
        # Built on meta so no global RNG is consumed; values always come from CPU generators so
        # a CUDA peer and a CPU peer start from the same bytes.
        with torch.device("meta"):
            model = self.build_model()
        model.to_empty(device="cpu")
        with torch.no_grad():
            for name, param in model.named_parameters():
                self.init_parameter(name, param, seeded_generator(seed, name))
                param.requires_grad_(not self.is_frozen(name))
        return model.to(target)

    def empty_model(self, device: str = "cpu") -> torch.nn.Module:
        """The model with uninitialised parameters, for weights about to be loaded into it
        (evaluating a head): ``init_model`` without the seeded fill, which at 100M parameters
        costs seconds."""
        with torch.device("meta"):
            model = self.build_model()
        return model.to_empty(device=resolve_device(device))

    def parameter_count(self) -> int:
        return sum(_numel(p.shape) for p in self._schema)

    # -- inner optimizer -----------------------------------------------------------

    def new_inner_state(self, model: torch.nn.Module) -> InnerState:
        # Decay matrices only; norms, biases and 1-D tensors keep their scale (as in GPT-2).
        params = list(model.parameters())
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "decay": True},
            {"params": [p for p in params if p.dim() < 2], "decay": False},
        ]
        optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=self._settings.lr, betas=(0.9, 0.99)
        )
        _apply_to_groups(optimizer, self._settings)
        return InnerState(optimizer)

    def save_inner_state(self, state: InnerState) -> bytes:
        buffer = io.BytesIO()
        torch.save({"optimizer": state.optimizer.state_dict(), "steps": state.steps}, buffer)
        return buffer.getvalue()

    def load_inner_state(self, model: torch.nn.Module, data: bytes) -> InnerState:
        device = next(model.parameters()).device
        try:
            saved = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
            state = self.new_inner_state(model)
            state.optimizer.load_state_dict(saved["optimizer"])
            state.steps = int(saved["steps"])
            _check_state_shapes(state.optimizer)
        except Exception as exc:  # torch raises many types for corrupt or mismatched state
            raise WorkloadError(f"cannot load inner state: {type(exc).__name__}: {exc}") from None
        return state

    # -- training ------------------------------------------------------------------

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
        target = _model_device(model, device)
        settings = self._settings
        _apply_to_groups(state.optimizer, settings)
        if steps > 0 and not microshards:
            raise WorkloadError("train needs at least one microshard")
        examples = _concat([self.decode_microshard(bytes(data)) for data in microshards]) if steps else ()
        if steps > 0 and examples[0].shape[0] == 0:
            raise WorkloadError("the microshards given to train hold no complete example")
        batches = _batches(examples, settings.batch_size, seed)
        trainable = [p for p in model.parameters() if p.requires_grad]

        model.train()
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=target)
        last = torch.zeros((), device=target)
        done = 0
        scheduled = bool(settings.warmup_steps or settings.decay_steps)
        while done < steps and not (should_stop is not None and should_stop()):
            if scheduled:
                _set_lr(state.optimizer, settings.lr_at(state.steps + done))
            batch = tuple(t.to(target, non_blocking=True) for t in next(batches))
            loss = self.batch_loss(model, batch)
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if settings.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, settings.grad_clip)
            state.optimizer.step()
            last = loss.detach()
            loss_sum += last
            done += 1
        loss_mean, loss_last = (loss_sum / max(done, 1)).item(), last.item()  # .item() waits for the GPU
        state.steps += done
        return TrainMetrics(
            steps=done,
            examples=done * settings.batch_size,
            tokens=done * settings.batch_size * self.tokens_per_example,
            loss_mean=loss_mean,
            loss_last=loss_last,
            seconds=time.perf_counter() - started,
            stopped_early=done < steps,
        )

    def evaluate(self, model: torch.nn.Module, split: str = "val", device: str = "cpu") -> EvalMetrics:
        target = _model_device(model, device)
        examples = self.split_examples(split)
        count = examples[0].shape[0]
        was_training = model.training
        model.eval()
        total = torch.zeros((), dtype=torch.float64, device=target)
        with torch.no_grad():
            for start in range(0, count, self.eval_batch_size):
                batch = tuple(t[start : start + self.eval_batch_size].to(target) for t in examples)
                total += self.batch_loss(model, batch).double() * batch[0].shape[0]
        model.train(was_training)
        return EvalMetrics(
            split=split,
            loss=(total / max(count, 1)).item(),
            examples=count,
            tokens=count * self.tokens_per_example,
        )

    def probe(self, device: str = "cpu") -> Capability:
        target = resolve_device(device)
        model = self.init_model(0, str(target))
        state = self.new_inner_state(model)
        microshards = [self.microshard_bytes(0)]
        self.train(model, state, microshards, 1, str(target))  # warm-up: allocator, kernels
        timed = self.train(model, state, microshards, PROBE_STEPS, str(target))
        if target.type == "cuda":
            device_name = torch.cuda.get_device_name(target)
        else:
            device_name = f"cpu ({torch.get_num_threads()} threads)"
        return Capability(
            device=str(target),
            device_name=device_name,
            steps_per_second=timed.steps / max(timed.seconds, 1e-9),
            batch_size=self._settings.batch_size,
            parameters=self.parameter_count(),
        )

    # -- runtime settings ------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self._settings)

    def lr_at(self, step: int) -> float:
        """The inner learning rate ``train`` uses at inner step ``step`` (the schedule applied)."""
        return self._settings.lr_at(step)

    def apply_settings(self, changes: Mapping[str, Any]) -> None:
        checked = {}
        for key, value in changes.items():
            if key not in self.supported_settings:
                known = ", ".join(self.supported_settings)
                raise WorkloadError(f"unsupported setting {key!r} (supported: {known})")
            checked[key] = check_value(key, value, self.supported_settings[key])
        updated = dataclasses.replace(self._settings, **checked)
        updated.validate()
        self._settings = updated


def _apply_to_groups(optimizer: torch.optim.Optimizer, settings: InnerSettings) -> None:
    for group in optimizer.param_groups:
        group["lr"] = settings.lr
        group["weight_decay"] = settings.weight_decay if group["decay"] else 0.0


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _check_state_shapes(optimizer: torch.optim.Optimizer) -> None:
    # load_state_dict only checks group sizes; a state saved for another model could still slip in.
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                    raise ValueError(f"{key} has shape {tuple(value.shape)}, parameter has {tuple(param.shape)}")


def _model_device(model: torch.nn.Module, device: str) -> torch.device:
    target = resolve_device(device)
    actual = next(model.parameters()).device
    if actual.type != target.type or (target.index is not None and actual.index != target.index):
        raise WorkloadError(f"model is on {actual} but device {device!r} was asked for")
    return actual


def _concat(parts: list[Batch]) -> Batch:
    return tuple(torch.cat(field) for field in zip(*parts, strict=True))


def _batches(examples: Batch, batch_size: int, seed: int) -> Iterator[Batch]:
    """Endless minibatches: each pass visits every example once in a seeded order."""
    count = examples[0].shape[0] if examples else 0
    if count == 0:
        return
    generator = seeded_generator(seed, "example-order")
    order = torch.empty(0, dtype=torch.long)
    while True:
        while order.numel() < batch_size:
            order = torch.cat([order, torch.randperm(count, generator=generator)])
        take, order = order[:batch_size], order[batch_size:]
        yield tuple(field[take] for field in examples)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
