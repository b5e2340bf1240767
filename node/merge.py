"""The deterministic merge: screen updates, aggregate pseudo-gradients, take the outer Nesterov step.

Every operation here is element-wise fp32 on the CPU, one op at a time (a
multiply and an add, never a fused multiply-add), with updates visited in
sorted-id order, so two honest peers produce byte-identical weights and
momentum from the same inputs. Reductions that decide exclusions accumulate
in float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from protocol.heads import AggregationRule

Tensors = dict[str, torch.Tensor]

RULES = ("mean", "trimmed_mean", "median")
_SLICE = 1 << 20  # elements per slice of a screening reduction


@dataclass(frozen=True)
class UpdateInput:
    """One update to merge: its record id, its sample count and its decoded pseudo-gradient."""

    update_id: str
    samples: int
    delta: Tensors | None  # None: the payload did not decode


@dataclass(frozen=True)
class MergeResult:
    weights: Tensors
    momentum: Tensors
    included: tuple[str, ...]
    excluded: tuple[tuple[str, str], ...]


def outer_rule(
    rule: str, outer_lr: float, momentum: float, nesterov: bool, trim_fraction: float, outlier_factor: float
) -> AggregationRule:
    """The head's rule record: the aggregation and outer-optimizer hyperparameters, typed as merged."""
    return AggregationRule.of(
        rule,
        outer_lr=float(outer_lr),
        momentum=float(momentum),
        nesterov=bool(nesterov),
        trim_fraction=float(trim_fraction),
        outlier_factor=float(outlier_factor),
    )


