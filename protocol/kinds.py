"""The registry of record kinds this node understands, and who may author each."""

from __future__ import annotations

from collections.abc import Collection, Iterable

from protocol.control import PatchRecord, RollbackRecord, is_operator
from protocol.errors import Invalid
from protocol.heads import HeadRecord
from protocol.leases import LeaseClaim
from protocol.records import MAX_RECORD_SIZE, Record, RecordKind
from protocol.updates import UpdateRecord

LEASE = "lease"
UPDATE = "update"
HEAD = "head"
ROLLBACK = "rollback"
PATCH = "patch"

# Sized for the list caps: a head names up to 8192 shards and 2 x 1024 updates (about 700 KB);
# leases and updates name up to 1024 shards (about 70 KB).
BUILTIN_KINDS: tuple[RecordKind, ...] = (
    RecordKind(LEASE, frozenset({1}), LeaseClaim.from_wire, max_size=128 * 1024),
    RecordKind(UPDATE, frozenset({1}), UpdateRecord.from_wire, max_size=128 * 1024),
    RecordKind(HEAD, frozenset({1}), HeadRecord.from_wire, max_size=1024 * 1024),
    RecordKind(ROLLBACK, frozenset({1}), RollbackRecord.from_wire, max_size=MAX_RECORD_SIZE),
    RecordKind(PATCH, frozenset({1}), PatchRecord.from_wire, max_size=MAX_RECORD_SIZE),
)
OPERATOR_KINDS = frozenset({ROLLBACK, PATCH})


def record_kinds(extra: Iterable[RecordKind] = ()) -> dict[str, RecordKind]:
    """The kinds to pass to ``validate_record``: the built-ins plus ``extra`` (heartbeat, announce…)."""
    kinds = {kind.name: kind for kind in BUILTIN_KINDS}
    for kind in extra:
        if kind.name in kinds:
            raise ValueError(f"record kind {kind.name!r} is registered twice")
        kinds[kind.name] = kind
    return kinds


def check_author(record: Record, operator_ids: Collection[str]) -> None:
    """Raise Invalid unless the record's author may say what it says.

    Leases and updates speak for the peer named in the body; rollbacks and
    patches only for operators; any member may relay a head, whose id does
    not depend on who sent it.
    """
    if record.kind in OPERATOR_KINDS and not is_operator(record.author, operator_ids):
        raise Invalid("not_operator", record.author[:60])
    if isinstance(record.body, (LeaseClaim, UpdateRecord)) and record.body.peer != record.author:
        raise Invalid("author_mismatch", record.author[:60])
