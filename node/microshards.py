"""Microshard bytes: from the workload's own files, from the store, or fetched and verified from peers."""

from __future__ import annotations

import asyncio

from node.availability import Availability
from node.exchange import Exchange
from node.logs import get_logger
from node.store import ContentStore
from protocol.dataset import DatasetDescription, Microshard, plan_microshards
from workloads.base import Workload

log = get_logger("microshards")

DATASET_PIN = "dataset"  # the store pin that keeps a local-data peer's microshards


class MicroshardUnavailable(RuntimeError):
    """Some leased microshards could not be had from anyone; the message lists how many."""


class MicroshardSource:
    """The dataset plan and a way to get any planned microshard's exact bytes."""

    def __init__(
        self, workload: Workload, store: ContentStore, exchange: Exchange, availability: Availability, local: bool
    ) -> None:
        self.description: DatasetDescription = workload.dataset()
        self.dataset_id = self.description.dataset_id
        self.plan: tuple[Microshard, ...] = plan_microshards(self.description)
        self.by_id = {m.id: m for m in self.plan}
        self._workload = workload
        self._store = store
        self._exchange = exchange
        self._availability = availability
        self._local = local

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(m.id for m in self.plan)

    @property
    def examples_per_microshard(self) -> float:
        return self.description.examples / max(len(self.plan), 1)

    async def seed(self) -> None:
        """With local data, put every microshard into the store and announce the dataset as held."""
        if not self._local:
            return
        missing = set(await asyncio.to_thread(self._store.missing, [m.source.data_cid for m in self.plan]))

        def put_all() -> None:
            for microshard in self.plan:
                if microshard.source.data_cid in missing:
                    self._store.put(self._workload.microshard_bytes(microshard.index), microshard.source.data_cid)

        await asyncio.to_thread(put_all)
        # Pinned: the store's GC keeps only what a pin names (or what is younger than
        # store.gc_keep_recent_s), and a peer trains on, and serves, these for every epoch.
        await asyncio.to_thread(self._store.pin, DATASET_PIN, [m.source.data_cid for m in self.plan])
        self._availability.add_held(self.dataset_id)
        log.info("dataset_seeded", dataset=self.dataset_id, microshards=len(self.plan))

    async def bytes_of(self, microshard_ids: list[str]) -> list[bytes]:
        """The bytes of each microshard, in order; fetched from holders when not on disk."""
        shards = [self.by_id[i] for i in microshard_ids]
        cids = [m.source.data_cid for m in shards]
        missing = await asyncio.to_thread(self._store.missing, cids)
        if missing:
            holders = list(self._availability.providers(self.dataset_id).full)
            still = await self._exchange.fetch_blobs(missing, holders)
            if still:
                raise MicroshardUnavailable(f"{len(still)} of {len(cids)} microshards unavailable from {len(holders)} holders")
            log.info("microshards_fetched", count=len(missing), holders=len(holders))
        return await asyncio.to_thread(lambda: [self._read(cid) for cid in cids])

    def _read(self, cid: str) -> bytes:
        data = self._store.get(cid)
        if data is None:
            raise MicroshardUnavailable(f"microshard {cid} vanished from the store")
        return data
