"""Model distribution: head variants (bf16, int8) derived from the canonical fp32 weights, and exports.

Codecs are deterministic, so every peer derives byte-identical variants with
the same manifest ids; a variant record links a head to its variant's id.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch

from node.artifacts import load_artifact, materialise_safetensors, save_safetensors, store_artifact
from node.availability import Availability
from node.gossip import Gossip
from node.logs import get_logger
from node.store import ContentStore, write_atomic
from protocol.chunking import Chunking, FixedChunking
from protocol.codecs import BF16, FP32, INT8, Codec
from protocol.heads import HeadRecord
from protocol.records import Record
from protocol.variants import VARIANT_KIND, VARIANT_VERSION, VariantRecord

log = get_logger("distribution")

VARIANT_CODECS: dict[str, Codec] = {"fp32": FP32, "bf16": BF16, "int8": INT8}
PINNED_VARIANTS = 16  # this peer's newest variant manifests that store GC keeps (it announces them as held)
# Heads whose variant announcements are kept, oldest first out: consumers ask for recent heads.
MAX_VARIANT_HEADS = 64
# Every honest peer derives the same manifest for a head's variant, so past the first few the
# rest are forgeries; the first announced are kept, as honest peers announce on adopting.
MAX_VARIANT_MANIFESTS = 4
# Announcers only rank a head's manifests for a variant; a few dozen rank them as well as more.
MAX_VARIANT_ANNOUNCERS = 32


def write_variant_safetensors(store: ContentStore, manifest_id: str, variant: str, path: Path) -> None:
    """A stored variant as a .safetensors file, atomically; MissingContent if the store lacks it.

    A bf16 variant's floating tensors are written as bfloat16 (every value is one exactly, and
    the file is half the size: the point of the variant); int8 has no standard blockwise form,
    so it is written dequantised, in the source dtypes, like fp32.
    """
    if variant != "bf16":
        materialise_safetensors(store, manifest_id, path)
        return
    tensors = {
        name: tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
        for name, tensor in load_artifact(store, manifest_id).items()
    }
    save_safetensors(tensors, path, {"artifact": manifest_id, "variant": variant})


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
        chunking: Chunking = FixedChunking(),
    ) -> None:
        self._gossip = gossip
        self.chunking = chunking
        self._peer_id = peer_id
        self._store = store
        self._availability = availability
        self._publish = publish
        self._export_dir = Path(export_dir) if export_dir else None
        self._export_variant = export_variant
        # head -> variant -> manifest -> peers that announced it; at most MAX_VARIANT_HEADS heads,
        # MAX_VARIANT_MANIFESTS manifests per variant and MAX_VARIANT_ANNOUNCERS peers per manifest
        self.variants: dict[str, dict[str, dict[str, set[str]]]] = {}
        self.dropped: Counter[str] = Counter()  # announcements not kept, by reason
        self.exported: str | None = None
        self._pinned: list[str] = []
        gossip.on(VARIANT_KIND, self._on_variant)

    async def _on_variant(self, record: Record) -> None:
        variant: VariantRecord = record.body
        by_variant = self.variants.setdefault(variant.head, {}).setdefault(variant.variant, {})
        announcers = by_variant.get(variant.manifest)
        if announcers is None:
            if len(by_variant) >= MAX_VARIANT_MANIFESTS:
                self.dropped["manifests_full"] += 1
                return
            announcers = by_variant[variant.manifest] = set()
        if record.author not in announcers and len(announcers) >= MAX_VARIANT_ANNOUNCERS:
            self.dropped["announcers_full"] += 1
            return
        announcers.add(record.author)
        self._trim_heads()

    def _trim_heads(self) -> None:
        while len(self.variants) > MAX_VARIANT_HEADS:
            del self.variants[next(iter(self.variants))]
            self.dropped["head_evicted"] += 1

    def manifest_for(self, head: HeadRecord, variant: str) -> str | None:
        """The variant's manifest id: fp32 is the head's own weights; others as announced (most peers first)."""
        if variant == "fp32":
            return head.weights
        announced = self.variants.get(head.id, {}).get(variant, {})
        return max(announced, key=lambda m: (len(announced[m]), m)) if announced else None

    async def on_adopted(self, head: HeadRecord, weights: Mapping[str, torch.Tensor]) -> None:
        """Derive and announce configured variants of ``head``, then refresh the export."""
        for variant in self._publish:
            manifest = await asyncio.to_thread(store_artifact, self._store, weights, VARIANT_CODECS[variant], self.chunking)
            self._pinned = [*self._pinned, manifest][-PINNED_VARIANTS:]
            await asyncio.to_thread(self._store.pin, "variants", self._pinned)
            self._availability.add_held(manifest)
            announced = self.variants.setdefault(head.id, {}).setdefault(variant, {})
            announced.setdefault(manifest, set()).add(self._peer_id)
            self._trim_heads()
            record = VariantRecord(head.id, variant, manifest)
            await self._gossip.publish(VARIANT_KIND, VARIANT_VERSION, record.to_wire())
        if self._export_dir is not None:
            await self._export(head, weights)

    async def _export(self, head: HeadRecord, weights: Mapping[str, torch.Tensor]) -> None:
        assert self._export_dir is not None
        variant = self._export_variant
        manifest = head.weights if variant == "fp32" else await asyncio.to_thread(
            store_artifact, self._store, weights, VARIANT_CODECS[variant], self.chunking
        )
        directory = self._export_dir
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / "model.safetensors"
        await asyncio.to_thread(write_variant_safetensors, self._store, manifest, variant, target)
        info = {"head": head.id, "round": head.round, "variant": variant, "manifest": manifest}
        await asyncio.to_thread(write_atomic, directory / "head.json", json.dumps(info).encode())
        self.exported = head.id
        log.info("weights_exported", head=head.id, round=head.round, variant=variant, path=str(directory))

