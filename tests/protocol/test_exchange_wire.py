"""The chunk exchange wire format: round trips, and no peer input raising anything but Invalid."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from protocol import canonical
from protocol import exchange as wire
from protocol.availability import Announce
from protocol.cid import content_id
from protocol.errors import Invalid
from protocol.exchange import FetchState, GetRequest, HaveAnswer, HaveRequest, Item

cids = st.binary(min_size=0, max_size=16).map(content_id)
kinds = st.sampled_from(sorted(wire.CONTENT_KINDS))
get_requests = st.builds(
    GetRequest, kinds, st.lists(cids, min_size=1, max_size=wire.MAX_IDS_PER_REQUEST).map(tuple)
)
have_requests = st.builds(HaveRequest, cids)
requests = st.one_of(get_requests, have_requests)

# Any msgpack value a peer could send, canonical or not.
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=80)
    | st.binary(max_size=80)
    | cids
    | st.sampled_from(["op", "get", "have", "kind", "ids", "manifest", "chunk", "record", "bits", "error"]),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=10) | st.sampled_from(["op", "kind", "ids", "manifest"]), children, max_size=5),
    max_leaves=20,
)


def mutate(data: bytes, draw_ops: list[tuple[int, int, int]]) -> bytes:
    """Apply byte flips, truncations and insertions (positions are taken modulo the length)."""
    out = bytearray(data)
    for op, position, value in draw_ops:
        if not out:
            out.append(value)
            continue
        position %= len(out)
        if op == 0:
            out[position] ^= value or 1
        elif op == 1:
            del out[position:]
        elif op == 2:
            out.insert(position, value)
        else:
            del out[position]
    return bytes(out)


mutations = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=4
)


# ---- round trips ---------------------------------------------------------------------


@given(requests)
def test_request_round_trip(request):
    frame = request.encode()
    assert len(frame) <= wire.MAX_REQUEST_BYTES
    assert wire.decode_request(frame) == request


@given(cids, st.none() | st.binary(max_size=4096))
def test_item_round_trip(cid, data):
    item = Item(cid, data)
    assert wire.decode_item(item.encode(), cid) == item


@pytest.mark.parametrize("size", [None, 0, 1, 255, 256, 65535, 65536, 1 << 20])
def test_item_encoding_is_msgpack_canonical(size):
    """Items built from a head and a payload are byte for byte msgpack's own encoding."""
    data = None if size is None else bytes(size)
    cid = content_id(b"any")
    assert Item(cid, data).encode() == msgpack.packb([cid, data], use_bin_type=True)
    assert wire.item_head(cid, size) + (data or b"") == Item(cid, data).encode()


@given(cids, cids, st.binary(max_size=64))
def test_item_for_another_id_is_out_of_order(asked, answered, data):
    assume(asked != answered)
    with pytest.raises(Invalid) as caught:
        wire.decode_item(Item(answered, data).encode(), asked)
    assert caught.value.reason == "out_of_order"


@given(st.lists(st.booleans(), max_size=300))
def test_bitfield_round_trip(flags):
    bits = wire.bitfield(flags)
    assert len(bits) == (len(flags) + 7) // 8
    assert [wire.bit_set(bits, i) for i in range(len(flags))] == flags
    # Padding bits past the last chunk are zero, so equal holdings give equal bytes.
    assert all(not wire.bit_set(bits, i) for i in range(len(flags), len(bits) * 8))
    answer = wire.decode_have(HaveAnswer(bits).encode(), len(flags))
    assert answer.bits == bits


def test_have_without_manifest_and_wrong_length():
    assert wire.decode_have(HaveAnswer(None).encode(), 10).bits is None
    with pytest.raises(Invalid):
        wire.decode_have(HaveAnswer(b"\x00").encode(), 9)  # 9 chunks need 2 bytes


@given(st.text(max_size=100))
def test_error_frames_are_refusals(reason):
    frame = wire.encode_error(reason)
    for decode in (lambda f: wire.decode_item(f, content_id(b"x")), lambda f: wire.decode_have(f, 8)):
        with pytest.raises(Invalid) as caught:
            decode(frame)
        assert caught.value.reason == "refused"


# ---- hostile input -------------------------------------------------------------------


def _request_or_invalid(frame: bytes) -> None:
    try:
        request = wire.decode_request(frame)
    except Invalid:
        return
    # Whatever is accepted is a canonical request: it re-encodes to exactly the frame.
    assert isinstance(request, (GetRequest, HaveRequest))
    assert request.encode() == frame


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(requests, mutations)
def test_mutated_request_frames_are_invalid_or_canonical(request, ops):
    _request_or_invalid(mutate(request.encode(), ops))


@given(st.binary(max_size=2 * wire.MAX_REQUEST_BYTES))
def test_random_bytes_are_never_more_than_invalid(frame):
    _request_or_invalid(frame)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(msgpack_values)
def test_any_msgpack_value_is_a_request_or_invalid(value):
    _request_or_invalid(msgpack.packb(value, use_bin_type=True))


@given(
    st.fixed_dictionaries(
        {"op": st.sampled_from(["get", "have"])},
        optional={"kind": msgpack_values | kinds, "ids": msgpack_values, "manifest": msgpack_values, "x": msgpack_values},
    )
)
def test_near_miss_requests_are_invalid_not_errors(value):
    try:
        frame = canonical.encode(value)
    except Invalid:
        return
    _request_or_invalid(frame)


