"""The fetch's width: one provider or all, whichever delivers more, measured on a plain clock."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from node.fanout import NARROW, WIDE, FanOut, FanOutSettings, ReceiverLoad, Verdict, process_demand_s

MIB = 1 << 20
SETTINGS = FanOutSettings(window_s=0.15, window_chunks=4, retry_s=10.0, retry_max_s=60.0, wide_margin=0.10)


class Feed:
    """Chunks of 1 MiB stored at the rate ``rates[width]`` (MiB/s), with ``in_flight`` asked for;
    with ``loads``, the receiver meanwhile wants ``loads[width]`` cores and finds that fraction
    of what it reads waiting for it ``waiting[width]`` (the fan-out's load counters)."""

    def __init__(
        self,
        fan_out: FanOut,
        rates: Callable[[str], float],
        in_flight: int = 8 * MIB,
        loads: Callable[[str], float] | None = None,
        waiting: Callable[[str], float] = lambda width: 1.0,
    ) -> None:
        self.fan_out = fan_out
        self.rates = rates
        self.in_flight = in_flight
        self.loads = loads
        self.waiting = waiting
        self.now = 0.0
        self.counters = ReceiverLoad(0.0, 0, 0)
        self.widths: list[str] = []
        if loads is not None:
            fan_out.load = lambda: self.counters

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end:
            width = self.fan_out.width
            step = 1.0 / self.rates(width)
            self.now += step
            if self.loads is not None:
                c = self.counters
                self.counters = ReceiverLoad(
                    c.demand_s + step * self.loads(width),
                    c.read_bytes + MIB,
                    c.waiting_bytes + round(MIB * self.waiting(width)),
                )
            self.fan_out.received(self.now, MIB, self.in_flight)
            self.widths.append(width)

    def time_at(self, width: str) -> float:
        return self.widths.count(width) / len(self.widths)


def test_a_cpu_bound_fetch_settles_on_one_provider() -> None:
    # Three co-located seeds: every extra stream costs the shared cores, so one delivers more.
    feed = Feed(FanOut(start=WIDE, settings=SETTINGS), {NARROW: 300.0, WIDE: 250.0}.__getitem__)
    feed.run(2.0)
    assert feed.fan_out.chosen == NARROW
    assert feed.fan_out.width == NARROW
    assert feed.fan_out.rates[NARROW] > feed.fan_out.rates[WIDE]
    assert feed.time_at(NARROW) > 0.6


def test_link_limited_providers_are_all_used() -> None:
    # Three seeds behind 100 Mbit/s uplinks: all of them deliver three times what one does.
    feed = Feed(FanOut(start=NARROW, settings=SETTINGS), {NARROW: 11.3, WIDE: 33.5}.__getitem__)
    feed.run(20.0)
    assert feed.fan_out.chosen == WIDE
    assert feed.fan_out.rates[WIDE] > 2.5 * feed.fan_out.rates[NARROW]
    assert feed.time_at(WIDE) > 0.85


def test_a_fetch_whose_receiver_is_busy_with_one_provider_never_tries_all() -> None:
    # The fetcher's process wants more than a core with one provider (its interpreter, or the
    # cores it shares with co-located seeds): more providers could not deliver more.
    for load in (0.95, 2.0):
        feed = Feed(FanOut(settings=SETTINGS), {NARROW: 160.0, WIDE: 150.0}.__getitem__, loads=lambda w: load)
        feed.run(2.0)
        assert set(feed.widths) == {NARROW}, load
        assert feed.fan_out.chosen == NARROW and feed.fan_out.receiver_bound == 1, load
        assert feed.fan_out.comparisons == 0 and WIDE not in feed.fan_out.rates, load
        assert feed.fan_out.cores[NARROW] == pytest.approx(load)
        assert feed.fan_out.waiting[NARROW] == pytest.approx(1.0)


def test_a_busy_process_that_keeps_up_with_its_providers_compares() -> None:
    # A trainer's torch threads keep its process wanting every core, but what its reads find
    # is what trickled in since the last one: the providers' links are the limit, not the reader.
    feed = Feed(FanOut(settings=SETTINGS), {NARROW: 11.3, WIDE: 33.5}.__getitem__,
                loads=lambda w: 2.0, waiting=lambda w: 0.2)
    feed.run(20.0)
    assert feed.fan_out.receiver_bound == 0 and feed.fan_out.chosen == WIDE
    # Data waiting for a reader whose process has room (a pause, a slow write) is not enough either.
    feed = Feed(FanOut(settings=SETTINGS), {NARROW: 11.3, WIDE: 33.5}.__getitem__,
                loads=lambda w: 0.3, waiting=lambda w: 1.0)
    feed.run(20.0)
    assert feed.fan_out.receiver_bound == 0 and feed.fan_out.chosen == WIDE


def test_a_receiver_with_room_compares() -> None:
    # Link-limited seeds: one provider keeps the receiver a tenth busy, so it tries them all.
    feed = Feed(FanOut(settings=SETTINGS), {NARROW: 11.3, WIDE: 33.5}.__getitem__, loads=lambda w: 0.1)
    feed.run(20.0)
    assert feed.fan_out.chosen == WIDE and feed.fan_out.receiver_bound == 0
    # A busy receiver seen while drawing on all providers proves nothing about one: only a
    # narrow window can show that one provider already fills it.
    feed = Feed(FanOut(start=WIDE, settings=SETTINGS), {NARROW: 100.0, WIDE: 150.0}.__getitem__,
                loads={NARROW: 0.6, WIDE: 1.0}.__getitem__)
    feed.run(2.0)
    assert feed.fan_out.chosen == WIDE and feed.fan_out.comparisons == 1


def test_a_decisive_trial_ends_the_comparison_at_once() -> None:
    # All providers deliver three times one: no drift explains that, so no third window.
    feed = Feed(FanOut(settings=SETTINGS), {NARROW: 11.3, WIDE: 33.5}.__getitem__)
    feed.run(3.0)
    assert feed.fan_out.chosen == WIDE and feed.fan_out.comparisons == 1
    narrow_then = feed.widths.count(NARROW)
    assert feed.widths[-1] == WIDE and NARROW not in feed.widths[narrow_then:]
    # 1.5 times is within what a warming path could show: the third window measures again.
    feed = Feed(FanOut(settings=SETTINGS), {NARROW: 100.0, WIDE: 150.0}.__getitem__)
    feed.run(1.0)
    assert feed.fan_out.chosen == WIDE
    switches = sum(1 for a, b in zip(feed.widths, feed.widths[1:]) if a != b)
    assert switches == 3  # narrow, wide, narrow again, then wide


def test_the_process_demand_clock_counts_every_thread() -> None:
    # A busy thread other than the caller's (the libp2p thread is one) counts, and so does its
    # CPU time once it has ended (a thread pool's worker may end mid-window).
    stop = time.monotonic() + 0.3
    spun = threading.Event()

    def spin() -> None:
        while time.monotonic() < stop:
            pass
        spun.set()

    before = process_demand_s()
    worker = threading.Thread(target=spin)
    worker.start()
    assert spun.wait(5)
    alive = process_demand_s()
    worker.join()
    assert alive - before >= 0.25
    assert process_demand_s() >= alive - 0.05  # the ended thread's run time stays counted


def test_a_drift_during_the_comparison_does_not_decide_it() -> None:
    # The whole fetch speeds up as it goes (buffers and caches warming), at either width: the
    # second window alone would look better, and the one after it cancels that out.
    def rates(width: str) -> float:
        return 100.0 + 200.0 * feed.now

    for start in (NARROW, WIDE):
        feed = Feed(FanOut(start=start, settings=SETTINGS), rates)
        feed.run(1.5)
        assert feed.fan_out.chosen == NARROW, start  # a tie, whichever went first


def test_a_tie_keeps_one_provider() -> None:
    # Equal rates: the other streams would only cost the providers CPU.
    for start in (NARROW, WIDE):
        feed = Feed(FanOut(start=start, settings=SETTINGS), lambda width: 100.0)
        feed.run(2.0)
        assert feed.fan_out.chosen == NARROW, start


def test_wide_is_kept_only_for_a_clear_gain() -> None:
    for gain, chosen in ((1.05, NARROW), (1.2, WIDE)):
        feed = Feed(FanOut(start=WIDE, settings=SETTINGS), {NARROW: 100.0, WIDE: 100.0 * gain}.__getitem__)
        feed.run(2.0)
        assert feed.fan_out.chosen == chosen, gain


def test_bytes_asked_for_before_a_switch_do_not_count_for_the_new_width() -> None:
    fan_out = FanOut(start=NARROW, settings=SETTINGS)
    now = 0.0
    # The fetch's first requests (8 MiB) ramp up: no window opens until they are in.
    for _ in range(9):
        now += 1.0
        assert not fan_out.received(now, MIB, in_flight=8 * MIB)
    assert not fan_out.rates
    for _ in range(40):  # the narrow window closes and the wide trial begins
        now += 0.01
        if fan_out.received(now, MIB, in_flight=32 * MIB):
            break
    assert fan_out.width == WIDE
    # The 32 MiB in flight arrive at the old pace and open no window; the wide trial then measures.
    for _ in range(32):
        now += 0.01
        assert not fan_out.received(now, MIB, in_flight=0)
    assert WIDE not in fan_out.rates
    for _ in range(300):
        now += 0.001
        if fan_out.received(now, MIB, in_flight=0):
            break
    # 1 MiB a millisecond, as the wide window saw it, not the 100 MiB/s of the bytes before it.
    assert fan_out.rates[WIDE] > 900 * MIB
    assert fan_out.chosen == WIDE  # ten times the narrow window: decided without a third


def test_it_compares_again_less_often_while_the_answer_holds_and_follows_a_change() -> None:
    rates = {NARROW: 300.0, WIDE: 250.0}
    feed = Feed(FanOut(start=NARROW, settings=SETTINGS), rates.__getitem__)
    feed.run(60.0)
    # Holds of 10, 20, 40 s: a few comparisons in a minute, not one per window.
    assert 2 <= feed.fan_out.comparisons <= 4
    assert feed.fan_out.chosen == NARROW
    # The seeds' links become the limit: the next comparison (at most 60 s away) goes wide.
    rates.update({NARROW: 10.0, WIDE: 30.0})
    feed.run(70.0)
    assert feed.fan_out.chosen == WIDE
    assert feed.fan_out.width == WIDE


def test_a_fixed_width_never_changes() -> None:
    for width in (NARROW, WIDE):
        feed = Feed(FanOut(start=width, adaptive=False, settings=SETTINGS), lambda w: 100.0 if w == width else 900.0)
        feed.run(30.0)
        assert set(feed.widths) == {width}
        assert feed.fan_out.comparisons == 0


def test_a_standing_verdict_is_kept_until_it_is_due_then_checked() -> None:
    rates = {NARROW: 300.0, WIDE: 250.0}
    first = Feed(FanOut(start=WIDE, settings=SETTINGS), rates.__getitem__)
    first.run(2.0)
    verdict = first.fan_out.standing()
    assert verdict == Verdict(NARROW, verdict.until, 10.0) and verdict.until > first.now
    # The next fetch from the same providers draws narrow from its first byte, with no windows.
    feed = Feed(FanOut(verdict=verdict, settings=SETTINGS), rates.__getitem__)
    feed.now = first.now
    feed.run(verdict.until - first.now - 0.1)
    assert set(feed.widths) == {NARROW}
    assert feed.fan_out.comparisons == 0
    assert feed.fan_out.standing() == verdict  # a third fetch would keep it too
    # Once due, it compares as one long fetch would, and follows a change.
    rates.update({NARROW: 10.0, WIDE: 30.0})
    feed.run(10.0)
    assert feed.fan_out.comparisons == 1
    assert feed.fan_out.chosen == WIDE


def test_only_a_comparison_makes_a_verdict() -> None:
    assert FanOut(start=NARROW, adaptive=False, verdict=Verdict(WIDE, 1e9, 10.0)).standing() is None
    assert FanOut(start=WIDE).standing() is None  # nothing compared yet
    # Mid-comparison, the last answer stands, due for a check at once.
    feed = Feed(FanOut(start=WIDE, settings=SETTINGS), {NARROW: 300.0, WIDE: 250.0}.__getitem__)
    feed.run(2.0)
    held = feed.fan_out.standing()
    assert held is not None and held.until > feed.now
    feed.run(held.until - feed.now + 0.05)  # past the hold, inside the first window again
    assert feed.fan_out.comparisons == 1
    assert feed.fan_out.standing() == Verdict(NARROW, 0.0, 10.0)
