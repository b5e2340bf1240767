"""A hostile daemon floods valid signed records (future leases, evals of unknown heads, updates for rounds ahead).

It runs after the other modes (module order): the flood's aftermath must not be blamed on them.
"""

from __future__ import annotations

import pytest

from tests.adversarial.test_hostile_peers import assert_honest_outcome, run_mode
from tests.adversary import AdversarialSwarm, PhaseResult

pytestmark = pytest.mark.slow

# What the honest peers may grow by beyond the clean phase's growth.
FLOOD_RSS_BYTES = 64 << 20
FLOOD_STORE_BYTES = 4 << 20
FLOOD_MIN_RECORDS = 600  # five rounds at 300 a second: a short phase still sends this many


def test_record_flood_keeps_memory_and_store_bounded(adversarial_swarm: AdversarialSwarm, clean: PhaseResult) -> None:
    result, run = run_mode(adversarial_swarm, "record_flood")
    sent = max((row["sent"] for row in result.reported("flood")), default=0)
    print(f"flooded {sent} records; RSS growth {result.rss_growth}, store growth {result.store_growth}; "
          f"clean phase: {clean.rss_growth}, {clean.store_growth}")
    assert sent >= FLOOD_MIN_RECORDS, f"the hostile peer sent only {sent} records"
    assert_honest_outcome(result, run, clean)
    for peer in result.rss_growth:
        assert result.rss_growth[peer] <= max(clean.rss_growth.get(peer, 0), 0) + FLOOD_RSS_BYTES, (
            f"{peer}: RSS grew {result.rss_growth[peer] >> 20} MiB under the flood")
        assert result.store_growth[peer] <= max(clean.store_growth.get(peer, 0), 0) + FLOOD_STORE_BYTES, (
            f"{peer}: the store grew {result.store_growth[peer] >> 20} MiB under the flood")
