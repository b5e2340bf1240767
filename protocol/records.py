"""Signed record envelopes and their one validation function.

On the wire a record is the canonical msgpack array
``[kind, version, swarm, author, created_ms, body, signature]``; the signature
covers the same array without the signature, prefixed by a domain tag.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from protocol import canonical
from protocol.cid import content_id
from protocol.errors import Invalid
from protocol.identity import SigningKey, verify

SIGNING_DOMAIN = "p2p-node/record/v1"
MAX_RECORD_SIZE = 64 * 1024
MAX_CLOCK_SKEW_MS = 5 * 60 * 1000

BodyParser = Callable[[Any], Any]


@dataclass(frozen=True)
class Record:
    """A validated record: who said what, when, in which swarm; ``body`` is the typed body."""

    kind: str
    version: int
    swarm: str
    author: str
    created_ms: int
    body: Any
    raw: bytes

    @property
    def id(self) -> str:
        return content_id(self.raw)


@dataclass(frozen=True)
class RecordKind:
    """A kind of record this node understands: its name, versions and body parser."""

    name: str
    versions: frozenset[int]
    parse_body: BodyParser
    max_size: int = MAX_RECORD_SIZE


def _signed_part(kind: str, version: int, swarm: str, author: str, created_ms: int, body: Any) -> bytes:
    return canonical.encode([SIGNING_DOMAIN, kind, version, swarm, author, created_ms, body])


def sign_record(
    key: SigningKey, kind: str, version: int, swarm: str, body: Any, created_ms: int
) -> bytes:
    """Encode and sign a record; ``body`` is a plain canonical value (e.g. from ``to_wire()``)."""
    signature = key.sign(_signed_part(kind, version, swarm, key.peer_id, created_ms, body))
    return canonical.encode([kind, version, swarm, key.peer_id, created_ms, body, signature])


def validate_record(
    data: bytes,
    *,
    swarm: str,
    kinds: Mapping[str, RecordKind],
    now_ms: int,
    members: frozenset[str] | None = None,
    max_clock_skew_ms: int = MAX_CLOCK_SKEW_MS,
) -> Record:
    """Return the validated record or raise Invalid with the reason it is rejected.

    Checks in order of cost: size, canonical form, envelope shape, kind and
    version, swarm, membership, clock, signature, then the kind's body parser.
    """
    largest = max((k.max_size for k in kinds.values()), default=MAX_RECORD_SIZE)
    if len(data) > largest:
        raise Invalid("oversized", f"{len(data)} bytes")
    value = canonical.decode(
        data, canonical.Limits(max_size=largest, max_str_len=largest, max_bin_len=largest)
    )
    if not isinstance(value, list) or len(value) != 7:
        raise Invalid("malformed", "envelope is not a 7-element array")
    kind, version, record_swarm, author, created_ms, body, signature = value
    if not isinstance(kind, str) or type(version) is not int or not isinstance(record_swarm, str):
        raise Invalid("malformed", "envelope field types")
    if not isinstance(author, str) or type(created_ms) is not int or not isinstance(signature, bytes):
        raise Invalid("malformed", "envelope field types")
    record_kind = kinds.get(kind)
    if record_kind is None:
        raise Invalid("unknown_kind", kind[:40])
    if version not in record_kind.versions:
        raise Invalid("unknown_version", f"{kind} v{version}")
    if len(data) > record_kind.max_size:
        raise Invalid("oversized", f"{kind}: {len(data)} bytes")
    if record_swarm != swarm:
        raise Invalid("wrong_swarm", record_swarm[:40])
    if members is not None and author not in members:
        raise Invalid("not_member", author[:60])
    if abs(created_ms - now_ms) > max_clock_skew_ms:
        raise Invalid("clock_skew", f"{(created_ms - now_ms) / 1000:.0f} s")
    if not verify(author, _signed_part(kind, version, record_swarm, author, created_ms, body), signature):
        raise Invalid("bad_signature", author[:60])
    try:
        parsed = record_kind.parse_body(body)
    except Invalid as exc:
        raise Invalid(f"bad_body:{exc.reason}", exc.detail) from None
    return Record(kind, version, record_swarm, author, created_ms, parsed, bytes(data))
