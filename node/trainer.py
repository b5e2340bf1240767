"""The inner loop: one persistent model and inner optimizer, trained in a worker thread.

The event loop never runs torch: loading a head's weights, training H steps,
computing the pseudo-gradient and saving the inner optimizer all happen in
``asyncio.to_thread``. Training stops at a step boundary when asked to.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from node.logs import get_logger
from node.store import write_atomic
from workloads.base import EvalMetrics, InnerState, TrainMetrics, Workload, WorkloadError

log = get_logger("trainer")

INNER_STATE_FILE = "inner_state.pt"


@dataclass(frozen=True)
class InnerResult:
    metrics: TrainMetrics
    delta: dict[str, torch.Tensor]  # base minus local weights, fp32 on the CPU


class Trainer:
    """Owns the peer's model copy and inner optimizer; every torch call runs off the event loop."""

    def __init__(
        self, workload: Workload, device: str, data_dir: Path, seed: int, inner_state_every_s: float = 0.0
    ) -> None:
        """``inner_state_every_s``: the inner optimizer state is saved after a round when this long
        has passed since the last save (0: after every round); the first round always saves."""
        self.workload = workload
        self.device = device
        self._state_path = data_dir / INNER_STATE_FILE
        self._save_every_s = inner_state_every_s
        self._saved_at: float | None = None
        self._seed = seed
        self._stop = threading.Event()
        self._lock = asyncio.Lock()
        self.model: torch.nn.Module | None = None
        self.inner: InnerState | None = None
        self._inner_done_s = 0.0  # finished rounds' time in train_round
        self._round_started: float | None = None
        self.last_metrics: TrainMetrics | None = None
        self.last_error: str | None = None

    def initial_weights(self) -> dict[str, torch.Tensor]:
        """The workload's seeded initial weights on the CPU: the same bytes on every peer."""
        model = self.workload.init_model(self._seed, "cpu")
        return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in model.state_dict().items()}

    async def prepare(self) -> None:
        """Build the model and load the inner optimizer state kept from an earlier run, if any."""
        async with self._lock:
            await asyncio.to_thread(self._prepare)

    def _prepare(self) -> None:
        self.model = self.workload.init_model(self._seed, self.device)
        if self._state_path.exists():
            try:
                self.inner = self.workload.load_inner_state(self.model, self._state_path.read_bytes())
                log.info("inner_state_restored", steps=self.inner.steps)
                return
            except WorkloadError as exc:
                log.warning("inner_state_unusable", error=str(exc))
        self.inner = self.workload.new_inner_state(self.model)

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def inner_seconds(self) -> float:
        """Seconds spent in inner-loop rounds so far, the one in progress included."""
        running = self._round_started
        return self._inner_done_s + (time.perf_counter() - running if running is not None else 0.0)

    @property
    def interrupted(self) -> bool:
        """Whether the last (or current) round was stopped by ``request_stop`` (not by its time budget)."""
        return self._stop.is_set()

    async def train_round(
        self,
        base: Mapping[str, torch.Tensor],
        microshards: Sequence[bytes],
        steps: int,
        seed: int,
        time_budget_s: float | None = None,
    ) -> InnerResult:
        """Load ``base``, run ``steps`` inner steps on ``microshards``, return metrics and the pseudo-gradient.

        With ``time_budget_s``, training also ends at the first step boundary after that many
        seconds of training (``metrics.stopped_early`` then says so; ``interrupted`` stays false).
        """
        async with self._lock:
            self._stop.clear()
            started = self._round_started = time.perf_counter()
            try:
                result = await asyncio.to_thread(self._train, base, microshards, steps, seed, time_budget_s)
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                raise
            finally:
                self._inner_done_s += time.perf_counter() - started
                self._round_started = None
            self.last_metrics = result.metrics
            self.last_error = None
            return result

    def _train(
        self,
        base: Mapping[str, torch.Tensor],
        microshards: Sequence[bytes],
        steps: int,
        seed: int,
        time_budget_s: float | None = None,
    ) -> InnerResult:
        assert self.model is not None and self.inner is not None
        with torch.no_grad():
            self.model.load_state_dict(base)
        should_stop = self._stop.is_set
        if time_budget_s is not None:
            ends = time.perf_counter() + time_budget_s
            asked = 0

            def should_stop() -> bool:
                # The budget never stops the first step: an update of zero samples is no update.
                nonlocal asked
                asked += 1
                return self._stop.is_set() or (asked > 1 and time.perf_counter() >= ends)

        metrics = self.workload.train(
            self.model, self.inner, microshards, steps, self.device, should_stop=should_stop, seed=seed
        )
        with torch.no_grad():
            local = self.model.state_dict()
            delta = {
                name: torch.sub(base[name], local[name].detach().to("cpu", torch.float32)).contiguous()
                for name in base
            }
        if self._saved_at is None or time.monotonic() - self._saved_at >= self._save_every_s:
            self._save_inner_state()
            self._saved_at = time.monotonic()
        return InnerResult(metrics, delta)

    def _save_inner_state(self) -> None:
        assert self.inner is not None
        write_atomic(self._state_path, self.workload.save_inner_state(self.inner))

    async def evaluate(self, weights: Mapping[str, torch.Tensor]) -> EvalMetrics:
        """Validation loss of ``weights`` on a scratch model (the training copy is left alone)."""
        return await asyncio.to_thread(self._evaluate, weights)

    def _evaluate(self, weights: Mapping[str, torch.Tensor]) -> EvalMetrics:
        empty = getattr(self.workload, "empty_model", None)  # optional: skips a seeded fill to be overwritten
        model = empty(self.device) if callable(empty) else self.workload.init_model(self._seed, self.device)
        with torch.no_grad():
            model.load_state_dict(weights)
        return self.workload.evaluate(model, "val", self.device)
