"""An adaptive fetch over links that limit each provider keeps drawing on all of them.

Four daemons, each in its own network namespace (``bench/bench_exchange_links.py`` builds
them), the three seeds' uplinks held to 100 Mbit/s with ``tc tbf``: one seed alone delivers a
third of what the three do, and the fetch's own measurement must see that and stay wide.
Skipped only where namespaces cannot be created.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import bench_exchange_links as links
from tests.swarm_harness import netns_script

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_an_adaptive_fetch_keeps_every_provider_whose_link_is_the_limit(tmp_path: Path) -> None:
    reason = netns_script().netns_unavailable()
    if reason:
        pytest.skip(f"network namespaces unavailable: {reason}")
    view = links.fetch(tmp_path, mib=128, rate="100mbit", holders=3)
    fan_out = view["fan_out"]
    assert fan_out["adaptive"] and fan_out["comparisons"] >= 1, fan_out
    rates = fan_out["rate_bytes_per_s"]
    # One 100 Mbit/s link carries at most 11.9 MiB/s; three carry three times that. The fetch
    # starts on one seed; its wide window comes right after the switch, while the two seeds
    # added ramp up, so it reads under three times narrow: 2.1 to 2.8 in runs here, which is
    # decisive (twice narrow or more) and ends the comparison without a third window.
    assert rates["wide"] > 1.5 * rates["narrow"], fan_out
    assert fan_out["receiver_bound"] == 0 and fan_out["receiver_waiting"]["narrow"] < 0.5, fan_out
    assert fan_out["chosen"] == "wide" and fan_out["width"] == "wide", fan_out
    assert len(view["providers"]) == 3 and not view["dropped_providers"], view
    assert 128 / view["elapsed_s"] > 2 * 11.9, view  # faster than any one seed's link allows
