"""Head records, their ids, the fork-choice rule and the index of known heads.

A head id is the content id of the canonical head body, so peers that merge
the same inputs the same way name the same head without talking.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from protocol import canonical, fields
from protocol.cid import content_id
from protocol.control import RollbackRecord, latest_rollback
from protocol.errors import Invalid
from protocol.updates import UpdateRecord, credit

MAX_HEAD_UPDATES = 1024
MAX_HEAD_MICROSHARDS = 8192
MAX_RULE_PARAMS = 32
MAX_EVAL_METRICS = 16

Param = bool | int | float
_WIRE_KEYS = (
    "parent", "round", "epoch", "updates", "excluded", "rule", "weights", "momentum",
    "samples_total", "tokens_total", "samples", "tokens", "microshards", "eval",
    "workload", "dataset", "rollback", "update_norm",
)
NORM_WINDOW = 8  # recent heads whose update norms bound the next round's


def _param_to_wire(value: Param) -> bool | int | str:
    return fields.encode_real(value) if isinstance(value, float) else value


def _param_from_wire(value: Any, name: str) -> Param:
    if type(value) is bool:
        return value
    if type(value) is int:
        if not -fields.MAX_UINT <= value <= fields.MAX_UINT:
            raise Invalid("malformed", f"{name} is out of range")
        return value
    return fields.decode_real(value, name)


@dataclass(frozen=True)
class AggregationRule:
    """The merge rule by name and its hyperparameters, sorted by name.

    Reals travel as canonical decimal strings (``fields.encode_real``), ints
    and bools as themselves, so 0.7 is ``"0.7"`` and 1 and 1.0 stay distinct.
    """

    name: str
    params: tuple[tuple[str, Param], ...] = ()

    @classmethod
    def of(cls, name: str, **params: Param) -> AggregationRule:
        return cls(name, tuple(sorted(params.items())))

    def get(self, key: str, default: Param | None = None) -> Param | None:
        return dict(self.params).get(key, default)

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "params": {k: _param_to_wire(v) for k, v in self.params}}

    @classmethod
    def from_wire(cls, value: Any) -> AggregationRule:
        wire = fields.record_map(value, ("name", "params"), "rule")
        params = wire["params"]
        keys = fields.sorted_keys(params, "rule params", MAX_RULE_PARAMS)
        return cls(
            fields.label(wire["name"], "rule name"),
            tuple((fields.label(k, "rule param"), _param_from_wire(params[k], k)) for k in keys),
        )


def _eval_to_wire(metrics: tuple[tuple[str, float], ...] | None) -> dict[str, str] | None:
    return None if metrics is None else {k: fields.encode_real(v) for k, v in metrics}


def _eval_from_wire(value: Any) -> tuple[tuple[str, float], ...] | None:
    if value is None:
        return None
    keys = fields.sorted_keys(value, "eval", MAX_EVAL_METRICS)
    return tuple((fields.label(k, "eval metric"), fields.decode_real(value[k], k)) for k in keys)


def _excluded_from_wire(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or len(value) > MAX_HEAD_UPDATES:
        raise Invalid("malformed", f"excluded must be a list of at most {MAX_HEAD_UPDATES}")
    pairs = []
    for item in value:
        if not isinstance(item, list) or len(item) != 2:
            raise Invalid("malformed", "excluded entries are [update id, reason]")
        pairs.append((fields.cid(item[0], "excluded id"), fields.label(item[1], "excluded reason")))
    fields.sorted_cids([update_id for update_id, _ in pairs], "excluded", MAX_HEAD_UPDATES)
    return tuple(pairs)


@dataclass(frozen=True)
class HeadRecord:
    """A merged model state: its inputs, rule, outputs and running totals.

    ``rollback`` is the id of the rollback order this head was built under
    (None before any): the first head built on a rollback's target carries
    that rollback's id and its descendants inherit it, which is what lets the
    fork choice tell the new branch from heads built on the target before.
    ``workload`` and ``dataset`` never change along a chain. ``update_norm`` is the median
    L2 norm of the updates merged (None at genesis): what bounds update norms in later rounds
    however few updates those have (``reference_norm``).
    """

    parent: str | None
    round: int
    epoch: int
    updates: tuple[str, ...]
    excluded: tuple[tuple[str, str], ...]
    rule: AggregationRule
    weights: str
    momentum: str | None
    samples_total: int
    tokens_total: int
    samples: int
    tokens: int
    microshards: tuple[str, ...]
    eval: tuple[tuple[str, float], ...] | None
    workload: str
    dataset: str
    rollback: str | None = None
    update_norm: float | None = None

    @cached_property
    def id(self) -> str:
        return head_id(self)

    def to_wire(self) -> dict[str, Any]:
        return {
            "parent": self.parent,
            "round": self.round,
            "epoch": self.epoch,
            "updates": list(self.updates),
            "excluded": [[update_id, reason] for update_id, reason in self.excluded],
            "rule": self.rule.to_wire(),
            "weights": self.weights,
            "momentum": self.momentum,
            "samples_total": self.samples_total,
            "tokens_total": self.tokens_total,
            "samples": self.samples,
            "tokens": self.tokens,
            "microshards": list(self.microshards),
            "eval": _eval_to_wire(self.eval),
            "workload": self.workload,
            "dataset": self.dataset,
            "rollback": self.rollback,
            "update_norm": None if self.update_norm is None else fields.encode_real(self.update_norm),
        }

    @classmethod
    def from_wire(cls, value: Any) -> HeadRecord:
        wire = fields.record_map(value, _WIRE_KEYS, "head")
        head = cls(
            parent=fields.optional_cid(wire["parent"], "parent"),
            round=fields.uint(wire["round"], "round"),
            epoch=fields.uint(wire["epoch"], "epoch"),
            updates=fields.sorted_cids(wire["updates"], "updates", MAX_HEAD_UPDATES),
            excluded=_excluded_from_wire(wire["excluded"]),
            rule=AggregationRule.from_wire(wire["rule"]),
            weights=fields.cid(wire["weights"], "weights"),
            momentum=fields.optional_cid(wire["momentum"], "momentum"),
            samples_total=fields.uint(wire["samples_total"], "samples_total"),
            tokens_total=fields.uint(wire["tokens_total"], "tokens_total"),
            samples=fields.uint(wire["samples"], "samples"),
            tokens=fields.uint(wire["tokens"], "tokens"),
            microshards=fields.sorted_cids(wire["microshards"], "microshards", MAX_HEAD_MICROSHARDS),
            eval=_eval_from_wire(wire["eval"]),
            workload=fields.cid(wire["workload"], "workload"),
            dataset=fields.cid(wire["dataset"], "dataset"),
            rollback=fields.optional_cid(wire["rollback"], "rollback"),
            update_norm=None if wire["update_norm"] is None else fields.decode_real(wire["update_norm"], "update_norm"),
        )
        _check_consistent(head)
        return head


def _check_consistent(head: HeadRecord) -> None:
    if head.samples > head.samples_total or head.tokens > head.tokens_total:
        raise Invalid("malformed", "a round's totals exceed the cumulative totals")
    if not {update_id for update_id, _ in head.excluded}.isdisjoint(head.updates):
        raise Invalid("malformed", "an update is both included and excluded")
    if (head.parent is None) != (head.round == 0):
        raise Invalid("malformed", "exactly the round-0 head has no parent")
    if head.parent is None and (
        head.epoch or head.updates or head.excluded or head.microshards or head.samples_total
        or head.tokens_total or head.momentum is not None or head.rollback is not None
        or head.update_norm is not None
    ):
        raise Invalid("malformed", "a genesis head carries no inputs, totals, momentum or rollback")
    if head.parent is not None and not head.updates:
        # An honest merge of nothing makes no head; one that claims to would let its author
        # set the weights at will.
        raise Invalid("no_updates", "a head merges at least one update")
    if head.update_norm is not None and not (head.update_norm >= 0 and math.isfinite(head.update_norm)):
        raise Invalid("malformed", "update_norm must be finite and non-negative")


def head_id(head: HeadRecord) -> str:
    """The content id of the head's canonical body: the head's name everywhere."""
    return content_id(canonical.encode(head.to_wire()))


def genesis_head(
    weights_manifest_id: str, workload_schema_hash: str, dataset_id: str, rule: AggregationRule
) -> HeadRecord:
    """The round-0 head every peer derives alike from the workload's seeded initial weights."""
    return HeadRecord(
        parent=None, round=0, epoch=0, updates=(), excluded=(), rule=rule,
        weights=weights_manifest_id, momentum=None, samples_total=0, tokens_total=0,
        samples=0, tokens=0, microshards=(), eval=None,
        workload=workload_schema_hash, dataset=dataset_id, rollback=None,
    )


