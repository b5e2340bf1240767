"""Variant records: a head's weights in another encoding (bf16, int8), linked to the head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protocol import fields
from protocol.errors import Invalid

VARIANT_KIND = "variant"
VARIANT_VERSION = 1
VARIANTS = ("fp32", "bf16", "int8")


@dataclass(frozen=True)
class VariantRecord:
    """``manifest`` holds head ``head``'s weights encoded as ``variant``."""

    head: str
    variant: str
    manifest: str

    def to_wire(self) -> dict[str, Any]:
        return {"head": self.head, "variant": self.variant, "manifest": self.manifest}

    @classmethod
    def from_wire(cls, value: Any) -> VariantRecord:
        wire = fields.record_map(value, ("head", "variant", "manifest"), "variant")
        variant = fields.label(wire["variant"], "variant")
        if variant not in VARIANTS:
            raise Invalid("malformed", f"unknown variant {variant}")
        return cls(fields.cid(wire["head"], "head"), variant, fields.cid(wire["manifest"], "manifest"))
