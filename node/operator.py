"""Operator records on gossip: rollbacks that re-pin the canonical head, patches that change settings by round.

Only peers listed in ``swarm.operators`` may author them. An operator signs
either on its own machine (``p2p-node rollback --key FILE`` posts the signed
record to any peer, which relays it) or by being the peer it posts to.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from node.gossip import Gossip
from node.logs import get_logger
from node.store import write_atomic
from protocol.control import SETTINGS, PatchRecord, RollbackRecord, Setting, Temperature, settings_at
from protocol.errors import Invalid
from protocol.identity import SigningKey
from protocol.kinds import PATCH, ROLLBACK, check_author
from protocol.records import Record, sign_record

log = get_logger("operator")

OPERATOR_VERSION = 1
MAX_REPLAYED = 32
# Operator records kept (replayed, journaled, applied), oldest first out. Only configured operator
# keys author them and a swarm sees a handful, so this only stops a runaway or leaked key from
# growing every peer's memory and journal (records are ~1 KB: the journal stays near 1 MB).
MAX_OPERATOR_RECORDS = 1024
RollbackSink = Callable[[RollbackRecord], Any]


class PublishFailed(RuntimeError):
    """The record is valid but the network refused it: nobody heard it, not even this peer."""


class Operations:
    """The rollbacks and patches this peer knows, validated against the configured operator keys."""

    def __init__(
        self, gossip: Gossip, key: SigningKey, operators: frozenset[str], journal: Path | None = None
    ) -> None:
        self._gossip = gossip
        self._key = key
        self.operators = operators
        # Operator records are replayed to late joiners and survive restarts: a peer that
        # missed a rollback or a patch would otherwise fork from the swarm.
        self._journal = journal
        # Each at most MAX_OPERATOR_RECORDS; what overflows is counted in ``dropped``.
        self.raw: dict[str, bytes] = {}  # record id -> signed record, oldest first
        self.rollbacks: dict[str, RollbackRecord] = {}
        self.patches: dict[str, PatchRecord] = {}
        self.rejected: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.on_rollback: RollbackSink | None = None
        self.emit: Callable[..., None] = lambda kind, **data: None
        gossip.on(ROLLBACK, self._on_rollback)
        gossip.on(PATCH, self._on_patch)

    @property
    def is_operator(self) -> bool:
        return self._key.peer_id in self.operators

    def _check(self, record: Record) -> None:
        try:
            check_author(record, self.operators)
        except Invalid as exc:
            self.rejected[exc.reason] += 1
            log.warning("operator_record_rejected", kind=record.kind, author=record.author, reason=exc.reason)
            raise

    def _remember(self, record: Record) -> None:
        if record.id in self.raw:
            return
        self.raw[record.id] = record.raw
        while len(self.raw) > MAX_OPERATOR_RECORDS:
            del self.raw[next(iter(self.raw))]
            self.dropped["raw"] += 1
        if self._journal is not None:
            write_atomic(self._journal, json.dumps({i: raw.hex() for i, raw in self.raw.items()}).encode())

    async def restore(self) -> None:
        """Re-apply the operator records this peer knew when it stopped."""
        if self._journal is None or not self._journal.exists():
            return
        try:
            stored = {i: bytes.fromhex(h) for i, h in json.loads(self._journal.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            log.warning("operator_journal_unreadable", path=str(self._journal))
            return
        for raw in stored.values():
            try:
                record = self._gossip.validate_stored(raw)
                await self._dispatch(record)
            except Invalid:
                continue

    async def _dispatch(self, record: Record) -> None:
        if record.kind == ROLLBACK:
            await self._on_rollback(record)
        elif record.kind == PATCH:
            await self._on_patch(record)

    async def run(self, interval_s: float) -> None:
        """Re-announce the operator records we know, newest last, so late joiners learn them."""
        while True:
            await asyncio.sleep(interval_s)
            for raw in list(self.raw.values())[-MAX_REPLAYED:]:
                await self._gossip.publish_raw(raw)

    async def _on_rollback(self, record: Record) -> None:
        self._check(record)
        rollback: RollbackRecord = record.body
        self._remember(record)
        if rollback.id in self.rollbacks:
            return
        self.rollbacks[rollback.id] = rollback
        if len(self.rollbacks) > MAX_OPERATOR_RECORDS:
            # The earliest issued: never the one in force, which is the latest (``latest_rollback``).
            del self.rollbacks[min(self.rollbacks.values(), key=lambda r: (r.issued_ms, r.id)).id]
            self.dropped["rollbacks"] += 1
        log.info("rollback_received", target=rollback.target, reason=rollback.reason, author=record.author)
        self.emit("rollback", target=rollback.target, reason=rollback.reason, author=record.author)
        if self.on_rollback is not None:
            await self.on_rollback(rollback)

    async def _on_patch(self, record: Record) -> None:
        self._check(record)
        patch: PatchRecord = record.body
        self._remember(record)
        if patch.id in self.patches:
            return
        self.patches[patch.id] = patch
        if len(self.patches) > MAX_OPERATOR_RECORDS:
            # The first applied (``settings_at``'s order): the one most likely overridden since.
            del self.patches[min(self.patches.values(), key=lambda p: (p.effective_round, p.issued_ms, p.id)).id]
            self.dropped["patches"] += 1
        log.info("patch_received", settings=patch.as_dict(), effective_round=patch.effective_round)
        self.emit("patch", settings=patch.as_dict(), effective_round=patch.effective_round, author=record.author)

    def settings_at(self, base: Mapping[str, Setting], round: int) -> dict[str, Setting]:
        """Settings in force at ``round``: the same on every peer that knows the same patches."""
        return settings_at(base, self.patches.values(), round)

    # ---- publishing ------------------------------------------------------------------

    async def relay(self, raw: bytes, check: Callable[[Record], None] | None = None) -> Record:
        """Validate a record an operator signed elsewhere and gossip it; Invalid if it is not one.

        ``check`` may refuse it further (raising Invalid) before anything is published.
        """
        record = self._gossip.validate(raw)
        if record.kind not in (ROLLBACK, PATCH):
            raise Invalid("wrong_kind", record.kind)
        self._check(record)
        if check is not None:
            check(record)
        if not await self._gossip.publish_raw(raw):
            raise PublishFailed("the record could not be published; see the node's log")
        return record

    async def rollback(self, target: str, reason: str) -> RollbackRecord:
        """Sign (as this peer, which must be an operator) and gossip a rollback to ``target``."""
        record = RollbackRecord(target, reason, int(time.time() * 1000))
        await self._publish_own(ROLLBACK, record.to_wire())
        return record

    async def patch(self, settings: Mapping[str, Setting], effective_round: int) -> PatchRecord:
        record = PatchRecord.create(settings, effective_round, int(time.time() * 1000))
        await self._publish_own(PATCH, record.to_wire())
        return record

    async def _publish_own(self, kind: str, body: Any) -> None:
        if not self.is_operator:
            raise Invalid("not_operator", "this peer's key is not listed in swarm.operators")
        raw = sign_record(self._key, kind, OPERATOR_VERSION, self._gossip.swarm, body, int(time.time() * 1000))
        if not await self._gossip.publish_raw(raw):
            raise PublishFailed("the record could not be published; see the node's log")


def classify(settings: Mapping[str, Any], supported: Mapping[str, Any]) -> dict[str, str]:
    """How each patched setting applies here: hot, warm, cold, or unsupported by this workload."""
    classes = {}
    for key in settings:
        spec = SETTINGS.get(key)
        if spec is None:
            classes[key] = "unknown"
        elif key == "inner_lr" and "lr" not in supported:
            classes[key] = "unsupported"
        else:
            classes[key] = spec.temperature.value if spec.temperature is not Temperature.COLD else "cold (restart)"
    return classes


def sign_operator_record(key: SigningKey, swarm: str, kind: str, body: Any) -> bytes:
    """An operator record signed on the operator's machine (the CLI), ready to post to any peer."""
    return sign_record(key, kind, OPERATOR_VERSION, swarm, body, int(time.time() * 1000))
