"""Microshard bytes: from the workload's own files, from the store, or fetched and verified from peers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from node.availability import Availability
from node.exchange import Exchange
from node.logs import get_logger
from node.store import ContentStore
from protocol.cid import content_id
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
        self._by_cid = {m.source.data_cid: m for m in self.plan}
        self._workload = workload
        self._store = store
        self._exchange = exchange
        self._availability = availability
        self._local = local
        self.repaired = 0  # microshards regenerated from local data after the start (corrupt or gone)

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
        """The bytes of each microshard, in order, verified. One missing or corrupt on disk (a read
        drops a corrupt file) is regenerated from local data, or else fetched from holders."""
        cids = [self.by_id[i].source.data_cid for i in microshard_ids]
        missing = await asyncio.to_thread(self._store.missing, cids)
        if missing:
            await self._restore(missing)
        read = await asyncio.to_thread(lambda: {cid: self._store.get(cid) for cid in set(cids)})
        # A same-size corruption passes the start-up check and the ``missing`` test above: only
        # this read finds it, and with no other holder only this peer can make it good again.
        bad = [cid for cid, data in read.items() if data is None]
        if bad:
            await self._restore(bad)
            read.update(await asyncio.to_thread(lambda: {cid: self._store.get(cid) for cid in bad}))
        lost = [cid for cid in bad if read[cid] is None]
        if lost:
            raise MicroshardUnavailable(f"{len(lost)} of {len(cids)} microshards vanished from the store")
        return [read[cid] or b"" for cid in cids]

    async def _restore(self, cids: list[str]) -> None:
        """Put ``cids`` back into the store: regenerated with local data, fetched from holders otherwise."""
        if self._local:
            left = await asyncio.to_thread(self._regenerate, cids)
            self.repaired += len(cids) - len(left)
            cids = left
        if not cids:
            return
        holders = list(self._availability.providers(self.dataset_id).full)
        still = await self._exchange.fetch_blobs(cids, holders)
        if still:
            raise MicroshardUnavailable(
                f"{len(still)} of {len(cids)} microshards unavailable from {len(holders)} holders"
            )
        log.info("microshards_fetched", count=len(cids), holders=len(holders))

    def _regenerate(self, cids: Iterable[str]) -> list[str]:
        """Rebuild each microshard from the workload's files, checked against its content id; the
        ids that could not be (the local files changed), left to the holders."""
        left = []
        for cid in cids:
            microshard = self._by_cid[cid]
            data = self._workload.microshard_bytes(microshard.index)
            if content_id(data) != cid:
                left.append(cid)
                log.error("microshard_not_reproducible", microshard=microshard.id, index=microshard.index)
                continue
            self._store.put(data, cid)
            log.warning("microshard_repaired", microshard=microshard.id, index=microshard.index)
        return left
