"""How many providers a fetch draws from at once: one, or all of them, whichever delivers more.

Spreading a fetch over every provider pays where each provider's path is the limit (a link,
a busy seed): three seeds on 100 Mbit/s links deliver three times what one does. It costs
where the fetcher's own CPU is the limit, or the providers share its machine: every extra
stream then only adds work per byte, and the fetch slows down. No static rule tells the two
apart, so the fetch measures: it draws with one width for a short window, with the other for
as long, then with the first again, and compares the second window with the mean of the two
around it (a fetch speeds up or slows down as it goes, and the first and last windows cancel
that drift out). Wide must deliver clearly more to be kept: every extra stream costs the
providers CPU per byte (three seeds serving a third each spent 1.3 to 1.7 times the CPU per
byte of one serving it all, BENCHMARKS.md), and a gain within the windows' noise is not worth that.
Where wide pays, over links that limit each provider, it delivers several times what one does.
It compares again later, less often while the answer stays the same; a later fetch from the
same providers keeps the answer until then (``Verdict``).

Pure: the fetch feeds it the bytes it receives and the clock; nothing here waits or sleeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass
class _Window:
    """Bytes received since a window opened; it opens on the first chunk after a switch settled."""

    opened: float | None = None
    last: float = 0.0
    bytes: int = 0
    chunks: int = 0

    def add(self, now: float, size: int) -> None:
        if self.opened is None:
            self.opened = self.last = now  # this chunk marks the start; its bytes came before it
            return
        self.last = now
        self.bytes += size
        self.chunks += 1

    def rate(self) -> float:
        if self.opened is None:
            return 0.0
        elapsed = self.last - self.opened
        return self.bytes / elapsed if elapsed > 0 else 0.0


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

    ``verdict``: an earlier fetch's answer, still standing: the fetch draws with its width and
    compares only once it is due, as one long fetch would."""

    start: Width = WIDE
    adaptive: bool = True
    settings: FanOutSettings = field(default_factory=FanOutSettings)
    verdict: Verdict | None = None
    width: Width = field(init=False)
    chosen: Width | None = field(init=False, default=None)  # the last comparison's winner
    rates: dict[str, float] = field(init=False, default_factory=dict)  # bytes/s, last window of each
    comparisons: int = field(init=False, default=0)
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
        self._window.add(now, size)
        window = self._window
        if window.opened is None or now - window.opened < self.settings.window_s:
            return False
        if window.chunks < self.settings.window_chunks:
            return False
        rate = window.rate()
        if self._phase == "first":
            self._first_rate = rate
            self._phase = "trial"
        elif self._phase == "trial":
            self.rates[self.width] = rate
            self._phase = "again"
        else:
            self.rates[self.width] = (self._first_rate + rate) / 2
            return self._choose(now, in_flight)
        self._switch(_other(self.width), in_flight)
        return True

    def _choose(self, now: float, in_flight: int) -> bool:
        best = WIDE if self.rates[WIDE] > self.rates[NARROW] * (1 + self.settings.wide_margin) else NARROW
        self.comparisons += 1
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
            "rate_bytes_per_s": {width: round(rate) for width, rate in sorted(self.rates.items())},
        }