@pytest.mark.parametrize(
    "value",
    [
        {"op": "get", "kind": "chunk", "ids": []},
        {"op": "get", "kind": "chunk", "ids": [content_id(bytes([i])) for i in range(wire.MAX_IDS_PER_REQUEST + 1)]},
        {"op": "get", "kind": "blob", "ids": [content_id(b"a")]},
        {"op": "get", "kind": ["chunk"], "ids": [content_id(b"a")]},
        {"op": "get", "kind": {"a": 1}, "ids": [content_id(b"a")]},
        {"op": "get", "kind": "chunk", "ids": ["b3:" + "A" * 64]},
        {"op": "get", "kind": "chunk", "ids": content_id(b"a")},
        {"op": "get", "kind": "chunk", "ids": [content_id(b"a")], "extra": 1},
        {"op": "have", "manifest": "nope"},
        {"op": "have", "manifest": [content_id(b"a")]},
        {"op": "put", "ids": [content_id(b"a")]},
        {"op": 1},
        [content_id(b"a")],
    ],
)
def test_malformed_requests_name_a_reason(value):
    with pytest.raises(Invalid) as caught:
        wire.decode_request(canonical.encode(value))
    assert caught.value.reason in {"malformed", "oversized"}


def test_oversized_request_is_invalid():
    with pytest.raises(Invalid):
        wire.decode_request(b"\x00" * (wire.MAX_REQUEST_BYTES + 1))


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(cids, st.none() | st.binary(max_size=256), mutations)
def test_mutated_item_frames_are_invalid_or_items(cid, data, ops):
    frame = mutate(Item(cid, data).encode(), ops)
    try:
        item = wire.decode_item(frame, cid)
    except Invalid:
        return
    assert item.id == cid and (item.data is None or isinstance(item.data, memoryview))


def _msgpack_item(frame: bytes, cid: str) -> tuple[str, bytes | None] | str:
    """What plain msgpack makes of an item frame: (id, payload), or "invalid"."""
    try:
        value = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception:
        return "invalid"
    if isinstance(value, list) and len(value) == 2 and value[0] == cid and (value[1] is None or isinstance(value[1], bytes)):
        return value[0], value[1]
    return "invalid"


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(cids, st.none() | st.binary(max_size=300), mutations, st.sampled_from(["minimal", "bin16", "bin32", "str8"]))
def test_item_parsing_agrees_with_msgpack(cid, data, ops, form):
    """The zero-copy parse of an item and msgpack's reading of the same frame never differ."""
    frame = Item(cid, data).encode()
    if data is not None and form in ("bin16", "bin32"):
        # The same item with a wider (non-minimal, still valid) length field.
        head = b"\x92" + msgpack.packb(cid)
        frame = head + (b"\xc5" + len(data).to_bytes(2, "big") if form == "bin16" else b"\xc6" + len(data).to_bytes(4, "big")) + data
    if form == "str8":
        frame = b"\x92\xd9" + bytes([len(cid)]) + cid.encode() + frame[2 + len(cid) :]
    frame = mutate(frame, ops)
    expected = _msgpack_item(frame, cid)
    try:
        item = wire.decode_item(frame, cid)
    except Invalid:
        assert expected == "invalid"
        return
    assert expected != "invalid"
    assert (item.id, None if item.data is None else bytes(item.data)) == expected
    assert item.data is None or item.data.readonly


def test_item_payload_is_a_view_into_the_frame():
    data = bytes(range(256)) * 4096  # 1 MiB: the hot path, no copy of the payload
    frame = Item(content_id(data), data).encode()
    item = wire.decode_item(frame, content_id(data))
    assert isinstance(item.data, memoryview) and item.data.obj is frame and item.data == data


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.booleans(), max_size=64), mutations)
def test_mutated_have_answers_are_invalid_or_well_sized(flags, ops):
    frame = mutate(HaveAnswer(wire.bitfield(flags)).encode(), ops)
    try:
        answer = wire.decode_have(frame, len(flags))
    except Invalid:
        return
    assert answer.bits is None or len(answer.bits) == (len(flags) + 7) // 8


@given(msgpack_values)
def test_any_value_is_an_item_or_invalid(value):
    cid = content_id(b"x")
    try:
        item = wire.decode_item(msgpack.packb(value, use_bin_type=True), cid)
    except Invalid:
        return
    assert item.id == cid


# ---- announce records ----------------------------------------------------------------


@given(st.lists(cids, max_size=20), st.lists(cids, max_size=10))
def test_announce_round_trip(holds, fetching):
    announce = Announce(tuple(sorted(set(holds))), tuple(sorted(set(fetching))))
    assert Announce.from_wire(canonical.decode(canonical.encode(announce.to_wire()))) == announce


@given(msgpack_values)
def test_any_announce_body_is_an_announce_or_invalid(value):
    try:
        announce = Announce.from_wire(value)
    except Invalid:
        return
    assert announce.to_wire() == value


def test_fetch_states_are_their_wire_names_and_three_of_them_end_a_fetch() -> None:
    assert [s.value for s in FetchState] == ["starting", "fetching", "done", "failed", "cancelled"]
    assert {s for s in FetchState if s.ended} == {FetchState.DONE, FetchState.FAILED, FetchState.CANCELLED}
    assert FetchState.DONE == "done"
