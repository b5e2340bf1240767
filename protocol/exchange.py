"""The chunk exchange wire format: requests for content by id, answers carrying bytes or "missing".

Every message is one length-prefixed frame holding a canonical msgpack value.
A ``get`` request names up to ``MAX_IDS_PER_REQUEST`` ids of one kind; the
server answers with one ``Item`` frame per id, in request order. A ``have``
request asks which chunks of a manifest the server holds, as a bitfield.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import msgpack

from protocol import canonical
from protocol.cid import is_content_id
from protocol.errors import Invalid

PROTOCOL_ID = "/p2p-node/chunks/1.0.0"
MAX_IDS_PER_REQUEST = 64
MAX_REQUEST_BYTES = 16 * 1024
MAX_ITEM_BYTES = 16 * 1024 * 1024 + 1024
CONTENT_KINDS = frozenset({"chunk", "manifest", "record"})



class FetchState(enum.StrEnum):
    """Where one fetch of an artifact stands, as ``/fetches`` and the metrics name it (the value)."""

    STARTING = "starting"  # reading the manifest, finding providers
    FETCHING = "fetching"  # chunks on the wire
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"  # nobody waits for it any more

    @property
    def ended(self) -> bool:
        return self in (FetchState.DONE, FetchState.FAILED, FetchState.CANCELLED)


# How an ended fetch came out, where its duration says something (a cancelled one was given up).
FETCH_OUTCOMES = (FetchState.DONE, FetchState.FAILED)


_REQUEST_LIMITS = canonical.Limits(max_size=MAX_REQUEST_BYTES, max_array_len=MAX_IDS_PER_REQUEST)


@dataclass(frozen=True)
class GetRequest:
    kind: str
    ids: tuple[str, ...]

    def encode(self) -> bytes:
        return canonical.encode({"op": "get", "kind": self.kind, "ids": list(self.ids)})


@dataclass(frozen=True)
class HaveRequest:
    manifest_id: str

    def encode(self) -> bytes:
        return canonical.encode({"op": "have", "manifest": self.manifest_id})


Request = GetRequest | HaveRequest


def decode_request(data: bytes) -> Request:
    """Parse a request frame; raise Invalid with the reason on anything else."""
    value = canonical.decode(data, _REQUEST_LIMITS)
    if not isinstance(value, dict) or not isinstance(value.get("op"), str):
        raise Invalid("malformed", "request must be a map with an op")
    if value["op"] == "get" and set(value) == {"op", "kind", "ids"}:
        kind, ids = value["kind"], value["ids"]
        if not isinstance(kind, str) or kind not in CONTENT_KINDS:  # a list or map is unhashable
            raise Invalid("malformed", f"unknown content kind {kind!r:.40}")
        if not isinstance(ids, list) or not ids or len(ids) > MAX_IDS_PER_REQUEST:
            raise Invalid("malformed", f"ids must list 1 to {MAX_IDS_PER_REQUEST} content ids")
        if not all(is_content_id(i) for i in ids):
            raise Invalid("malformed", "ids must be content ids")
        return GetRequest(kind, tuple(ids))
    if value["op"] == "have" and set(value) == {"op", "manifest"}:
        if not is_content_id(value["manifest"]):
            raise Invalid("malformed", "manifest must be a content id")
        return HaveRequest(value["manifest"])
    raise Invalid("malformed", f"unknown request {value['op']!r:.40}")


@dataclass(frozen=True)
class Item:
    """One answer to a ``get``: the bytes of ``id`` or None when the server does not have it.

    A decoded item's ``data`` is a read-only view into the frame it came in (see ``decode_item``)."""

    id: str
    data: bytes | memoryview | None

    def encode(self) -> bytes:
        # Byte-for-byte the canonical form of [str, bytes|nil], without re-walking a megabyte payload.
        if self.data is None:
            return item_head(self.id, None)
        return item_head(self.id, len(self.data)) + self.data


def item_head(item_id: str, size: int | None) -> bytes:
    """The bytes of an encoded item before its payload of ``size`` bytes (None: no payload).

    A server can read a chunk from disk straight in behind them (``ContentStore.get_behind``)."""
    if size is None:
        bin_header = b"\xc0"
    elif size < 1 << 8:
        bin_header = b"\xc4" + size.to_bytes(1, "big")
    elif size < 1 << 16:
        bin_header = b"\xc5" + size.to_bytes(2, "big")
    else:
        bin_header = b"\xc6" + size.to_bytes(4, "big")
    return _item_prefix(item_id) + bin_header


