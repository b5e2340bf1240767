"""The update record: one peer's pseudo-gradient for a round, the shards it trained on and how it went."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protocol import fields
from protocol.errors import Invalid

MAX_UPDATE_MICROSHARDS = 1024
MAX_INNER_STEPS = 10_000_000
_WIRE_KEYS = (
    "round", "base", "artifact", "codec", "samples", "tokens",
    "microshards", "epoch", "metrics", "peer",
)
_METRIC_KEYS = ("loss", "steps", "inner_ms")


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
