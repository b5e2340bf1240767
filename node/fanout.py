"""How many providers a fetch draws from at once: one, or all of them, whichever delivers more.

Pure: the fetch feeds it the bytes it receives and the clock, and it reads the receiver's
counters (``ReceiverLoad``) as a window opens and closes; nothing here waits or sleeps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Width = Literal["narrow", "wide"]
NARROW: Width = "narrow"
WIDE: Width = "wide"


def _other(width: Width) -> Width:
    return WIDE if width == NARROW else NARROW


@dataclass(frozen=True)
class FanOutSettings:
    window_s: float = 0.15  # a window lasts at least this long ...
    window_chunks: int = 4  # ... and takes at least this many chunks
    retry_s: float = 10.0  # after a choice, compare again this much later ...
    retry_max_s: float = 60.0  # ... doubling up to this while the choice stays the same
    wide_margin: float = 0.10  # wide is kept only if it delivers more than this fraction above narrow
    # A width that delivers this many times the other in the window after it wins at once: no
    # drift within a fetch (a path warming up) comes near that, and the third window costs the
    # losing width's pace for as long again.
    decisive: float = 2.0
    # A narrow window in which the fetcher's process wanted at least this many cores: the receiver
    # is the limit. Wide could then deliver at most 1 / this as much, within the margin.
    saturated: float = 1 / (1 + 0.10)
    # ... and the bytes it read in that window had been waiting for it: at least this fraction
    # came from reads that filled the whole read-ahead buffer (``TcpReadFill``). Measured here:
    # 0.55 to 1.0 from one seed on loopback, 0.0 from seeds behind 100 Mbit/s links.
    backlogged: float = 0.5


@dataclass
class _Window:
    """Bytes received since a window opened; it opens on the first chunk after a switch settled."""

    opened: float | None = None
    last: float = 0.0
    bytes: int = 0
    chunks: int = 0
    load_opened: ReceiverLoad | None = None  # the receiver's counters when the window opened

    def add(self, now: float, size: int, load: Callable[[], ReceiverLoad] | None) -> None:
        if self.opened is None:
            self.opened = self.last = now  # this chunk marks the start; its bytes came before it
            self.load_opened = load() if load is not None else None
            return
        self.last = now
        self.bytes += size
        self.chunks += 1

    def rate(self) -> float:
        if self.opened is None:
            return 0.0
        elapsed = self.last - self.opened
        return self.bytes / elapsed if elapsed > 0 else 0.0

    def load(self, load: Callable[[], ReceiverLoad] | None) -> tuple[float, float] | None:
        """Over the window: how many cores the fetcher's process wanted, and the fraction of the
        bytes it read that were already waiting for it; None: not measured."""
        opened = self.load_opened
        if self.opened is None or load is None or opened is None or self.last <= self.opened:
            return None
        now = load()
        read = now.read_bytes - opened.read_bytes
        waiting = (now.waiting_bytes - opened.waiting_bytes) / read if read > 0 else 0.0
        return (now.demand_s - opened.demand_s) / (self.last - self.opened), waiting


@dataclass(frozen=True)
class Verdict:
    """A comparison's answer, which a later fetch from the same providers keeps until ``until``
    (the time to compare again) instead of measuring afresh; ``retry_s`` set ``until``."""

    width: Width
    until: float
    retry_s: float


@dataclass
class FanOut:
    """The width a fetch draws with, chosen by measuring both (``adaptive``) or fixed.

    Spreading a fetch over every provider pays where each provider's path is the limit (a link,
    a busy seed): three seeds on 100 Mbit/s links deliver three times what one does. It costs
    where the fetcher itself is the limit, or the providers share its machine: every extra stream
    then only adds work per byte, and the fetch slows down. The fetch tells the two apart as it goes:

    - It starts on one provider (narrow). Extra providers must first show that they pay.
    - If one provider already fills the fetcher, it stays narrow and tries nothing else. Filled
      means two things over a window: the fetcher's process wanted a core nearly all of it (ran on
      one, or waited in the run queue for one), and most of the bytes its TCP reads took had been
      waiting for them (``ReceiverLoad``). A Python process runs Python in one thread at a time, so more
      providers could deliver at most the little time left (1.1 times, the margin below), and on a
      machine whose cores are full they would only take cores from it. A rate measured while the
      receiver is the limit says nothing of the paths (TCP's BBR calls such a sample
      "app-limited"). Three seeds sharing the fetcher's two cores are the case in point: one seed
      keeps the fetcher's process wanting 1.5 to 2.6 cores, with its reads finding data waiting.
    - Otherwise it measures: one window with each width, then the first width again, and compares
      the second window with the mean of the two around it (a fetch speeds up or slows down as it
      goes, and the first and last windows cancel that drift out). A width twice as fast as the
      other in the first two windows wins at once: no drift comes near that, and over links that
      limit each provider wide delivers two to three times one.
    - Wide must deliver clearly more to be kept: every extra stream costs the providers CPU per
      byte (three seeds serving a third each spent 1.3 to 1.7 times the CPU per byte of one serving
      it all, BENCHMARKS.md), and a gain within the windows' noise is not worth that.

    It checks again later, less often while the answer stays the same; a later fetch from the same
    providers keeps the answer until then (``Verdict``).

    ``verdict``: an earlier fetch's answer, still standing: the fetch draws with its width and
    compares only once it is due, as one long fetch would. ``load``: the receiver's counters
    (``ReceiverLoad``), read as a window opens and closes; None: the receiver's load is not
    measured, and every choice is a comparison."""

    start: Width = NARROW
    adaptive: bool = True
    settings: FanOutSettings = field(default_factory=FanOutSettings)
    verdict: Verdict | None = None
    load: Callable[[], ReceiverLoad] | None = None
    width: Width = field(init=False)
    chosen: Width | None = field(init=False, default=None)  # the last comparison's winner
    rates: dict[str, float] = field(init=False, default_factory=dict)  # bytes/s, last window of each
    cores: dict[str, float] = field(init=False, default_factory=dict)  # cores wanted, last window of each
    waiting: dict[str, float] = field(init=False, default_factory=dict)  # bytes found waiting, same
    comparisons: int = field(init=False, default=0)
    receiver_bound: int = field(init=False, default=0)  # choices of narrow made because the receiver was full
    _phase: Literal["first", "trial", "again", "hold"] = field(init=False, default="first")
    _first_rate: float = field(init=False, default=0.0)
    _window: _Window = field(init=False, default_factory=_Window)
    _skip: int | None = field(init=False, default=None)  # None: not yet known (the fetch's start)
    _hold_until: float = field(init=False, default=0.0)
    _retry_s: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self.width = self.start
        self._retry_s = self.settings.retry_s
        if self.adaptive and self.verdict is not None:
            self.width = self.chosen = self.verdict.width
            self._phase = "hold"
            self._hold_until = self.verdict.until
            self._retry_s = self.verdict.retry_s

    def standing(self) -> Verdict | None:
        """The answer a later fetch may keep: the last comparison's (or the one carried in)."""
        if not self.adaptive or self.chosen is None:
            return None
        if self._phase != "hold":
            # Comparing again: until it ends, the last answer stands, due for a check at once.
            return Verdict(self.chosen, 0.0, self._retry_s)
        return Verdict(self.chosen, self._hold_until, self._retry_s)

    def received(self, now: float, size: int, in_flight: int) -> bool:
        """Count a chunk of ``size`` bytes received at ``now``; ``in_flight`` bytes were asked for
        and not yet received. True when the width changed (the fetch then starts or stops providers)."""
        if not self.adaptive:
            return False
        if self._skip is None:
            # The first requests ramp up (streams opening, buffers warming): the first window
            # opens once they are in, so it measures the width, not the start of the fetch.
            self._skip = in_flight
        if self._phase == "hold":
            if now < self._hold_until:
                return False
            self._phase = "first"  # measure the chosen width afresh, then try the other
            self._window = _Window()
        if self._skip > 0:
            # Chunks asked for before the last switch still arrive at the old width's pace.
            self._skip -= size
            return False
        self._window.add(now, size, self.load)
        window = self._window
        if window.opened is None or now - window.opened < self.settings.window_s:
            return False
        if window.chunks < self.settings.window_chunks:
            return False
        rate = window.rate()
        load = window.load(self.load)
        if load is not None:
            self.cores[self.width], self.waiting[self.width] = load
        if self.width == NARROW and load is not None and self._receiver_bound(*load):
            # One provider already keeps the receiver busy: more could not deliver more.
            self.rates[NARROW] = rate
            self.receiver_bound += 1
            return self._settle(NARROW, now, in_flight)
        if self._phase == "first":
            self._first_rate = rate
            self._phase = "trial"
        elif self._phase == "trial":
            self.rates[self.width] = rate
            first = self._first_rate
            if rate >= self.settings.decisive * first or first >= self.settings.decisive * rate:
                self.rates[_other(self.width)] = first
                return self._choose(now, in_flight)
            self._phase = "again"
        else:
            self.rates[self.width] = (self._first_rate + rate) / 2
            return self._choose(now, in_flight)
        self._switch(_other(self.width), in_flight)
        return True

    def _receiver_bound(self, cores: float, waiting: float) -> bool:
        """Whether the receiver was the limit: its process wanted (nearly) a core or more, and the
        bytes it read had been waiting for it. Either alone is not enough. A process busy with
        something else (a trainer's torch threads) that reads what trickles in keeps up with its
        providers; a reader that finds data waiting after a pause (a collection, a slow disk
        write) is not short of CPU."""
        return cores >= self.settings.saturated and waiting >= self.settings.backlogged

    def _choose(self, now: float, in_flight: int) -> bool:
        best = WIDE if self.rates[WIDE] > self.rates[NARROW] * (1 + self.settings.wide_margin) else NARROW
        self.comparisons += 1
        return self._settle(best, now, in_flight)

    def _settle(self, best: Width, now: float, in_flight: int) -> bool:
        # The same answer again: ask less often. A new one: conditions moved, ask soon again.
        same = best == self.chosen
        self._retry_s = min(self._retry_s * 2, self.settings.retry_max_s) if same else self.settings.retry_s
        self.chosen = best
        self._phase = "hold"
        self._hold_until = now + self._retry_s
        if best == self.width:
            return False
        self._switch(best, in_flight)
        return True

    def _switch(self, width: Width, in_flight: int) -> None:
        self.width = width
        self._skip = in_flight
        self._window = _Window()

    def view(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "adaptive": self.adaptive,
            "chosen": self.chosen,
            "comparisons": self.comparisons,
            "receiver_bound": self.receiver_bound,
            "rate_bytes_per_s": {width: round(rate) for width, rate in sorted(self.rates.items())},
            "receiver_cores": {width: round(cores, 3) for width, cores in sorted(self.cores.items())},
            "receiver_waiting": {width: round(part, 3) for width, part in sorted(self.waiting.items())},
        }


@dataclass(frozen=True)
class ReceiverLoad:
    """The receiver's counters, each a total since it started: ``demand_s`` from
    ``process_demand_s``; ``read_bytes`` its TCP reads took, ``waiting_bytes`` of them by reads
    that found more waiting than they could take (``Libp2pBridge.tcp_reads``)."""

    demand_s: float
    read_bytes: int
    waiting_bytes: int


_TASKS = Path("/proc/self/task")


def process_demand_s() -> float:
    """Seconds this process has run on a core, plus the seconds its threads have waited in the
    run queue for one (Linux schedstat, summed over live threads): over a window, how many cores
    the process wanted. Elsewhere, its CPU time alone (a process starved of cores then looks
    idle, and the fetch compares instead)."""
    waiting_ns = 0
    try:
        tasks = list(_TASKS.iterdir())
    except OSError:
        tasks = []
    for task in tasks:
        try:
            waiting_ns += int((task / "schedstat").read_text().split()[1])
        except (OSError, ValueError, IndexError):
            continue  # a thread that just ended, or no schedstat in this kernel
    # Run time from the process clock, which keeps the time of threads that have ended.
    return time.process_time() + waiting_ns / 1e9
