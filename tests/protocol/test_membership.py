"""The peer table: joins, deaths after missed heartbeats, revivals, replays ignored."""

import pytest
from hypothesis import given, strategies as st

from protocol.errors import Invalid
from protocol.membership import LEAVING, Heartbeat, PeerDied, PeerJoined, PeerRevived, PeerTable


def beat(peer="peerA", interval_ms=1000, **kw):
    return Heartbeat(peer=peer, addrs=("/ip4/127.0.0.1/tcp/1",), software="t", protocol_version=1,
                     role="trainer", interval_ms=interval_ms, **kw)


def test_join_die_revive():
    table = PeerTable("me", dead_after_missed=3)
    assert table.observe("peerA", 1, beat(), now_ms=0) == [PeerJoined("peerA")]
    assert table.tick(2999) == []
    assert table.tick(3001) == [PeerDied("peerA", 3001)]
    assert table.live() == []
    assert table.observe("peerA", 1, beat(), now_ms=4000) == []  # a replay revives nothing
    assert table.observe("peerA", 2, beat(), now_ms=4000) == [PeerRevived("peerA")]
    assert table.is_live("peerA")


def test_a_goodbye_counts_the_peer_out_at_once_and_a_newer_heartbeat_brings_it_back():
    table = PeerTable("me", dead_after_missed=3)
    goodbye = beat(capabilities=((LEAVING, 1),))
    assert table.observe("peerA", 5, goodbye, now_ms=0) == []  # from a stranger: ignored
    assert table.peers == {}
    assert table.observe("peerA", 6, beat(), now_ms=0) == [PeerJoined("peerA")]
    assert table.observe("peerA", 7, goodbye, now_ms=10) == [PeerDied("peerA", 0, left=True)]
    assert not table.is_live("peerA") and table.peers["peerA"].deaths == 1
    assert table.observe("peerA", 7, beat(), now_ms=20) == []  # a replay of the same moment: nothing
    assert table.observe("peerA", 8, goodbye, now_ms=20) == []  # already out
    assert table.tick(10_000) == []  # not counted dead a second time
    assert table.observe("peerA", 9, beat(), now_ms=30) == [PeerRevived("peerA")]  # restarted
    assert table.is_live("peerA")


def test_own_and_mismatched_heartbeats():
    table = PeerTable("me")
    assert table.observe("me", 1, beat("me"), 0) == []
    with pytest.raises(Invalid):
        table.observe("peerB", 1, beat("peerA"), 0)


@given(st.builds(beat, peer=st.text(min_size=1, max_size=50), interval_ms=st.integers(100, 600_000),
                 head=st.none(), round=st.integers(0, 10**9)))
def test_wire_round_trip(heartbeat):
    assert Heartbeat.from_wire(heartbeat.to_wire()) == heartbeat


def test_wire_rejects_bad_fields():
    good = beat().to_wire()
    for key, value in [("role", "king"), ("head", "nope"), ("interval_ms", 5), ("addrs", ["a"] * 17), ("round", -1)]:
        with pytest.raises(Invalid):
            Heartbeat.from_wire({**good, key: value})
    with pytest.raises(Invalid):
        Heartbeat.from_wire({**good, "extra": 1})


def test_a_full_table_refuses_newcomers_while_all_live_then_evicts_the_longest_silent_dead():
    table = PeerTable("me", dead_after_missed=3, capacity=2)
    table.observe("peerA", 1, beat("peerA"), now_ms=0)
    table.observe("peerB", 1, beat("peerB"), now_ms=10)
    with pytest.raises(Invalid) as refused:
        table.observe("peerC", 1, beat("peerC"), now_ms=20)
    assert refused.value.reason == "peer_table_full" and set(table.peers) == {"peerA", "peerB"}
    table.observe("peerA", 2, beat("peerA"), now_ms=30)  # peerB is now the least recently heard
    table.tick(10_000)
    assert table.observe("peerC", 1, beat("peerC"), now_ms=10_000) == [PeerJoined("peerC")]
    assert set(table.peers) == {"peerA", "peerC"}
    assert table.dropped == {"table_full": 1, "dead_evicted": 1}
