"""SIGTERM stops a daemon within 5 s, whatever it is doing: a stuck training step, a full disk."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.swarm_harness import ONE_THREAD, TINY_TRAINING, Peer, Swarm, mount_tmpfs, wait_until

STOP_BOUND_S = 5.0


@pytest.fixture
def swarm(tmp_path: Path) -> Iterator[Swarm]:
    swarm = Swarm(tmp_path)
    yield swarm
    swarm.stop_all()


def _stop_within_bound(peer: Peer) -> int:
    """SIGTERM ``peer``; its exit status, once it is gone, which must be within STOP_BOUND_S."""
    started = time.monotonic()
    code = peer.terminate(timeout=30)
    elapsed = time.monotonic() - started
    assert elapsed < STOP_BOUND_S, f"stopped after {elapsed:.1f} s\n{peer.log()[-4000:]}"
    return code


def test_a_training_step_that_does_not_stop_does_not_hold_the_process(swarm: Swarm, tmp_path: Path) -> None:
    marker = tmp_path / "training"
    peer = swarm.add(
        '[workload]\nname = "tests.stuck_training_workload:make"\n\n'
        f"[workload.options]\nmarker = {json.dumps(str(marker))}\nseconds = 60\n\n"
        "[training]\ninner_steps = 10\n"
    )
    peer.start(extra_env=ONE_THREAD)
    wait_until(marker.exists, 90, interval=0.1, what="the daemon to start a training step")
    assert _stop_within_bound(peer) == 0
    log = peer.log()
    stopping = next(json.loads(line) for line in log.splitlines() if "node_stopping" in line)
    assert stopping == {**stopping, "reason": "signal"} and "during" not in stopping, stopping
    assert "shutdown_forced" in log, log[-4000:]


def _fill(directory: Path) -> None:
    with contextlib.suppress(OSError), open(directory / "filler", "wb") as filler:
        while filler.write(b"\0" * 65536):
            pass


def test_a_daemon_on_a_full_disk_stops_within_the_bound(swarm: Swarm) -> None:
    peer = swarm.add(TINY_TRAINING)
    if (reason := mount_tmpfs(peer.data_dir, 64)) is not None:
        pytest.skip(f"cannot mount a tmpfs (needs root): {reason}")
    try:
        # A fresh key on the tmpfs: the mount hid the one Swarm.add wrote.
        peer.start(extra_env=ONE_THREAD)
        peer.wait_healthy(90)
        wait_until(lambda: ((peer.get("/status") or {}).get("training") or {}).get("head_round", 0) >= 1, 90,
                   what="a first merged round")
        _fill(peer.data_dir)
        wait_until(lambda: "No space left on device" in peer.log(), 30, what="the daemon to hit the full disk")
        assert _stop_within_bound(peer) == 0
    finally:
        swarm.stop_all()
        subprocess.run(["umount", str(peer.data_dir)], capture_output=True)
