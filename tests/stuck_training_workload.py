"""A workload whose training step hangs, for tests that stop a daemon in the middle of a round.

``make`` builds the tiny workload, except that a trainer's ``train`` (one given ``should_stop``;
the start-up probe gives none) writes ``marker`` and then sleeps ``seconds`` without asking
``should_stop``: a step stuck on a slow or full disk.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from workloads.base import config_from_options
from workloads.tiny import Tiny, TinyConfig


class StuckTiny(Tiny):
    def __init__(self, config: TinyConfig, marker: str, seconds: float) -> None:
        super().__init__(config)
        self.marker = Path(marker)
        self.seconds = seconds

    def train(self, *args: Any, **kwargs: Any) -> Any:
        if "should_stop" in kwargs:
            self.marker.write_text("training")
            time.sleep(self.seconds)
        return super().train(*args, **kwargs)


def make(marker: str, seconds: float = 120.0, **options: Any) -> StuckTiny:
    return StuckTiny(config_from_options(TinyConfig, options), marker, seconds)
