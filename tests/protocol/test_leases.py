"""Leases: the claim body, the conflict rule and its admission limits, strikes, the lease book and shard choice."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import canonical
from protocol.cid import content_id
from protocol.errors import Invalid
from protocol.identity import SigningKey
from protocol.leases import (
    MAX_EXCLUDED_ROUNDS,
    MAX_LEASE_MICROSHARDS,
    STRIKES_TO_EXCLUDE,
    Admission,
    LeaseBook,
    LeaseClaim,
    Standing,
    budget_for,
    choose_claims,
    claim_cap,
    exclusion_rounds,
    home_peer,
    lease_id_for,
    rendezvous_weight,
    resolve,
)

PEERS = [SigningKey(bytes([i + 1]) * 32).peer_id for i in range(8)]
SHARDS = [content_id(b"shard-%d" % i) for i in range(40)]
NOW = 1_000_000

peers = st.sampled_from(PEERS)
shard_sets = st.sets(st.sampled_from(SHARDS), min_size=1, max_size=12)


@st.composite
def claims(draw: st.DrawFn) -> LeaseClaim:
    issued = draw(st.integers(NOW - 50_000, NOW))
    return LeaseClaim.create(
        draw(peers), 0, draw(st.integers(0, 3)), draw(shard_sets), issued,
        issued + draw(st.integers(1, 100_000)),
    )


def claim(
    peer: str, shards: list[str], expires: int = NOW + 60_000, issued: int = NOW, round: int = 1
) -> LeaseClaim:
    return LeaseClaim.create(peer, 0, round, shards, issued, expires)


def test_rendezvous_weight_is_a_stable_256_bit_number_per_pair() -> None:
    weight = rendezvous_weight(SHARDS[0], PEERS[0])
    assert weight == rendezvous_weight(SHARDS[0], PEERS[0])
    assert 0 <= weight < 2**256
    assert len({rendezvous_weight(SHARDS[0], p) for p in PEERS}) == len(PEERS)


@given(claims())
def test_claim_survives_the_wire(c: LeaseClaim) -> None:
    assert LeaseClaim.from_wire(canonical.decode(canonical.encode(c.to_wire()))) == c


def test_renewal_keeps_the_lease_id() -> None:
    original = claim(PEERS[0], SHARDS[:3])
    renewal = original.renewed(NOW + 120_000, SHARDS[:2])
    assert renewal.lease_id == original.lease_id == lease_id_for(PEERS[0], 0, 1, NOW)
    assert LeaseClaim.from_wire(renewal.to_wire()) == renewal


@pytest.mark.parametrize(
    "mutate",
    [
        lambda w: w.pop("peer"),
        lambda w: w.update(extra=1),
        lambda w: w.update(peer="not-a-peer"),
        lambda w: w.update(epoch=-1),
        lambda w: w.update(round=True),
        lambda w: w.update(microshards=[]),
        lambda w: w.update(microshards=list(reversed(w["microshards"]))),
        lambda w: w.update(microshards=w["microshards"][:1] * 2),
        lambda w: w.update(microshards=["b3:nothex"]),
        lambda w: w.update(microshards=[content_id(b"%d" % i) for i in range(MAX_LEASE_MICROSHARDS + 1)]),
        lambda w: w.update(expires_ms=w["issued_ms"]),
        lambda w: w.update(issued_ms=w["issued_ms"] + 1),  # the lease id no longer matches
        lambda w: w.update(lease=content_id(b"other")),
    ],
)
def test_malformed_claims_are_invalid(mutate: Callable[[dict[str, Any]], object]) -> None:
    wire = claim(PEERS[0], SHARDS[:3]).to_wire()
    mutate(wire)
    with pytest.raises(Invalid):
        LeaseClaim.from_wire(wire)


def test_not_a_map_is_invalid() -> None:
    with pytest.raises(Invalid):
        LeaseClaim.from_wire([1, 2, 3])


@settings(max_examples=60)
@given(
    st.lists(claims(), max_size=10),
    st.randoms(use_true_random=False),
    st.integers(NOW - 10_000, NOW + 60_000),
)
def test_resolve_is_independent_of_arrival_order(cs: list[LeaseClaim], rnd: random.Random, now: int) -> None:
    shuffled = list(cs)
    rnd.shuffle(shuffled)
    assert resolve(cs, now) == resolve(shuffled, now)


@settings(max_examples=60)
@given(st.lists(claims(), max_size=10), st.integers(NOW - 10_000, NOW + 60_000))
def test_resolve_gives_each_shard_to_the_heaviest_live_claim(cs: list[LeaseClaim], now: int) -> None:
    winners = resolve(cs, now)
    # Of several versions of one lease only the newest counts (latest expiry, then the smaller set).
    newest: dict[str, LeaseClaim] = {}
    for claim in (c for c in cs if c.expires_ms > now):
        held = newest.get(claim.lease_id)
        if held is None or (claim.expires_ms, -len(claim.microshards), claim.microshards) > (
            held.expires_ms, -len(held.microshards), held.microshards
        ):
            newest[claim.lease_id] = claim
    # Of a peer's leases for one round only the latest issued counts.
    latest: dict[tuple[str, int], LeaseClaim] = {}
    for claim in newest.values():
        held = latest.get((claim.peer, claim.round))
        if held is None or (claim.issued_ms, claim.lease_id) > (held.issued_ms, held.lease_id):
            latest[(claim.peer, claim.round)] = claim
    live = list(latest.values())
    assert set(winners) == {s for c in live for s in c.microshards}
    for shard, winner in winners.items():
        assert winner.expires_ms > now
        assert rendezvous_weight(shard, winner.peer) == max(
            rendezvous_weight(shard, c.peer) for c in live if shard in c.microshards
        )


def test_expired_claims_hold_nothing() -> None:
    strong = home_peer(SHARDS[0], PEERS[:2])
    weak = PEERS[1] if strong == PEERS[0] else PEERS[0]
    assert strong is not None
    expired = claim(strong, [SHARDS[0]], expires=NOW)
    live = claim(weak, [SHARDS[0]])
    assert resolve([expired, live], NOW)[SHARDS[0]] == live
    assert resolve([expired], NOW) == {}


def test_only_the_newest_version_of_a_lease_counts() -> None:
    original = claim(PEERS[0], SHARDS[:3])
    shrunk = original.renewed(NOW + 90_000, SHARDS[:1])
    assert set(resolve([shrunk, original], NOW)) == {SHARDS[0]}


def book() -> LeaseBook:
    return LeaseBook(0, SHARDS, round=1, max_lease_ms=3_600_000)


def test_book_refuses_bad_claims() -> None:
    b = book()
    cases = {
        "expired": claim(PEERS[0], SHARDS[:2], expires=NOW),
        "wrong_epoch": LeaseClaim.create(PEERS[0], 1, 1, SHARDS[:2], NOW, NOW + 1000),
        "stale_round": claim(PEERS[0], SHARDS[:2], round=0),
        "unknown_microshard": claim(PEERS[0], [content_id(b"elsewhere")]),
        "lease_too_long": claim(PEERS[0], SHARDS[:2], expires=NOW + 3_600_001),
    }
    for reason, bad in cases.items():
        with pytest.raises(Invalid) as err:
            b.observe(bad, NOW)
        assert err.value.reason == reason
    small = LeaseBook(0, SHARDS, max_microshards=2)
    with pytest.raises(Invalid, match="too_many"):
        small.observe(claim(PEERS[0], SHARDS[:3]), NOW)
    assert len(b) == 0


def test_book_takes_renewals_that_extend_or_shrink_and_refuses_growth() -> None:
    b = book()
    original = claim(PEERS[0], SHARDS[:3])
    assert b.observe(original, NOW)
    assert not b.observe(original, NOW)
    shrunk = original.renewed(NOW + 120_000, SHARDS[:2])
    assert b.observe(shrunk, NOW + 1)
    with pytest.raises(Invalid, match="stale_renewal"):
        b.observe(original.renewed(NOW + 100_000, SHARDS[:1]), NOW + 2)
    with pytest.raises(Invalid, match="renewal_grows"):
        b.observe(original.renewed(NOW + 200_000, SHARDS[:3]), NOW + 2)
    assert b.get(original.lease_id) == shrunk
    assert b.leased() == frozenset(SHARDS[:2])


def test_book_reports_losses_so_the_loser_can_yield() -> None:
    b = book()
    shard = SHARDS[5]
    winner = home_peer(shard, PEERS[:2])
    loser = PEERS[1] if winner == PEERS[0] else PEERS[0]
    assert winner is not None
    b.observe(claim(loser, [shard, SHARDS[6]]), NOW)
    assert b.losses_of(loser) == frozenset()
    b.observe(claim(winner, [shard], issued=NOW + 1), NOW + 1)
    owner = b.owner_of(shard)
    assert owner is not None and owner.peer == winner
    assert b.losses_of(loser) == {shard}
    assert SHARDS[6] in b.holdings_of(loser)
    [winning_lease] = b.leases_of(winner)
    assert b.release(winning_lease.lease_id) == winning_lease
    assert b.losses_of(loser) == frozenset()


def test_book_expires_and_advances_rounds() -> None:
    b = book()
    short = claim(PEERS[0], SHARDS[:2], expires=NOW + 10)
    long = claim(PEERS[1], SHARDS[2:4], expires=NOW + 50_000)
    later = claim(PEERS[2], SHARDS[4:6], round=2)
    for c in (short, long, later):
        b.observe(c, NOW)
    assert b.expire(NOW + 10) == (short,)
    assert b.owner_of(SHARDS[0]) is None
    assert b.advance_round(2) == (long,)
    assert b.owners() == {SHARDS[4]: later, SHARDS[5]: later}


@settings(max_examples=40)
@given(st.lists(claims(), max_size=10), st.randoms(use_true_random=False))
def test_book_agrees_with_resolve_whatever_the_order(cs: list[LeaseClaim], rnd: random.Random) -> None:
    accepted = []
    for order in (cs, rnd.sample(cs, len(cs))):
        b = LeaseBook(0, SHARDS, max_lease_ms=10**9)
        for c in order:
            try:
                b.observe(c, NOW - 60_000)
            except Invalid:
                pass
        accepted.append(b.owners())
    # Versions of one lease can be refused in one order and not the other only when
    # a "renewal" grows, which honest peers never send; the random claims here have
    # distinct lease ids unless they collide entirely, so the books agree.
    if len({c.lease_id for c in cs}) == len(cs):
        assert accepted[0] == accepted[1] == resolve(cs, NOW - 60_000)


@settings(max_examples=40)
@given(st.integers(2, 6), st.sets(st.sampled_from(SHARDS), min_size=1))
def test_peers_with_one_view_partition_the_shards_without_talking(n: int, shards: set[str]) -> None:
    live = PEERS[:n]
    own = {p: {s for s in shards if home_peer(s, live) == p} for p in live}
    exact = {p: set(choose_claims(p, shards, len(own[p]), live_peers=live)) for p in live}
    assert exact == own
    assert set().union(*exact.values()) == shards
    assert sum(len(v) for v in exact.values()) == len(shards)


@settings(max_examples=40)
@given(st.integers(2, 6), st.sets(st.sampled_from(SHARDS), min_size=1), st.data())
def test_extra_budget_never_costs_a_home_peer_its_shards(
    n: int, shards: set[str], data: st.DataObject
) -> None:
    live = PEERS[:n]
    chosen = {}
    for p in live:
        own = sum(1 for s in shards if home_peer(s, live) == p)
        budget = data.draw(st.integers(own, len(shards)))
        chosen[p] = choose_claims(p, shards, budget, live_peers=live)
    winners = resolve([claim(p, list(c)) for p, c in chosen.items() if c], NOW)
    assert set(winners) == shards
    assert all(winners[s].peer == home_peer(s, live) for s in shards)


def test_choose_claims_skips_taken_shards_and_fills_from_others() -> None:
    live = PEERS[:3]
    mine = [s for s in SHARDS if home_peer(s, live) == PEERS[0]]
    taken = {mine[0]}
    chosen = choose_claims(PEERS[0], SHARDS, len(mine) + 2, taken=taken, live_peers=live)
    assert mine[0] not in chosen
    assert set(mine[1:]) == set(chosen[: len(mine) - 1])
    assert len(chosen) == len(mine) + 2
    assert not set(chosen[len(mine) - 1 :]) & set(mine)
    assert choose_claims(PEERS[0], SHARDS, 0, live_peers=live) == ()


def test_budget_for_is_proportional_and_bounded() -> None:
    assert budget_for(1.0, 4.0, 100) == 25
    assert budget_for(3.0, 4.0, 10) == 8
    assert budget_for(0.001, 100.0, 10) == 1
    assert budget_for(5.0, 1.0, 10) == 10
    assert budget_for(0.0, 0.0, 10, minimum=2) == 2
    assert budget_for(1.0, 2.0, 0) == 0


# ---- admission: live claimants, each within its cap ------------------------------------


@st.composite
def admissions(draw: st.DrawFn) -> Admission:
    return Admission(
        frozenset(draw(st.sets(peers, min_size=1, max_size=6))), frozenset(draw(st.sets(st.sampled_from(SHARDS))))
    )


def test_claim_cap_is_twice_an_equal_share_within_the_pool() -> None:
    assert claim_cap(48, 3) == 32
    assert claim_cap(48, 2) == 48
    assert claim_cap(10, 4) == 5
    assert claim_cap(1, 8) == 1
    assert claim_cap(0, 3) == 0
    assert claim_cap(7, 0) == 7


@settings(max_examples=60)
@given(st.lists(claims(), max_size=10), admissions(), st.randoms(use_true_random=False))
def test_claims_of_peers_not_admitted_never_win(cs: list[LeaseClaim], admission: Admission, rnd: random.Random) -> None:
    winners = resolve(cs, NOW - 60_000, admission)
    assert all(winner.peer in admission.peers for winner in winners.values())
    assert set(winners) <= admission.pool
    admitted_only = [c for c in cs if c.peer in admission.peers]
    shuffled = rnd.sample(cs, len(cs))
    assert winners == resolve(admitted_only, NOW - 60_000, admission) == resolve(shuffled, NOW - 60_000, admission)


@settings(max_examples=60)
@given(st.integers(2, 6), st.sets(st.sampled_from(SHARDS), min_size=1), st.booleans(), st.data())
def test_a_flooder_claiming_everything_keeps_at_most_its_cap_and_never_an_honest_home(
    n: int, pool: set[str], flooder_live: bool, data: st.DataObject
) -> None:
    honest = PEERS[:n]
    flooder = PEERS[7]
    admitted = frozenset(honest) | ({flooder} if flooder_live else set())
    admission = Admission(admitted, frozenset(pool))
    share = budget_for(1.0, float(len(admitted)), len(pool))
    claims_ = [claim(p, list(c)) for p in honest if (c := choose_claims(p, pool, share, live_peers=admitted))]
    flood = [claim(flooder, SHARDS, issued=NOW + i) for i in range(data.draw(st.integers(1, 3)))]
    winners = resolve(data.draw(st.permutations(claims_ + flood)), NOW, admission)
    taken = {s for s, c in winners.items() if c.peer == flooder}
    assert len(taken) <= admission.cap
    # Past the cap only home shards are kept; a pool no larger than the cap is an honest-sized
    # claim, which wins by rendezvous weight over other claimants as any peer's does.
    if flooder_live and len(pool) > admission.cap:
        assert taken <= {s for s in pool if home_peer(s, admitted) == flooder}
    assert flooder_live or not taken
    for c in claims_:
        # Each honest peer keeps every shard it is home to that it claimed.
        home = {s for s in c.microshards if home_peer(s, admitted) == c.peer}
        assert home <= {s for s, w in winners.items() if w.peer == c.peer}


def test_a_claim_within_the_cap_keeps_all_a_larger_one_only_its_home_shards() -> None:
    admitted = frozenset(PEERS[:3])
    admission = Admission(admitted, frozenset(SHARDS[:30]))
    assert admission.cap == 20
    within = claim(PEERS[0], SHARDS[:20] + SHARDS[35:])
    assert admission.kept(within) == tuple(sorted(SHARDS[:20]))
    greedy = claim(PEERS[0], SHARDS)
    home = {s for s in SHARDS[:30] if home_peer(s, admitted) == PEERS[0]}
    assert 0 < len(home) <= 20 and set(admission.kept(greedy)) == home
    assert admission.kept(claim(PEERS[5], SHARDS[:2])) == ()


@settings(max_examples=40)
@given(st.lists(claims(), max_size=10), admissions(), st.randoms(use_true_random=False))
def test_book_agrees_with_resolve_under_an_admission_whatever_the_order(
    cs: list[LeaseClaim], admission: Admission, rnd: random.Random
) -> None:
    owners = []
    for order in (cs, rnd.sample(cs, len(cs))):
        b = LeaseBook(0, SHARDS, max_lease_ms=10**9)
        b.admit(admission)
        for c in order:
            try:
                b.observe(c, NOW - 60_000)
            except Invalid:
                pass
        owners.append(b.owners())
    if len({c.lease_id for c in cs}) == len(cs):
        assert owners[0] == owners[1] == resolve(cs, NOW - 60_000, admission)


def test_a_peer_holds_one_lease_per_round_its_latest() -> None:
    first = claim(PEERS[0], SHARDS[:3])
    retry = claim(PEERS[0], SHARDS[3:5], issued=NOW + 5)
    for order in ([first, retry], [retry, first]):
        b = book()
        for c in order:
            try:
                b.observe(c, NOW)
            except Invalid as exc:
                assert exc.reason == "superseded"
        assert len(b) == 1 and b.leases_of(PEERS[0]) == (retry,)
        assert b.leased() == set(SHARDS[3:5])
    assert set(resolve([first, retry], NOW)) == set(SHARDS[3:5])


def test_book_is_capped_and_makes_room_from_peers_left_out() -> None:
    b = LeaseBook(0, SHARDS, round=1, max_leases=3)
    for i, peer in enumerate(PEERS[:3]):
        b.observe(claim(peer, [SHARDS[i]]), NOW)
    with pytest.raises(Invalid, match="book_full"):
        b.observe(claim(PEERS[3], [SHARDS[3]]), NOW)
    b.admit(Admission(frozenset({PEERS[0], PEERS[3]}), frozenset(SHARDS)))
    assert b.leased() == {SHARDS[0]}
    assert b.observe(claim(PEERS[3], [SHARDS[3]]), NOW)
    assert len(b) == 2 and b.leased() == {SHARDS[0], SHARDS[3]}


# ---- strikes -------------------------------------------------------------------------


def test_strikes_in_a_row_exclude_for_doubling_bounded_rounds() -> None:
    assert [exclusion_rounds(s) for s in range(STRIKES_TO_EXCLUDE)] == [0] * STRIKES_TO_EXCLUDE
    assert [exclusion_rounds(STRIKES_TO_EXCLUDE + i) for i in range(4)] == [1, 2, 4, 8]
    assert exclusion_rounds(10_000) == MAX_EXCLUDED_ROUNDS
    standing, round = Standing(), 10
    for _ in range(STRIKES_TO_EXCLUDE - 1):
        standing = standing.struck(round)
        round += 1
        assert not standing.excluded(round)
    standing = standing.struck(round)
    assert [standing.excluded(round + i) for i in (1, 2)] == [True, False]
    standing = standing.struck(round + 2)
    assert [standing.excluded(round + 2 + i) for i in (1, 2, 3)] == [True, True, False]
    for _ in range(200):
        standing = standing.struck(round)
    assert standing.excluded(round + MAX_EXCLUDED_ROUNDS) and not standing.excluded(round + MAX_EXCLUDED_ROUNDS + 1)