def check_child(parent: HeadRecord, child: HeadRecord, rollbacks: Mapping[str, RollbackRecord]) -> None:
    """Raise Invalid unless ``child`` follows ``parent`` by the chain rules.

    ``rollbacks`` maps known rollback ids to their records; a child may only
    change the rollback marker to a rollback that targets its parent.
    """
    if child.parent != parent.id:
        raise Invalid("wrong_parent", str(child.parent))
    if child.round != parent.round + 1:
        raise Invalid("wrong_round", f"{child.round} after {parent.round}")
    if child.epoch not in (parent.epoch, parent.epoch + 1):
        raise Invalid("wrong_epoch", f"{child.epoch} after {parent.epoch}")
    if child.samples_total != parent.samples_total + child.samples:
        raise Invalid("wrong_totals", "samples")
    if child.tokens_total != parent.tokens_total + child.tokens:
        raise Invalid("wrong_totals", "tokens")
    if (child.workload, child.dataset) != (parent.workload, parent.dataset):
        raise Invalid("wrong_workload", "workload or dataset changed along the chain")
    if child.rollback != parent.rollback:
        order = rollbacks.get(child.rollback) if child.rollback is not None else None
        if order is None:
            raise Invalid("unknown_rollback", str(child.rollback))
        if order.target != child.parent:
            raise Invalid("bad_rollback", "a rollback marker starts only on the rollback's target")


