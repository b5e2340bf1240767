"""``p2p-node swarm`` stops its peers on SIGTERM and SIGHUP as it does on Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.swarm_harness import ONE_THREAD, REPO, free_port, wait_until

PEERS = 2


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_stops_every_peer(tmp_path: Path, signum: signal.Signals) -> None:
    base_port, status_port = free_port(), free_port()
    launcher = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "swarm", "--peers", str(PEERS), "--workload", "tiny",
         "--dir", str(tmp_path / "swarm"), "--base-port", str(base_port), "--status-port", str(status_port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO,
        env={**os.environ, **ONE_THREAD, "PYTHONUNBUFFERED": "1"},
    )
    peers: list[int] = []
    try:
        wait_until(lambda: len(psutil.Process(launcher.pid).children()) == PEERS, 30, what="peer processes")
        peers = [child.pid for child in psutil.Process(launcher.pid).children()]
        wait_until(lambda: all(_answers(status_port + i) for i in range(PEERS)), 120, what="peers answering")

        launcher.send_signal(signum)
        stopped = time.monotonic()
        code = launcher.wait(timeout=30)
        wait_until(lambda: all(_gone(pid) for pid in peers), 15, what="every peer gone")
        assert time.monotonic() - stopped < 15
        output = launcher.stdout.read().decode(errors="replace") if launcher.stdout else ""
        assert code == 0, output
        assert "stopping the swarm" in output
    finally:
        for pid in [*peers, launcher.pid]:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            launcher.wait(timeout=10)
