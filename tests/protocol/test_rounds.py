"""Rounds close when every live expected peer has reported, or at the deadline."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.cid import content_id
from protocol.identity import SigningKey
from protocol.rounds import CloseReason, Offer, Phase, RoundState, adaptive_deadline_ms, inner_budget, measured_speeds
from protocol.updates import InnerMetrics, UpdateRecord

PEERS = [SigningKey(bytes([i + 20]) * 32).peer_id for i in range(5)]
BASE = content_id(b"base head")
DEADLINE = 100_000


def update(peer: str, tag: bytes = b"", round: int = 4, base: str = BASE) -> tuple[str, UpdateRecord]:
    body = UpdateRecord(
        round=round, base=base, artifact=content_id(peer.encode() + tag), codec="fp32", samples=8,
        tokens=80, microshards=(content_id(peer.encode()),), epoch=0,
        metrics=InnerMetrics(1.0, 10, 500), peer=peer,
    )
    return content_id(b"record" + peer.encode() + tag + bytes([round])), body


def fresh(expected: list[str] = PEERS[:3]) -> RoundState:
    return RoundState(4, BASE, expected, DEADLINE)


def test_closes_as_soon_as_every_expected_peer_reported() -> None:
    state = fresh()
    for peer in PEERS[:2]:
        assert state.offer(*update(peer)) is Offer.ACCEPTED
        assert not state.should_close(10)
    assert state.waiting_for == {PEERS[2]}
    state.offer(*update(PEERS[2]))
    assert state.should_close(10)
    result = state.close(10)
    assert result.reason is CloseReason.COMPLETE
    assert result.updates == tuple(sorted(update(p)[0] for p in PEERS[:3]))
    assert result.missing == frozenset()


def test_deadline_closes_without_the_stragglers() -> None:
    state = fresh()
    state.offer(*update(PEERS[0]))
    assert not state.should_close(DEADLINE - 1)
    assert state.should_close(DEADLINE)
    result = state.close(DEADLINE)
    assert result.reason is CloseReason.DEADLINE
    assert result.missing == {PEERS[1], PEERS[2]}
    assert state.offer(*update(PEERS[1])) is Offer.LATE
    assert state.close(DEADLINE + 5) is result


def test_dead_peers_are_not_waited_for_and_are_again_if_they_return() -> None:
    state = fresh()
    state.offer(*update(PEERS[0]))
    state.set_live(PEERS[1], False)
    state.set_live(PEERS[2], False)
    assert state.should_close(1)
    state.set_live(PEERS[2], True)
    assert not state.should_close(1)


def test_an_empty_round_waits_for_its_deadline() -> None:
    state = fresh([])
    assert not state.should_close(1)
    assert state.should_close(DEADLINE)


def test_updates_for_another_round_base_or_an_already_counted_peer_are_refused() -> None:
    state = fresh()
    assert state.offer(*update(PEERS[0], round=3)) is Offer.WRONG_ROUND
    assert state.offer(*update(PEERS[0], base=content_id(b"fork"))) is Offer.WRONG_BASE
    first = update(PEERS[0])
    assert state.offer(*first) is Offer.ACCEPTED
    assert state.offer(*first) is Offer.DUPLICATE
    assert state.offer(*update(PEERS[0], tag=b"again")) is Offer.PEER_COUNTED
    assert state.updates == (first[0],)


def test_late_lessees_and_unexpected_peers() -> None:
    state = fresh(PEERS[:1])
    state.expect(PEERS[3])
    state.offer(*update(PEERS[0]))
    assert not state.should_close(1)
    assert state.offer(*update(PEERS[4])) is Offer.ACCEPTED  # counted, though nobody waited for it
    state.offer(*update(PEERS[3]))
    assert state.should_close(1)
    assert len(state.close(1).updates) == 3


@settings(max_examples=50)
@given(st.permutations(PEERS), st.integers(1, 5))
def test_the_closed_round_does_not_depend_on_arrival_order(order: list[str], arrived: int) -> None:
    state = RoundState(4, BASE, PEERS, DEADLINE)
    for peer in order[:arrived]:
        state.offer(*update(peer))
    result = state.close(DEADLINE)
    assert set(result.updates) == {update(p)[0] for p in order[:arrived]}
    assert result.missing == set(order[arrived:])
    assert (result.reason is CloseReason.COMPLETE) == (arrived == len(PEERS))


def test_adaptive_deadline_follows_the_median_within_bounds() -> None:
    assert adaptive_deadline_ms([60_000, 50_000, 70_000, 900_000]) == int(65_000 * 1.5 + 10_000)
    assert adaptive_deadline_ms([1]) == 30_000
    assert adaptive_deadline_ms([10**9]) == 3_600_000
    assert adaptive_deadline_ms([], max_ms=42_000) == 42_000


def test_steps_mode_gives_every_peer_the_same_steps_and_no_time_limit() -> None:
    assert inner_budget("steps", 40, {"a": 1.0, "b": 9.0}, "b") == (40, None)


def test_time_mode_budgets_what_the_median_peer_takes_and_caps_fast_peers_at_twice_the_steps() -> None:
    speeds = {"slow": 2.0, "median": 4.0, "fast": 100.0}
    assert inner_budget("time", 40, speeds, "median") == (40, 10.0)
    assert inner_budget("time", 40, speeds, "slow") == (40, 10.0)  # fewer steps happen by the clock
    assert inner_budget("time", 40, speeds, "fast") == (80, 10.0)
    assert inner_budget("time", 40, {"a": 4.0, "b": 6.0}, "b") == (48, 8.0)


def test_measured_speeds_count_updates_of_two_steps_or_more_only() -> None:
    merged = [("a", 20, 4000), ("b", 1, 100), ("c", 10, 0), ("d", 2, 500)]
    assert measured_speeds(merged) == {"a": 5.0, "d": 4.0}


def test_phases_are_their_wire_names() -> None:
    # /status and heartbeats carry the plain names; a StrEnum member compares and encodes as one.
    assert [p.value for p in Phase][:3] == ["starting", "syncing", "loading"]
    assert Phase.CATCHING_UP == "catching_up"
    assert json.dumps({"phase": Phase.WAITING.value}) == '{"phase": "waiting"}'
    assert len({p.value for p in Phase}) == len(Phase)
