"""The update record: one peer's pseudo-gradient for a round, the shards it trained on and how it went."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from protocol import canonical, fields
from protocol.cid import content_id
from protocol.errors import Invalid

MAX_UPDATE_MICROSHARDS = 1024
MAX_INNER_STEPS = 10_000_000
_WIRE_KEYS = (
    "round", "base", "artifact", "codec", "samples", "tokens",
    "microshards", "epoch", "metrics", "peer",
)
_METRIC_KEYS = ("loss", "steps", "inner_ms")
_BINDING_DOMAIN = "p2p-node/update-artifact/v1"


@dataclass(frozen=True)
class InnerMetrics:
    """How the inner loop went: mean loss over it, steps taken, wall time in milliseconds."""

    loss: float
    steps: int
    inner_ms: int

    def to_wire(self) -> dict[str, Any]:
        return {"loss": float(self.loss), "steps": self.steps, "inner_ms": self.inner_ms}

    @classmethod
    def from_wire(cls, value: Any) -> InnerMetrics:
        wire = fields.record_map(value, _METRIC_KEYS, "metrics")
        return cls(
            loss=fields.finite_float(wire["loss"], "loss"),
            steps=fields.uint(wire["steps"], "steps", MAX_INNER_STEPS),
            inner_ms=fields.uint(wire["inner_ms"], "inner_ms"),
        )


@dataclass(frozen=True)
class UpdateRecord:
    """A pseudo-gradient trained from head ``base`` for ``round`` on ``microshards`` of ``epoch``.

    ``artifact`` is the manifest id of the encoded pseudo-gradient; its id in
    heads is the id of the signed record carrying this body, and ``peer``
    must be that record's author.
    """

    round: int
    base: str
    artifact: str
    codec: str
    samples: int
    tokens: int
    microshards: tuple[str, ...]
    epoch: int
    metrics: InnerMetrics
    peer: str

    def to_wire(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "base": self.base,
            "artifact": self.artifact,
            "codec": self.codec,
            "samples": self.samples,
            "tokens": self.tokens,
            "microshards": list(self.microshards),
            "epoch": self.epoch,
            "metrics": self.metrics.to_wire(),
            "peer": self.peer,
        }

    @classmethod
    def from_wire(cls, value: Any) -> UpdateRecord:
        wire = fields.record_map(value, _WIRE_KEYS, "update")
        update = cls(
            round=fields.uint(wire["round"], "round"),
            base=fields.cid(wire["base"], "base"),
            artifact=fields.cid(wire["artifact"], "artifact"),
            codec=fields.label(wire["codec"], "codec"),
            samples=fields.uint(wire["samples"], "samples"),
            tokens=fields.uint(wire["tokens"], "tokens"),
            microshards=fields.sorted_cids(
                wire["microshards"], "microshards", MAX_UPDATE_MICROSHARDS, allow_empty=False
            ),
            epoch=fields.uint(wire["epoch"], "epoch"),
            metrics=InnerMetrics.from_wire(wire["metrics"]),
            peer=fields.peer(wire["peer"], "peer"),
        )
        if update.round == 0:
            raise Invalid("malformed", "round 0 is genesis; updates start at round 1")
        if update.samples == 0:
            raise Invalid("malformed", "an update trained on no samples")
        return update


def update_binding(peer: str, base: str, round: int) -> str:
    """What an update's artifact manifest must name: its author, base head and round.

    An artifact bound this way serves one update only: republished in a later round (a
    replay) or under another peer's record (a copy), its binding no longer matches.
    """
    return content_id(canonical.encode([_BINDING_DOMAIN, peer, base, round]))


def credit(update: UpdateRecord, sizes: Mapping[str, tuple[int, int]]) -> tuple[int, int]:
    """The samples and tokens an update counts for: its claim, capped by the plan.

    ``sizes`` maps planned microshard ids to (examples, tokens). What weighs an update in a
    merge and what the fork choice ranks by is then checkable by every peer: no author can
    count for more than the data it leased. Unplanned shards count nothing.
    """
    examples = sum(sizes[s][0] for s in update.microshards if s in sizes)
    tokens = sum(sizes[s][1] for s in update.microshards if s in sizes)
    return min(update.samples, examples), min(update.tokens, tokens)
