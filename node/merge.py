"""The deterministic merge: screen updates, aggregate pseudo-gradients, take the outer Nesterov step.

Every operation here is element-wise fp32 on the CPU, one op at a time (a
multiply and an add, never a fused multiply-add), with updates visited in
sorted-id order, so two honest peers produce byte-identical weights and
momentum from the same inputs. Norms accumulate in float64 in an order fixed
by the tensors' sizes alone, so they too are the same to the last bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from protocol.heads import AggregationRule, Param

Tensors = dict[str, torch.Tensor]

RULES = ("mean", "trimmed_mean", "median", "centered_clip")
CLIP_ITERS = 3  # centered_clip's default iterations
MAX_CLIP_ITERS = 32  # a head names its rule, so a verifier must not be made to iterate without end
_SLICE = 1 << 20  # elements per slice of a norm
_LEAF = 4096  # values a norm's halving stops at and sums exactly


@dataclass(frozen=True)
class UpdateInput:
    """One update to merge: its record id, its sample count and its decoded pseudo-gradient."""

    update_id: str
    samples: int
    delta: Tensors | None  # None: the payload did not decode


class NothingMerged(Exception):
    """Every update of a merge was excluded: the round has no head. ``excluded`` says why, per update."""

    def __init__(self, excluded: Sequence[tuple[str, str]]) -> None:
        self.excluded = tuple(sorted(excluded))
        super().__init__(f"every update was excluded: {', '.join(f'{u} ({why})' for u, why in self.excluded) or 'none given'}")


@dataclass(frozen=True)
class MergeResult:
    """The merged weights and momentum, which updates went in, which did not and why, and their norms."""

    weights: Tensors
    momentum: Tensors
    included: tuple[str, ...]
    excluded: tuple[tuple[str, str], ...]
    norms: tuple[tuple[str, float], ...] = ()  # (update id, L2 norm) of each included update, by id

    @property
    def median_norm(self) -> float | None:
        """The median norm of the included updates: what later rounds' ``reference_norm`` is made of."""
        return _median_of([norm for _, norm in self.norms]) if self.norms else None


def outer_rule(
    rule: str,
    outer_lr: float,
    momentum: float,
    nesterov: bool,
    trim_fraction: float,
    outlier_factor: float,
    *,
    clip_tau: float = 0.0,
    clip_iters: int = CLIP_ITERS,
) -> AggregationRule:
    """The head's rule record: the aggregation and outer-optimizer hyperparameters, typed as merged.

    The clip parameters are recorded for centered_clip only, so the other rules' records, and
    the ids of heads merged under them, stay what they were.
    """
    params: dict[str, Param] = {
        "outer_lr": float(outer_lr),
        "momentum": float(momentum),
        "nesterov": bool(nesterov),
        "trim_fraction": float(trim_fraction),
        "outlier_factor": float(outlier_factor),
    }
    if rule == "centered_clip":
        params |= {"clip_tau": float(clip_tau), "clip_iters": int(clip_iters)}
    return AggregationRule.of(rule, **params)


def rule_problem(rule: AggregationRule) -> str | None:
    """Why ``merge`` cannot compute under ``rule`` ("unknown_rule", "bad_rule_params"), or None."""
    if rule.name not in RULES:
        return "unknown_rule"
    if rule.name == "centered_clip":
        iters = rule.get("clip_iters", CLIP_ITERS)
        tau = rule.get("clip_tau", 0.0)
        if type(iters) is not int or not 1 <= iters <= MAX_CLIP_ITERS:
            return "bad_rule_params"
        if type(tau) is not float or not (math.isfinite(tau) and tau >= 0):
            return "bad_rule_params"
    return None


