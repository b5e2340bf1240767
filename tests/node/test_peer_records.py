"""The bridge's cache of pubsub signed peer records (``cache_peer_records``), with real keys,
real envelopes and a real (unstarted) py-libp2p host: a cached record is only ever one that
passed py-libp2p's own check, byte for byte, so nothing forged or foreign gets through it."""

from __future__ import annotations

import multiaddr
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.peer.peerstore import create_signed_peer_record
from libp2p.pubsub.pb.rpc_pb2 import RPC

from node.libp2p.patches import _cached_consume_record, _cached_record_to_send


def signed_record(seed: bytes, port: int) -> tuple[ID, bytes]:
    keys = create_new_key_pair(seed)
    peer = ID.from_pubkey(keys.public_key)
    envelope = create_signed_peer_record(peer, [multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{port}")], keys.private_key)
    return peer, envelope.marshal_envelope()


def rpc_with(record: bytes) -> RPC:
    message = RPC()
    message.senderRecord = record
    return message


def test_only_records_that_passed_the_check_are_reused_and_forgeries_still_fail():
    host = new_host(key_pair=create_new_key_pair(b"h" * 32))
    peer, record = signed_record(b"p" * 32, 4001)
    other, other_record = signed_record(b"o" * 32, 4002)
    forged = bytearray(record)
    forged[-1] ^= 0x01  # the signature's last byte

    assert _cached_consume_record(rpc_with(bytes(forged)), host, peer) is False
    assert _cached_consume_record(rpc_with(record), host, peer) is True
    assert _cached_consume_record(rpc_with(record), host, peer) is True  # from the cache
    # Once a good record is cached, a forged one from the same peer is still checked and fails,
    assert _cached_consume_record(rpc_with(bytes(forged)), host, peer) is False
    # and a genuine record of another peer is no proof for this one.
    assert _cached_consume_record(rpc_with(other_record), host, peer) is False
    assert _cached_consume_record(rpc_with(other_record), host, other) is True
    assert _cached_consume_record(RPC(), host, peer) is True  # no record: nothing to check
    # The record passed was stored by py-libp2p itself (the cache only skips repeats).
    assert host.get_peerstore().get_peer_record(peer) is not None


def test_the_outgoing_record_is_reused_for_a_few_seconds():
    host = new_host(key_pair=create_new_key_pair(b"s" * 32), listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/4003")])
    first, _ = _cached_record_to_send(host)
    again, fresh = _cached_record_to_send(host)
    assert again == first and fresh is False
