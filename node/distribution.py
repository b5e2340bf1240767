"""Model distribution: head variants (bf16, int8) derived from the canonical fp32 weights, and exports.

Codecs are deterministic, so every peer derives byte-identical variants with
the same manifest ids; a variant record links a head to its variant's id.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from node.artifacts import materialise_safetensors, store_artifact
from node.availability import Availability
from node.gossip import Gossip
from node.logs import get_logger
from node.store import ContentStore, fsync_dir
from protocol.codecs import BF16, FP32, INT8
from protocol.heads import HeadRecord
from protocol.records import Record
from protocol.variants import VARIANT_KIND, VARIANT_VERSION, VariantRecord

log = get_logger("distribution")

VARIANT_CODECS = {"fp32": FP32, "bf16": BF16, "int8": INT8}


class Distribution:
    """Publishes this peer's configured variants of each adopted head and keeps an export on disk."""

    def __init__(
        self,
        gossip: Gossip,
        peer_id: str,
        store: ContentStore,
        availability: Availability,
        publish: tuple[str, ...],
        export_dir: str,
        export_variant: str,
    ) -> None:
        self._gossip = gossip
        self._peer_id = peer_id
        self._store = store
        self._availability = availability
        self._publish = publish
        self._export_dir = Path(export_dir) if export_dir else None
        self._export_variant = export_variant
        # head -> variant -> manifest -> peers that announced it
        self.variants: dict[str, dict[str, dict[str, set[str]]]] = {}
        self.exported: str | None = None
        gossip.on(VARIANT_KIND, self._on_variant)

    async def _on_variant(self, record: Record) -> None:
        variant: VariantRecord = record.body
        by_variant = self.variants.setdefault(variant.head, {}).setdefault(variant.variant, {})
        by_variant.setdefault(variant.manifest, set()).add(record.author)
        if len(self.variants) > 64:
            del self.variants[next(iter(self.variants))]

    def manifest_for(self, head: HeadRecord, variant: str) -> str | None:
        """The variant's manifest id: fp32 is the head's own weights; others as announced (most peers first)."""
        if variant == "fp32":
            return head.weights
        announced = self.variants.get(head.id, {}).get(variant, {})
        return max(announced, key=lambda m: (len(announced[m]), m)) if announced else None

    async def on_adopted(self, head: HeadRecord, weights: Mapping[str, torch.Tensor]) -> None:
        """Derive and announce configured variants of ``head``, then refresh the export."""
        for variant in self._publish:
            manifest = await asyncio.to_thread(store_artifact, self._store, weights, VARIANT_CODECS[variant])
            self._availability.add_held(manifest)
            self.variants.setdefault(head.id, {}).setdefault(variant, {}).setdefault(manifest, set()).add(self._peer_id)
            await self._gossip.publish(VARIANT_KIND, VARIANT_VERSION, VariantRecord(head.id, variant, manifest).to_wire())
        if self._export_dir is not None:
            await self._export(head, weights)

    async def _export(self, head: HeadRecord, weights: Mapping[str, torch.Tensor]) -> None:
        assert self._export_dir is not None
        variant = self._export_variant
        manifest = head.weights if variant == "fp32" else await asyncio.to_thread(
            store_artifact, self._store, weights, VARIANT_CODECS[variant]
        )
        directory = self._export_dir
        directory.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(materialise_safetensors, self._store, manifest, directory / "model.safetensors")
        info = {"head": head.id, "round": head.round, "variant": variant, "manifest": manifest}
        temp = directory / ".head.json.tmp"
        temp.write_text(json.dumps(info))
        os.replace(temp, directory / "head.json")
        fsync_dir(directory)
        self.exported = head.id
        log.info("weights_exported", head=head.id, round=head.round, variant=variant, path=str(directory))