def check_inputs(
    head: HeadRecord, updates: Mapping[str, UpdateRecord], sizes: Mapping[str, tuple[int, int]]
) -> None:
    """Raise Invalid unless ``updates`` (by record id) are exactly the head's inputs and add up.

    ``sizes`` is the dataset plan's (examples, tokens) per microshard: each update counts for
    its claim capped by the plan (``credit``), never more.
    """
    if tuple(sorted(updates)) != head.updates:
        raise Invalid("inputs_mismatch", "update ids differ from the head's list")
    for update_id, update in updates.items():
        if (update.base, update.round, update.epoch) != (head.parent, head.round, head.epoch):
            raise Invalid("inputs_mismatch", f"{update_id} is for another base, round or epoch")
    credited = [credit(u, sizes) for u in updates.values()]
    if head.samples != sum(samples for samples, _ in credited):
        raise Invalid("inputs_mismatch", "samples")
    if head.tokens != sum(tokens for _, tokens in credited):
        raise Invalid("inputs_mismatch", "tokens")
    if head.microshards != tuple(sorted({s for u in updates.values() for s in u.microshards})):
        raise Invalid("inputs_mismatch", "microshards")


def reference_norm(chain: Iterable[HeadRecord], window: int = NORM_WINDOW) -> float | None:
    """The norm that bounds the next round's updates: the median ``update_norm`` of the last
    ``window`` heads of ``chain`` (newest first) that have one; None before any has.

    A pure function of the chain, so every peer bounds a round alike even when the round
    itself has too few updates for a median of its own.
    """
    norms = []
    for head in chain:
        if head.update_norm is not None:
            norms.append(head.update_norm)
            if len(norms) == window:
                break
    return statistics.median(norms) if norms else None


def fork_rank(head: HeadRecord) -> tuple[int, int, str]:
    # min() of this is the best head: highest round, most samples, smallest id.
    return (-head.round, -head.samples_total, head.id)


def _under_rollback(heads: Mapping[str, HeadRecord], rollback: RollbackRecord) -> list[HeadRecord]:
    """The target and each head whose every link back to the target carries the rollback's marker."""
    if rollback.target not in heads:
        return []
    marker = rollback.id
    verdict: dict[str, bool] = {rollback.target: True}
    for start in heads:
        path: list[str] = []
        current: str | None = start
        # Walk back until a head whose verdict is known; a gap, genesis or a head
        # without the marker ends the walk with a no.
        while current is not None and current not in verdict:
            head = heads.get(current)
            if head is None or head.rollback != marker:
                break
            path.append(current)
            current = head.parent
        known = current is not None and verdict.get(current, False)
        verdict.update((head_id_, known) for head_id_ in path)
        verdict.setdefault(start, False)
    return [heads[head_id_] for head_id_, ok in verdict.items() if ok]


def choose_head(
    heads: Iterable[HeadRecord],
    rollback: RollbackRecord | None = None,
    authors: Mapping[str, frozenset[str]] | None = None,
) -> str | None:
    """The canonical head id among ``heads`` (already validated), or None when there is none.

    Of two branches, the one whose heads since their last common head weigh more wins, a head
    weighing the number of distinct peers whose updates it merged (``authors``: head id -> those
    peers); then the highest round, then most cumulative samples, then smallest id. Rounds and
    samples cost a lone peer little to make (a head needs no training to verify), so they only
    break ties: a peer that forks off alone, cut off or hostile, adds one per head where the
    swarm adds one per trainer, and a sibling head with one more author than the swarm's does
    not outweigh the rounds the swarm built since. Weights add up along a branch, so this is a
    total order.

    Under a rollback only its target and heads built on the target under that rollback
    compete; every other head is ignored while the rollback is in force, including heads built
    on the target before it (they lack its marker). None when the target is not among ``heads``.
    """
    by_id = {head.id: head for head in heads}
    candidates = list(by_id.values()) if rollback is None else _under_rollback(by_id, rollback)
    if not candidates:
        return None
    # Branch weights since the last common head differ as the weights summed from the oldest
    # known head do (the common part is the same on both sides): one sum per head compares them.
    weight = _weights(by_id, authors or {})
    return min(candidates, key=lambda head: (-weight[head.id], fork_rank(head))).id


