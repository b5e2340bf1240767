"""An honest daemon frozen with SIGSTOP for over 30 s, then continued: it lives on and rejoins the swarm."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.adversary import AdversarialSwarm, PhaseResult, assert_agreed, assert_exactly_once, assert_survived

pytestmark = [pytest.mark.slow, pytest.mark.freeze]

FROZEN_S = 32.0
SETTLE_S = 10.0
# The others make a round a second or faster meanwhile: the frozen peer recomputes every head it
# missed (fetching each one's updates) while they make more, on two cores shared by four daemons.
REJOIN_S = 150.0


def test_a_peer_frozen_for_30_s_lives_on_and_rejoins(adversarial_swarm: AdversarialSwarm, clean: PhaseResult) -> None:
    frozen = adversarial_swarm.honest[-1]
    assert frozen.process is not None
    with adversarial_swarm.phase("sigstop", hostile_mode="honest", timeout_s=REJOIN_S) as run:
        os.kill(frozen.process.pid, signal.SIGSTOP)
        try:
            time.sleep(FROZEN_S)
        finally:
            os.kill(frozen.process.pid, signal.SIGCONT)
        time.sleep(SETTLE_S)
        assert frozen.alive, f"{frozen.name} died after SIGCONT"
        assert frozen.get("/status", timeout=10) is not None, f"{frozen.name} does not answer /status after SIGCONT"
    result = run.result
    assert result is not None
    # Rejoining: the phase ends only once all three honest peers hold the same head, past the rounds.
    assert_survived(result, run)
    assert_agreed(result, run)
    assert_exactly_once(result)