def _screen(
    updates: Sequence[UpdateInput], reference: Tensors, outlier_factor: float
) -> tuple[list[UpdateInput], list[tuple[str, str]]]:
    """Drop updates that do not decode, have the wrong shapes, hold NaN/Inf or whose norm is wild."""
    kept: list[UpdateInput] = []
    excluded: list[tuple[str, str]] = []
    norms: dict[str, float] = {}
    for update in sorted(updates, key=lambda u: u.update_id):
        delta = update.delta
        if delta is None:
            excluded.append((update.update_id, "undecodable"))
            continue
        if list(delta) != list(reference) or any(delta[k].shape != reference[k].shape for k in reference):
            excluded.append((update.update_id, "wrong_shapes"))
            continue
        squares = sum(_square_sum(t) for t in delta.values())
        # A NaN or Inf anywhere makes the float64 sum of squares non-finite (float32 squares
        # cannot overflow it), so one pass both screens and measures.
        if not math.isfinite(squares):
            excluded.append((update.update_id, "non_finite"))
            continue
        norms[update.update_id] = squares**0.5
        kept.append(update)
    if len(kept) >= 3 and outlier_factor > 0:
        ordered = sorted(norms[u.update_id] for u in kept)
        median = ordered[len(ordered) // 2] if len(ordered) % 2 else (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2
        bound = outlier_factor * max(median, 1e-12)
        wild = [u for u in kept if norms[u.update_id] > bound]
        for update in wild:
            excluded.append((update.update_id, "norm_outlier"))
        kept = [u for u in kept if norms[u.update_id] <= bound]
    return kept, sorted(excluded)


def _square_sum(tensor: torch.Tensor) -> float:
    """The float64 sum of squares, a slice at a time: no full-size float64 temporaries."""
    flat = tensor.reshape(-1)
    return math.fsum(float(part.double().square().sum()) for part in torch.split(flat, _SLICE))


def _weighted_mean(updates: Sequence[UpdateInput], name: str) -> torch.Tensor:
    total = sum(u.samples for u in updates)
    acc = torch.zeros_like(updates[0].delta[name])  # type: ignore[index]
    term = torch.empty_like(acc)  # one scratch tensor: a fresh one per update costs page faults
    for update in updates:
        weight = torch.tensor(update.samples / total, dtype=torch.float32)
        torch.mul(update.delta[name], weight, out=term)  # type: ignore[index]
        acc.add_(term)
    return acc


def _sorted_stack(updates: Sequence[UpdateInput], name: str) -> torch.Tensor:
    stacked = torch.stack([u.delta[name] for u in updates])  # type: ignore[index]
    return torch.sort(stacked, dim=0, stable=True).values


def _trimmed_mean(updates: Sequence[UpdateInput], name: str, trim_fraction: float) -> torch.Tensor:
    ordered = _sorted_stack(updates, name)
    count = ordered.shape[0]
    cut = int(trim_fraction * count)
    if count - 2 * cut < 1:
        cut = (count - 1) // 2
    acc = ordered[cut].clone()
    for index in range(cut + 1, count - cut):
        acc = torch.add(acc, ordered[index])
    return torch.div(acc, torch.tensor(float(count - 2 * cut), dtype=torch.float32))


def _median(updates: Sequence[UpdateInput], name: str) -> torch.Tensor:
    ordered = _sorted_stack(updates, name)
    count = ordered.shape[0]
    if count % 2:
        return ordered[count // 2].clone()
    pair = torch.add(ordered[count // 2 - 1], ordered[count // 2])
    return torch.div(pair, torch.tensor(2.0, dtype=torch.float32))


def aggregate(updates: Sequence[UpdateInput], names: Sequence[str], rule: AggregationRule) -> Tensors:
    """The aggregated pseudo-gradient of screened updates under ``rule``."""
    if rule.name == "mean":
        return {n: _weighted_mean(updates, n) for n in names}
    if rule.name == "trimmed_mean":
        trim = float(rule.get("trim_fraction", 0.0) or 0.0)
        return {n: _trimmed_mean(updates, n, trim) for n in names}
    if rule.name == "median":
        return {n: _median(updates, n) for n in names}
    raise ValueError(f"unknown aggregation rule {rule.name!r}")


def outer_step(
    weights: Mapping[str, torch.Tensor],
    momentum: Mapping[str, torch.Tensor] | None,
    gradient: Mapping[str, torch.Tensor],
    rule: AggregationRule,
) -> tuple[Tensors, Tensors]:
    """SGD with (Nesterov) momentum on the pseudo-gradient; lr 1 and momentum 0 is plain averaging."""
    lr = torch.tensor(float(rule.get("outer_lr", 0.7)), dtype=torch.float32)  # type: ignore[arg-type]
    mu = torch.tensor(float(rule.get("momentum", 0.9)), dtype=torch.float32)  # type: ignore[arg-type]
    nesterov = bool(rule.get("nesterov", True))
    new_weights: Tensors = {}
    new_momentum: Tensors = {}
    for name, weight in weights.items():
        grad = gradient[name]
        # The same element-wise ops as buffer = previous*mu + grad, step = grad + buffer*mu and
        # weight - step*lr (IEEE addition commutes exactly), done in place on two tensors.
        if momentum is not None:
            buffer = torch.mul(momentum[name], mu)
        else:
            buffer = torch.zeros_like(weight)
        buffer.add_(grad)
        if nesterov:
            step = torch.mul(buffer, mu)
            step.add_(grad)
        else:
            step = buffer.clone()
        step.mul_(lr)
        new_weights[name] = torch.sub(weight, step)
        new_momentum[name] = buffer
    return new_weights, new_momentum


def merge(
    weights: Mapping[str, torch.Tensor],
    momentum: Mapping[str, torch.Tensor] | None,
    updates: Sequence[UpdateInput],
    rule: AggregationRule,
) -> MergeResult | None:
    """Screen, aggregate and step; None when no update survives screening (the round is empty)."""
    reference = {k: v for k, v in weights.items()}
    outlier_factor = float(rule.get("outlier_factor", 0.0) or 0.0)
    kept, excluded = _screen(updates, reference, outlier_factor)
    if not kept:
        return None
    with torch.no_grad():
        gradient = aggregate(kept, list(reference), rule)
        new_weights, new_momentum = outer_step(reference, momentum, gradient, rule)
    return MergeResult(
        weights=new_weights,
        momentum=new_momentum,
        included=tuple(sorted(u.update_id for u in kept)),
        excluded=tuple(excluded),
    )