def _item_prefix(item_id: str) -> bytes:
    """An encoded item up to its payload's header: a 2-array, then the id."""
    packed_id: bytes = msgpack.packb(item_id)
    return b"\x92" + packed_id


_BIN_LENGTH = {0xC4: 1, 0xC5: 2, 0xC6: 4}  # msgpack bin 8/16/32: bytes in the length field
_NIL = 0xC0


def decode_item(data: bytes, expected_id: str) -> Item:
    """Parse an item frame and check it answers ``expected_id`` (the hash is checked by the caller).

    The payload is returned as a read-only view into ``data``, not a copy: a chunk is a
    megabyte, and copying it out of its frame was a large part of the receiving daemon's
    event loop in a profile (BENCHMARKS.md, chunk exchange). The frame is parsed directly when it is
    exactly ``[expected_id, bin|nil]`` (what every encoder writes) and by msgpack otherwise, so
    anything else gets msgpack's answer: the same item, or the same error.

    Items are not content-addressed (their payload is, and is verified against its id), so
    unlike records they are not re-encoded to check canonical form: that would copy every
    chunk once more on the hot path.
    """
    if len(data) > MAX_ITEM_BYTES:
        raise Invalid("oversized", f"{len(data)} bytes")
    prefix = _item_prefix(expected_id)
    if data.startswith(prefix):
        at = len(prefix)
        marker = data[at] if at < len(data) else None
        if marker == _NIL and at + 1 == len(data):
            return Item(expected_id, None)
        width = _BIN_LENGTH.get(marker) if marker is not None else None
        if width is not None:
            start = at + 1 + width
            if int.from_bytes(data[at + 1 : start], "big") == len(data) - start:
                return Item(expected_id, memoryview(data)[start:].toreadonly())
    try:
        value = msgpack.unpackb(
            data, raw=False, strict_map_key=True, max_bin_len=MAX_ITEM_BYTES, max_str_len=MAX_REQUEST_BYTES,
            max_array_len=4, max_map_len=4, max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several types on garbage; all mean "malformed"
        raise Invalid("malformed", type(exc).__name__) from None
    refused = is_error(value)
    if refused is not None:
        raise Invalid("refused", refused[:80])
    if not isinstance(value, list) or len(value) != 2:
        raise Invalid("malformed", "item must be [id, bytes|nil]")
    item_id, payload = value
    if item_id != expected_id:
        raise Invalid("out_of_order", "item answers another id than requested")
    if payload is not None and not isinstance(payload, bytes):
        raise Invalid("malformed", "item payload must be bytes or nil")
    return Item(item_id, None if payload is None else memoryview(payload).toreadonly())


@dataclass(frozen=True)
class HaveAnswer:
    """Which chunks (by index in the manifest's chunk list) the server holds; None: no manifest."""

    bits: bytes | None

    def encode(self) -> bytes:
        return canonical.encode({"bits": self.bits})


def decode_have(data: bytes, chunk_count: int) -> HaveAnswer:
    value = canonical.decode(data, canonical.Limits(max_size=MAX_ITEM_BYTES, max_bin_len=MAX_ITEM_BYTES))
    refused = is_error(value)
    if refused is not None:
        raise Invalid("refused", refused[:80])
    if not isinstance(value, dict) or set(value) != {"bits"}:
        raise Invalid("malformed", "have answer must be {bits}")
    bits = value["bits"]
    if bits is not None and (not isinstance(bits, bytes) or len(bits) != (chunk_count + 7) // 8):
        raise Invalid("malformed", "bitfield has the wrong length")
    return HaveAnswer(bits)


def encode_error(reason: str) -> bytes:
    return canonical.encode({"error": reason})


def bitfield(flags: list[bool]) -> bytes:
    """Pack booleans little-endian within each byte: chunk i is bit i % 8 of byte i // 8."""
    out = bytearray((len(flags) + 7) // 8)
    for index, flag in enumerate(flags):
        if flag:
            out[index // 8] |= 1 << (index % 8)
    return bytes(out)


def bit_set(bits: bytes, index: int) -> bool:
    return bool(bits[index // 8] >> (index % 8) & 1)


def is_error(value: Any) -> str | None:
    if isinstance(value, dict) and set(value) == {"error"} and isinstance(value["error"], str):
        return value["error"]
    return None
