"""Shared swarms live only while consecutive test modules use them (see SHARED_SWARMS in those modules)."""

from __future__ import annotations

import pytest

from tests.swarm_harness import stop_shared_swarms


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    keep = getattr(getattr(nextitem, "module", None), "SHARED_SWARMS", ()) if nextitem is not None else ()
    stop_shared_swarms(keep)