def _median_of(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _screen(
    updates: Sequence[UpdateInput], reference: Tensors, outlier_factor: float, reference_norm: float | None
) -> tuple[list[UpdateInput], list[tuple[str, str]], dict[str, float]]:
    """Drop updates that do not decode, have the wrong shapes, hold NaN/Inf or whose norm is wild.

    A norm is wild past ``outlier_factor`` times the round's median norm (3+ updates, where a
    median means something) or times ``reference_norm`` (any number of updates).
    """
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
        norm = _norm(delta)
        # A NaN or Inf anywhere makes the float64 sum of squares non-finite (float32 squares
        # cannot overflow it), so one pass both screens and measures.
        if not math.isfinite(norm):
            excluded.append((update.update_id, "non_finite"))
            continue
        norms[update.update_id] = norm
        kept.append(update)
    bound = outlier_bound([norms[u.update_id] for u in kept], outlier_factor, reference_norm)
    if bound is not None:
        excluded += [(u.update_id, "norm_outlier") for u in kept if norms[u.update_id] > bound]
        kept = [u for u in kept if norms[u.update_id] <= bound]
    return kept, sorted(excluded), {u.update_id: norms[u.update_id] for u in kept}


def outlier_bound(norms: Sequence[float], outlier_factor: float, reference_norm: float | None) -> float | None:
    """The norm past which an update is wild, given the finite norms of a round's decoded updates; None for no bound."""
    bounds = []
    if outlier_factor > 0 and reference_norm is not None:
        bounds.append(outlier_factor * max(reference_norm, 1e-12))
    if outlier_factor > 0 and len(norms) >= 3:
        bounds.append(outlier_factor * max(_median_of(norms), 1e-12))
    return min(bounds) if bounds else None


def _norm(delta: Mapping[str, torch.Tensor], centre: Mapping[str, torch.Tensor] | None = None) -> float:
    """The L2 norm of ``delta`` (less ``centre``) over all its tensors, in float64."""
    return math.sqrt(math.fsum(_square_sum(t, None if centre is None else centre[n]) for n, t in delta.items()))


def _square_sum(tensor: torch.Tensor, centre: torch.Tensor | None) -> float:
    """The float64 sum of squares of ``tensor - centre``, a slice at a time: no full-size temporaries.

    A float32 square is exact in float64; the squares are then added by halving, element-wise,
    down to a few thousand that ``math.fsum`` adds exactly. torch's own ``sum`` splits its work
    by thread count and vector width, so its last bit differs between machines, and a norm ends
    up in the head record.
    """
    parts = torch.split(tensor.reshape(-1), _SLICE)
    centres = torch.split(centre.reshape(-1), _SLICE) if centre is not None else [None] * len(parts)
    sums = []
    for part, middle in zip(parts, centres):
        difference = part if middle is None else torch.sub(part, middle)
        squares = difference.to(torch.float64, copy=True)
        squares.mul_(squares)
        while squares.numel() > _LEAF:
            half = squares.numel() // 2
            head = squares[:half]
            head.add_(squares[half : 2 * half])
            if squares.numel() % 2:
                head[:1].add_(squares[-1:])
            squares = head
        sums.append(math.fsum(squares.tolist()))
    return math.fsum(sums)


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


def _centered_clip(updates: Sequence[UpdateInput], names: Sequence[str], tau: float, iters: int) -> Tensors:
    """CenteredClip (Karimireddy, He & Jaggi 2021): ``v <- v + mean_i(clip(x_i - v, tau))``.

    It starts at the coordinate-wise median, clips each update's whole difference (L2 over all
    tensors) to ``tau`` and weights the mean by samples, so one update moves the result by at
    most its weight times ``tau`` per iteration. ``tau`` 0 takes the median distance to the
    start. Distances are measured slice by slice; the step needs one accumulator and one scratch
    tensor besides the centre.
    """
    total = sum(u.samples for u in updates)
    centre = {n: _median(updates, n) for n in names}
    at_mean = False
    for iteration in range(iters):
        distances = [_norm(u.delta, centre) for u in updates]  # type: ignore[arg-type]
        if iteration == 0 and tau <= 0:
            tau = _median_of(distances)
        scales = [1.0 if d <= tau else tau / d for d in distances]
        if all(s == 1.0 for s in scales):
            # Nothing clipped: v + mean_i(x_i - v) is the mean whatever v is, so take the mean rule's
            # own bits; a second time in a row it is a fixed point.
            if at_mean:
                break
            centre = {n: _weighted_mean(updates, n) for n in names}
            at_mean = True
            continue
        at_mean = False
        coefficients = [torch.tensor(u.samples / total * s, dtype=torch.float32) for u, s in zip(updates, scales)]
        for name in names:
            acc = torch.zeros_like(centre[name])
            term = torch.empty_like(acc)
            for update, coefficient in zip(updates, coefficients):
                torch.sub(update.delta[name], centre[name], out=term)  # type: ignore[index]
                term.mul_(coefficient)
                acc.add_(term)
            centre[name].add_(acc)
    return centre


def aggregate(updates: Sequence[UpdateInput], names: Sequence[str], rule: AggregationRule) -> Tensors:
    """The aggregated pseudo-gradient of screened updates under ``rule``."""
    problem = rule_problem(rule)
    if problem is not None:
        raise ValueError(f"{problem}: {rule.name} {dict(rule.params)}")
    if rule.name == "mean":
        return {n: _weighted_mean(updates, n) for n in names}
    if rule.name == "trimmed_mean":
        trim = float(rule.get("trim_fraction", 0.0) or 0.0)
        return {n: _trimmed_mean(updates, n, trim) for n in names}
    if rule.name == "median":
        return {n: _median(updates, n) for n in names}
    tau = float(rule.get("clip_tau", 0.0) or 0.0)
    return _centered_clip(updates, names, tau, int(rule.get("clip_iters", CLIP_ITERS)))  # type: ignore[arg-type]
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
    *,
    reference_norm: float | None = None,
) -> MergeResult:
    """Screen, aggregate and step; NothingMerged when no update survives screening.

    ``reference_norm`` is a norm the caller derives from the chain alone (recent heads'
    ``median_norm``), so that the rule's ``outlier_factor`` bounds updates in rounds too small
    for a median of their own; None (genesis, or no history) leaves only the in-round bound.
    """
    if reference_norm is not None and not (math.isfinite(reference_norm) and reference_norm >= 0):
        raise ValueError(f"reference_norm must be finite and non-negative, not {reference_norm}")
    reference = {k: v for k, v in weights.items()}
    outlier_factor = float(rule.get("outlier_factor", 0.0) or 0.0)
    kept, excluded, norms = _screen(updates, reference, outlier_factor, reference_norm)
    if not kept:
        raise NothingMerged(excluded)
    with torch.no_grad():
        gradient = aggregate(kept, list(reference), rule)
        new_weights, new_momentum = outer_step(reference, momentum, gradient, rule)
    return MergeResult(
        weights=new_weights,
        momentum=new_momentum,
        included=tuple(sorted(u.update_id for u in kept)),
        excluded=tuple(excluded),
        norms=tuple(sorted(norms.items())),
    )
