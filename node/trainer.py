"""The inner loop: one persistent model and inner optimizer, trained in a worker thread.

The event loop never runs torch: loading a head's weights, training H steps,
computing the pseudo-gradient and saving the inner optimizer all happen in
``asyncio.to_thread``. Training stops at a step boundary when asked to.

With overlap, a round may also be trained ahead of its base head
(``train_ahead``): from the weights the model had when the last update was
computed, rebased onto the head once it is known.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping, Sequence
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
        # Training ahead: the local weights when the last pseudo-gradient was taken (kept only
        # when asked to), the head to rebase onto once it is known, and whether that happened.
        self._published: dict[str, torch.Tensor] | None = None
        self._onto: Mapping[str, torch.Tensor] | None = None
        self._rebased = False
        self._onto_known = asyncio.Event()

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
        self._onto_known.set()  # a round trained ahead stops waiting for its base too

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
        keep_local: bool = False,
    ) -> InnerResult:
        """Load ``base``, run ``steps`` inner steps on ``microshards``, return metrics and the pseudo-gradient.

        With ``time_budget_s``, training also ends at the first step boundary after that many
        seconds of training (``metrics.stopped_early`` then says so; ``interrupted`` stays false).
        With ``keep_local``, the local weights it ends with are kept for ``train_ahead``.
        """
        async with self._lock:
            self._stop.clear()
            started = self._round_started = time.perf_counter()
            try:
                result = await asyncio.to_thread(
                    self._train, base, microshards, steps, seed, time_budget_s, keep_local
                )
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                raise
            finally:
                self._inner_done_s += time.perf_counter() - started
                self._round_started = None
            self.last_metrics = result.metrics
            self.last_error = None
            return result

    async def train_ahead(
        self,
        microshards: Sequence[bytes],
        steps: int,
        seed: int,
        time_budget_s: float | None = None,
        cancel: threading.Event | None = None,
    ) -> InnerResult | None:
        """Train a round whose base head is not known yet, from the local weights ``train_round``
        kept; None when ``cancel`` is set (``abandon``) or ``request_stop`` is called before it finishes.

        The progress is rebased onto the base head given to ``rebase`` (local = head + (local -
        local at publish)) at the first step boundary after it is given, or after the last step,
        and the pseudo-gradient is taken against that head: the update is one trained from it.
        """
        async with self._lock:
            if self._published is None:
                raise RuntimeError("train_ahead needs the local weights of a round trained with keep_local")
            cancel = cancel or threading.Event()
            self._stop.clear()
            started = self._round_started = time.perf_counter()
            try:
                try:
                    metrics = await asyncio.to_thread(
                        self._continue, microshards, steps, seed, time_budget_s, cancel
                    )
                finally:
                    self._inner_done_s += time.perf_counter() - started  # the wait below is not training
                    self._round_started = None
                while self._onto is None and not (self._stop.is_set() or cancel.is_set()):
                    await self._onto_known.wait()
                    self._onto_known.clear()
                if self._stop.is_set() or cancel.is_set():
                    self._published = None
                    return None
                result = await asyncio.to_thread(self._finish_ahead, metrics)
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                raise
            finally:
                self._onto = None
            self.last_metrics = result.metrics
            self.last_error = None
            return result

    def rebase(self, head: Mapping[str, torch.Tensor]) -> None:
        """The base head of the round ``train_ahead`` trains: rebase onto it at the next step boundary."""
        self._onto = head
        self._onto_known.set()

    def abandon(self, cancel: threading.Event) -> None:
        """Stop the ``train_ahead`` given ``cancel`` at its next step boundary, or its wait for a base."""
        cancel.set()
        self._onto_known.set()

    def _stopper(
        self,
        time_budget_s: float | None,
        between: Callable[[], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> Callable[[], bool]:
        """The step-boundary hook: runs ``between``, then says whether to stop (asked to, or out of budget)."""
        ends = None if time_budget_s is None else time.perf_counter() + time_budget_s
        asked = 0

        def should_stop() -> bool:
            nonlocal asked
            if between is not None:
                between()
            asked += 1
            # The budget never stops the first step: an update of zero samples is no update.
            if self._stop.is_set() or (cancel is not None and cancel.is_set()):
                return True
            return ends is not None and asked > 1 and time.perf_counter() >= ends

        return should_stop

    def _train(
        self,
        base: Mapping[str, torch.Tensor],
        microshards: Sequence[bytes],
        steps: int,
        seed: int,
        time_budget_s: float | None = None,
        keep_local: bool = False,
    ) -> InnerResult:
        assert self.model is not None and self.inner is not None
        self._published = None
        with torch.no_grad():
            self.model.load_state_dict(base)
        metrics = self.workload.train(
            self.model, self.inner, microshards, steps, self.device,
            should_stop=self._stopper(time_budget_s), seed=seed,
        )
        return self._result(base, metrics, keep_local)

    def _continue(
        self, microshards: Sequence[bytes], steps: int, seed: int, time_budget_s: float | None, cancel: threading.Event
    ) -> TrainMetrics:
        assert self.model is not None and self.inner is not None
        self._rebased = False
        return self.workload.train(
            self.model, self.inner, microshards, steps, self.device,
            should_stop=self._stopper(time_budget_s, between=self._rebase_if_known, cancel=cancel), seed=seed,
        )

    def _rebase_if_known(self) -> None:
        """local = head + (local - local at publish), once the head is known; in place, once."""
        onto, published = self._onto, self._published
        if self._rebased or onto is None or published is None:
            return
        assert self.model is not None
        with torch.no_grad():
            for name, tensor in self.model.state_dict().items():
                target = onto[name].to(tensor.device)
                if tensor.is_floating_point():
                    tensor.add_(target.to(tensor.dtype) - published[name].to(tensor.dtype))
                else:
                    tensor.copy_(target.to(tensor.dtype))  # counters and masks: the head's
        self._rebased = True
        self._published = None

    def _finish_ahead(self, metrics: TrainMetrics) -> InnerResult:
        onto = self._onto
        assert onto is not None
        self._rebase_if_known()
        return self._result(onto, metrics, keep_local=True)

    def _result(self, base: Mapping[str, torch.Tensor], metrics: TrainMetrics, keep_local: bool) -> InnerResult:
        """The pseudo-gradient ``base - local``; the inner optimizer state saved when due."""
        assert self.model is not None
        with torch.no_grad():
            local = self.model.state_dict()
            delta = {
                name: torch.sub(base[name], local[name].detach().to("cpu", torch.float32)).contiguous()
                for name in base
            }
            if keep_local:
                self._published = {name: local[name].detach().clone() for name in base}
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
