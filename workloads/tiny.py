"""A sub-millisecond-step workload for tests: an MLP classifier learning a seeded random teacher network."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from protocol.cid import content_id
from protocol.dataset import DatasetDescription, MicroshardSource
from workloads.base import WorkloadError, config_from_options, seeded_generator
from workloads.supervised import Batch, InnerSettings, SupervisedWorkload


@dataclass(frozen=True)
class TinyConfig:
    features: int = 16
    hidden: int = 32
    classes: int = 4
    microshards: int = 32
    examples_per_microshard: int = 64
    val_examples: int = 512
    data_seed: int = 0
    batch_size: int = 32
    lr: float = 1e-2
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    warmup_steps: int = 0  # inner lr schedule (see InnerSettings): linear warm-up,
    decay_steps: int = 0  # then cosine decay to lr * min_lr_ratio by this inner step (0: constant)
    min_lr_ratio: float = 0.1
    freeze: tuple[str, ...] = ()  # parameter name prefixes that never train, e.g. ("hidden",)


class MLP(nn.Module):
    def __init__(self, features: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(features, hidden)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.hidden(x)))


class Tiny(SupervisedWorkload):
    """Each microshard's bytes are its examples' float32 features followed by their uint8 labels,
    all generated from ``data_seed``, so every peer derives the same dataset without any file."""

    name = "tiny"

    def __init__(self, config: TinyConfig = TinyConfig()) -> None:
        for key in ("features", "hidden", "microshards", "examples_per_microshard", "val_examples"):
            if getattr(config, key) < 1:
                raise WorkloadError(f"option {key!r} must be >= 1")
        if not 2 <= config.classes <= 256:
            raise WorkloadError("option 'classes' must be between 2 and 256 (labels are one byte)")
        super().__init__(InnerSettings.of(config))
        self.config = config
        known = {p.name for p in self.model_schema()}
        for prefix in config.freeze:
            if not any(name.startswith(prefix) for name in known):
                raise WorkloadError(f"option 'freeze' names {prefix!r}, which matches no parameter of {sorted(known)}")

    # -- data ----------------------------------------------------------------------

    @cached_property
    def _teacher(self) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        generator = seeded_generator(c.data_seed, "teacher")
        w1 = torch.randn(c.features, 2 * c.hidden, generator=generator) / c.features**0.5
        w2 = torch.randn(2 * c.hidden, c.classes, generator=generator) / (2 * c.hidden) ** 0.5
        return w1, w2

    def _examples(self, label: str, count: int) -> Batch:
        x = torch.randn(count, self.config.features, generator=seeded_generator(self.config.data_seed, label))
        w1, w2 = self._teacher
        return x, (torch.tanh(x @ w1) @ w2).argmax(dim=1)

    def microshard_bytes(self, index: int) -> bytes:
        if not 0 <= index < self.config.microshards:
            raise IndexError(f"tiny has {self.config.microshards} microshards, not index {index}")
        x, y = self._examples(f"microshard/{index}", self.config.examples_per_microshard)
        return x.numpy().astype("<f4").tobytes() + y.numpy().astype(np.uint8).tobytes()

    def decode_microshard(self, data: bytes) -> Batch:
        row = 4 * self.config.features + 1
        count, extra = divmod(len(data), row)
        if extra:
            raise WorkloadError(f"tiny microshard of {len(data)} bytes is not a whole number of {row}-byte examples")
        split = 4 * self.config.features * count
        x = np.frombuffer(data, dtype="<f4", count=self.config.features * count).reshape(count, self.config.features)
        y = np.frombuffer(data, dtype=np.uint8, offset=split)
        if y.size and int(y.max()) >= self.config.classes:
            raise WorkloadError(f"tiny microshard holds label {int(y.max())} >= classes {self.config.classes}")
        return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))

    @cached_property
    def _dataset(self) -> DatasetDescription:
        n = self.config.examples_per_microshard
        sources = tuple(
            MicroshardSource(content_id(self.microshard_bytes(i)), n, n) for i in range(self.config.microshards)
        )
        return DatasetDescription(f"tiny/seed{self.config.data_seed}", "train", sources)

    def dataset(self) -> DatasetDescription:
        return self._dataset

    @cached_property
    def _val(self) -> Batch:
        return self._examples("val", self.config.val_examples)

    def split_examples(self, split: str) -> Batch:
        if split != "val":
            raise WorkloadError(f"tiny has no split {split!r}; evaluation uses 'val'")
        return self._val

    # -- model ---------------------------------------------------------------------

    def build_model(self) -> MLP:
        return MLP(self.config.features, self.config.hidden, self.config.classes)

    def init_parameter(self, name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
        if name.endswith("bias"):
            tensor.zero_()
        else:
            tensor.normal_(0.0, tensor.shape[1] ** -0.5, generator=generator)

    def is_frozen(self, name: str) -> bool:
        return any(name.startswith(prefix) for prefix in self.config.freeze)

    def batch_loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)


def create(**options: Any) -> Tiny:
    """The registry's factory: a Tiny workload from a TOML options table."""
    return Tiny(config_from_options(TinyConfig, options))
