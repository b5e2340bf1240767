"""Character-level language modelling of Shakespeare's tragedies with a small GPT (the default workload)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from protocol.cid import content_id
from protocol.dataset import DatasetDescription, MicroshardSource
from workloads.base import WorkloadError, config_from_options, seeded_generator
from workloads.gpt import GPT, GPTConfig, init_gpt_parameter
from workloads.supervised import Batch, InnerSettings, SupervisedWorkload

DATA_DIR = Path(__file__).parent / "data"

# Token 0 is newline, tokens 1..95 are the printable ASCII characters ' '..'~'.
ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))
_TOKEN_OF_BYTE = np.full(256, -1, dtype=np.int64)
_TOKEN_OF_BYTE[[ord(c) for c in ALPHABET]] = np.arange(len(ALPHABET))


@dataclass(frozen=True)
class CharLMConfig:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_steps: int = 0  # inner lr schedule (see InnerSettings): linear warm-up,
    decay_steps: int = 0  # then cosine decay to lr * min_lr_ratio by this inner step (0: constant)
    min_lr_ratio: float = 0.1
    microshard_chars: int = 8 * 1024  # 153 microshards of the built-in corpus: fine-grained leases
    val_fraction: float = 0.1
    eval_examples: int = 256
    corpus: str = "shakespeare.txt"  # a file in workloads/data/, or an absolute path to ASCII text


def encode(text: bytes) -> torch.Tensor:
    """Token ids of ASCII text; a WorkloadError names the first byte outside the alphabet."""
    ids = _TOKEN_OF_BYTE[np.frombuffer(text, dtype=np.uint8)]
    bad = np.flatnonzero(ids < 0)
    if bad.size:
        raise WorkloadError(f"byte 0x{text[bad[0]]:02x} at offset {bad[0]} is outside the charlm alphabet")
    return torch.from_numpy(ids)


def decode(ids: torch.Tensor) -> str:
    return "".join(ALPHABET[i] for i in ids.tolist())


def windows(ids: torch.Tensor, block_size: int) -> Batch:
    """Inputs and next-character targets for each non-overlapping window of ``block_size``."""
    count = max(len(ids) - 1, 0) // block_size
    starts = torch.arange(count).unsqueeze(1) * block_size
    offsets = torch.arange(block_size).unsqueeze(0)
    return ids[starts + offsets], ids[starts + offsets + 1]


class CharLM(SupervisedWorkload):
    """Tokens are bytes of printable ASCII plus newline. A microshard is a fixed-size slice of the
    first (1 - val_fraction) of the corpus; its examples are the non-overlapping ``block_size``
    windows inside it. The rest of the corpus is the validation split."""

    name = "charlm"

    def __init__(self, config: CharLMConfig = CharLMConfig()) -> None:
        if config.microshard_chars <= config.block_size:
            raise WorkloadError("option 'microshard_chars' must exceed 'block_size'")
        if not 0.0 < config.val_fraction < 1.0:
            raise WorkloadError("option 'val_fraction' must be between 0 and 1")
        if config.eval_examples < 1:
            raise WorkloadError("option 'eval_examples' must be >= 1")
        super().__init__(InnerSettings.of(config))
        self.config = config
        self.gpt_config = GPTConfig(
            vocab_size=len(ALPHABET),
            block_size=config.block_size,
            n_layer=config.n_layer,
            n_head=config.n_head,
            n_embd=config.n_embd,
        )
        if config.n_embd % config.n_head:
            raise WorkloadError(f"option 'n_embd' ({config.n_embd}) must be a multiple of 'n_head'")
        self.tokens_per_example = config.block_size

    # -- data ----------------------------------------------------------------------

    @cached_property
    def _text(self) -> bytes:
        path = DATA_DIR / self.config.corpus
        try:
            text = path.read_bytes()
        except OSError as exc:
            raise WorkloadError(f"cannot read corpus {str(path)!r}: {exc.strerror}") from None
        encode(text)  # reject a corpus outside the alphabet now rather than mid-round
        return text

    @property
    def _split_at(self) -> int:
        return int(len(self._text) * (1.0 - self.config.val_fraction))

    @cached_property
    def _microshard_ranges(self) -> tuple[tuple[int, int], ...]:
        size, end = self.config.microshard_chars, self._split_at
        ranges = [(start, min(start + size, end)) for start in range(0, end, size)]
        return tuple((a, b) for a, b in ranges if b - a > self.config.block_size)

    def microshard_bytes(self, index: int) -> bytes:
        start, end = self._microshard_ranges[index]
        return self._text[start:end]

    @cached_property
    def _dataset(self) -> DatasetDescription:
        sources = []
        for index, (start, end) in enumerate(self._microshard_ranges):
            examples = (end - start - 1) // self.config.block_size
            sources.append(
                MicroshardSource(content_id(self.microshard_bytes(index)), examples, examples * self.config.block_size)
            )
        return DatasetDescription(f"charlm/{Path(self.config.corpus).name}", "train", tuple(sources))

    def dataset(self) -> DatasetDescription:
        return self._dataset

    def decode_microshard(self, data: bytes) -> Batch:
        return windows(encode(data), self.config.block_size)

    @cached_property
    def _val_examples(self) -> Batch:
        x, y = windows(encode(self._text[self._split_at :]), self.config.block_size)
        # An evenly spaced subset keeps evaluation cheap while covering the whole split.
        count = min(self.config.eval_examples, x.shape[0])
        pick = torch.arange(count) * x.shape[0] // count
        return x[pick], y[pick]

    def split_examples(self, split: str) -> Batch:
        if split != "val":
            raise WorkloadError(f"charlm has no split {split!r}; evaluation uses 'val'")
        return self._val_examples

    # -- model ---------------------------------------------------------------------

    def build_model(self) -> GPT:
        return GPT(self.gpt_config)

    def init_parameter(self, name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
        init_gpt_parameter(self.gpt_config, name, tensor, generator)

    def batch_loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))

    def sample(self, model: torch.nn.Module, prompt: str = "\n", length: int = 200, seed: int = 0) -> str:
        """Text the model writes after ``prompt``: a quick look at what it has learnt."""
        assert isinstance(model, GPT), "sample needs a model from this workload's init_model"
        device = next(model.parameters()).device
        idx = encode(prompt.encode("ascii")).unsqueeze(0).to(device)
        was_training = model.training
        model.eval()
        out = model.generate(idx, length, seeded_generator(seed, "sample"))
        model.train(was_training)
        return decode(out[0, len(prompt) :])


def create(**options: Any) -> CharLM:
    """The registry's factory: a CharLM from a TOML options table."""
    return CharLM(config_from_options(CharLMConfig, options))
