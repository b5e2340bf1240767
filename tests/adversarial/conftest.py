"""One adversarial swarm (three honest daemons, one hostile) and its clean reference phase.

Shared by this package and stopped after its last test: left running, its load slows every later test.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.adversary import AdversarialSwarm, PhaseResult, assert_exactly_once, assert_survived


@pytest.fixture(scope="package")
def adversarial_swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdversarialSwarm]:
    swarm = AdversarialSwarm(tmp_path_factory.mktemp("adversarial"))
    try:
        swarm.start()
        yield swarm
    finally:
        swarm.close()


@pytest.fixture(scope="package")
def clean(adversarial_swarm: AdversarialSwarm) -> PhaseResult:
    """The first phase, with the fourth peer training honestly: the reference every mode compares with."""
    with adversarial_swarm.phase("clean") as run:
        pass
    assert run.result is not None
    assert_survived(run.result, run)
    assert_exactly_once(run.result)
    return run.result
