"""Gossip of signed records on the swarm's topic: publish, validate, count rejections, dispatch."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from node.libp2p import BridgeError, Libp2pBridge, PublisherRate
from node.logs import Repeats, get_logger
from protocol.errors import Invalid
from protocol.identity import SigningKey
from protocol.records import MAX_CLOCK_SKEW_MS, Record, RecordKind, sign_record, validate_record

log = get_logger("gossip")

RecordHandler = Callable[[Record], Awaitable[None]]


def records_topic(swarm: str) -> str:
    """The gossip topic of a swarm: two swarms on one network never share a topic."""
    return f"/p2p-node/{swarm}/records/1"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Gossip:
    """Publishes our records and turns every inbound message into a record or a counted rejection."""

    def __init__(
        self,
        bridge: Libp2pBridge,
        key: SigningKey,
        swarm: str,
        kinds: Mapping[str, RecordKind],
        members: frozenset[str] | None = None,
        rate_limit_per_s: float = 0.0,
        timeless: frozenset[str] = frozenset(),
    ) -> None:
        self._bridge = bridge
        self._key = key
        self.swarm = swarm
        self.topic = records_topic(swarm)
        self._kinds = dict(kinds)
        self._members = members
        self._handlers: dict[str, list[RecordHandler]] = {}
        self._queue: asyncio.Queue[Any] | None = None
        self.rejected: Counter[str] = Counter()
        self.accepted: Counter[str] = Counter()
        self.published: Counter[str] = Counter()
        self.publish_failures = 0
        self.handler_errors = 0
        self._handler_faults = Repeats()  # the same fault (a full disk), logged once a minute
        self._rate = rate_limit_per_s
        # Kinds re-announced long after they were signed (operator orders): their age is no fault.
        self._timeless = timeless
        self._rates = PublisherRate(rate_limit_per_s)

    def on(self, kind: str, handler: RecordHandler) -> None:
        """Call ``handler`` with every valid record of ``kind`` (our own included)."""
        if kind not in self._kinds:
            raise ValueError(f"unknown record kind {kind!r}")
        self._handlers.setdefault(kind, []).append(handler)

    async def start(self) -> None:
        self._queue = await self._bridge.subscribe(self.topic)

    async def publish(self, kind: str, version: int, body: Any) -> bytes | None:
        """Sign and publish a record; return its bytes, or None when the network refused it.

        libp2p hands our own publishes back on our subscription, so handlers see
        local and remote records through the same validating path.
        """
        raw = sign_record(self._key, kind, version, self.swarm, body, now_ms())
        try:
            await self._bridge.publish(self.topic, raw)
        except (BridgeError, TimeoutError) as exc:
            self.publish_failures += 1
            log.warning("publish_failed", kind=kind, error=str(exc))
            return None
        self.published[kind] += 1
        return raw

    async def publish_raw(self, raw: bytes) -> bool:
        """Publish a record that is already signed (ours, or an operator's we relay)."""
        try:
            await self._bridge.publish(self.topic, raw)
        except (BridgeError, TimeoutError) as exc:
            self.publish_failures += 1
            log.warning("publish_failed", error=str(exc))
            return False
        return True

    def validate(self, data: bytes) -> Record:
        """Validate one message as a record of this swarm; raises Invalid with the reason."""
        try:
            return validate_record(
                data, swarm=self.swarm, kinds=self._kinds, now_ms=now_ms(), members=self._members
            )
        except Invalid as exc:
            if exc.reason != "clock_skew" or not self._timeless:
                raise
            record = self.validate_stored(data)
            if record.kind not in self._timeless or record.created_ms > now_ms() + MAX_CLOCK_SKEW_MS:
                raise
            return record

    def validate_stored(self, data: bytes) -> Record:
        """Validate a record kept from earlier: everything but its age is checked."""
        return validate_record(
            data, swarm=self.swarm, kinds=self._kinds, now_ms=now_ms(), members=self._members,
            max_clock_skew_ms=2**62,
        )

    async def run(self) -> None:
        """Drain inbound messages forever; nothing a peer sends can raise out of here."""
        assert self._queue is not None, "start() first"
        while True:
            message = await self._queue.get()
            await self.handle_message(message.data, message.source)

    def _within_rate(self, source: str) -> bool:
        """A token bucket per publishing peer: bursts of 2 s worth, then ``rate`` per second.

        The bridge holds back the same excess before it is relayed; this is the same rule for
        records handed in by other routes (tests, replays)."""
        return self._rate <= 0 or source == self._key.peer_id or self._rates.allow(source)

    async def handle_message(self, data: bytes, source: str) -> Record | None:
        if not self._within_rate(source):
            self.rejected["rate_limited"] += 1
            return None
        try:
            record = self.validate(data)
        except Invalid as exc:
            self.rejected[exc.reason] += 1
            log.debug("record_rejected", reason=exc.reason, detail=exc.detail[:120], source=source)
            return None
        self.accepted[record.kind] += 1
        for handler in self._handlers.get(record.kind, ()):
            try:
                await handler(record)
            except Invalid as exc:
                self.rejected[exc.reason] += 1
                log.debug("record_rejected", reason=exc.reason, detail=exc.detail[:120], source=source)
            except Exception as exc:
                # A bug in a handler must be visible, but one bad record must not stop gossip; a
                # local fault that fails every record (a full disk) must not flood the log either.
                self.handler_errors += 1
                if (held := self._handler_faults.due(f"{record.kind}: {_fault(exc)}")) is not None:
                    log.exception("record_handler_failed", kind=record.kind, author=record.author, repeated=held)
        return record

    def stats(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "accepted": dict(self.accepted),
            "published": dict(self.published),
            "rejected": dict(self.rejected),
            "publish_failures": self.publish_failures,
            "handler_errors": self.handler_errors,
            "dropped_queue_full": self._bridge.stats.gossip_dropped_full_queue,
        }


def _fault(exc: Exception) -> str:
    """What makes two failures the same fault: an OSError's error, not the file it names (every
    record's write fails on its own temp file when the disk is full)."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return f"{type(exc).__name__}: {exc}"