def _weights(by_id: Mapping[str, HeadRecord], authors: Mapping[str, frozenset[str]]) -> dict[str, int]:
    """Each head's weight summed with its known ancestors': the distinct authors each merged."""
    weight: dict[str, int] = {}
    for head in by_id.values():
        unweighed: list[HeadRecord] = []
        current: HeadRecord | None = head
        while current is not None and current.id not in weight:
            unweighed.append(current)
            current = by_id.get(current.parent) if current.parent is not None else None
        total = weight[current.id] if current is not None else 0
        for ancestor in reversed(unweighed):
            total += len(authors.get(ancestor.id, ()))
            weight[ancestor.id] = total
    return weight


class HeadIndex:
    """The heads this peer knows, linked to a root (genesis or the oldest head kept), with the tip."""

    def __init__(self, root: HeadRecord) -> None:
        self.root = root
        self._heads: dict[str, HeadRecord] = {root.id: root}
        self._authors: dict[str, frozenset[str]] = {}  # head id -> the peers whose updates it merged
        self._rollbacks: dict[str, RollbackRecord] = {}

    @property
    def rollback(self) -> RollbackRecord | None:
        """The rollback in force, if any operator has ordered one."""
        return latest_rollback(self._rollbacks.values())

    def pin(self, rollback: RollbackRecord) -> None:
        """Take a validated operator rollback into account; the latest one is in force."""
        self._rollbacks[rollback.id] = rollback

    def add(self, head: HeadRecord, authors: frozenset[str] = frozenset()) -> bool:
        """Add a validated head, with the peers whose updates it merged (what the fork choice
        weighs; empty when unknown); False if known, Invalid if its parent is unknown or the link is bad."""
        if head.id in self._heads:
            return False
        parent = self._heads.get(head.parent) if head.parent is not None else None
        if parent is None:
            raise Invalid("unknown_parent", str(head.parent))
        check_child(parent, head, self._rollbacks)
        self._heads[head.id] = head
        if authors:
            self._authors[head.id] = authors
        return True

    def authors(self, head_id_: str) -> frozenset[str]:
        """The peers whose updates the head merged, as far as this peer knows."""
        return self._authors.get(head_id_, frozenset())

    def get(self, head_id_: str) -> HeadRecord | None:
        return self._heads.get(head_id_)

    def __contains__(self, head_id_: object) -> bool:
        return head_id_ in self._heads

    def __len__(self) -> int:
        return len(self._heads)

    def heads(self) -> list[HeadRecord]:
        """Every known head, in no particular order."""
        return list(self._heads.values())

    def tip(self) -> str | None:
        """The canonical head id, per ``choose_head`` under the rollback in force."""
        return choose_head(self._heads.values(), self.rollback, self._authors)

    def weight(self, head_id_: str) -> int:
        """What the fork choice weighs a known head by: the authors it and its known ancestors merged."""
        return _weights(self._heads, self._authors).get(head_id_, 0)

    def ancestors(self, head_id_: str) -> Iterator[HeadRecord]:
        """The head itself, then its parent, and so on back to the root."""
        current = self._heads.get(head_id_)
        while current is not None:
            yield current
            current = self._heads.get(current.parent) if current.parent is not None else None

    def chain(self, head_id_: str) -> list[HeadRecord]:
        """The known chain ending at ``head_id_``, oldest first (for coverage replay)."""
        return list(self.ancestors(head_id_))[::-1]

    def is_ancestor(self, ancestor: str, descendant: str) -> bool:
        return any(head.id == ancestor for head in self.ancestors(descendant))

    def prune(self, keep: int) -> tuple[str, ...]:
        """Forget old heads; return the ids dropped.

        Keeps the last ``keep`` heads of the canonical chain, stretched back to
        the first head of the tip's epoch (coverage is replayed from there) and
        to the rollback target in force; the oldest kept becomes the root, and
        branches that do not descend from it are dropped.
        """
        tip = self.tip()
        if tip is None or keep < 1:
            return ()
        chain = list(self.ancestors(tip))
        tip_epoch = chain[0].epoch
        pinned = self.rollback.target if self.rollback is not None else None
        cut = min(keep, len(chain)) - 1
        for depth, head in enumerate(chain):
            if head.epoch == tip_epoch or head.id == pinned:
                cut = max(cut, depth)
        new_root = chain[cut]
        kept = {head.id for head in chain[: cut + 1]}
        for head_id_ in self._heads:
            if head_id_ not in kept and any(h.id in kept for h in self.ancestors(head_id_)):
                kept.add(head_id_)
        dropped = tuple(sorted(set(self._heads) - kept))
        for head_id_ in dropped:
            del self._heads[head_id_]
            self._authors.pop(head_id_, None)
        self.root = new_root
        return dropped
