"""Eval records: a peer's measurement of a head's validation loss, published beside the head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protocol import fields

EVAL_KIND = "eval"
EVAL_VERSION = 1


@dataclass(frozen=True)
class EvalRecord:
    """Validation loss of ``head`` on ``split`` over ``examples`` examples, as measured by the author.

    Kept out of the head record itself: float results can differ in the last bit
    between machines, and the head id must not.
    """

    head: str
    split: str
    loss: float
    examples: int

    def to_wire(self) -> dict[str, Any]:
        return {"head": self.head, "split": self.split, "loss": fields.encode_real(self.loss), "examples": self.examples}

    @classmethod
    def from_wire(cls, value: Any) -> EvalRecord:
        wire = fields.record_map(value, ("head", "split", "loss", "examples"), "eval")
        return cls(
            head=fields.cid(wire["head"], "head"),
            split=fields.label(wire["split"], "split"),
            loss=fields.decode_real(wire["loss"], "loss"),
            examples=fields.uint(wire["examples"], "examples"),
        )
