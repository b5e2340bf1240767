"""A workload factory that takes its time, for tests that stop a daemon while it starts.

``make`` writes ``marker`` when it begins (so a test knows the daemon is loading its
workload), sleeps ``seconds``, then returns the built-in tiny workload.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from workloads.registry import load_workload


def make(marker: str, seconds: float = 120.0, **options: Any) -> Any:
    Path(marker).write_text("loading")
    time.sleep(seconds)
    return load_workload("tiny", options)
