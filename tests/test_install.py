"""What the default install path resolves torch to: the CPU build, never a CUDA build with its nvidia-* wheels."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.swarm_harness import REPO


def test_the_default_install_path_resolves_torch_to_its_cpu_build() -> None:
    # pip's own resolution, as the README's command makes it, without installing anything. No
    # retries: where PyTorch's index cannot be reached (a closed network with the wheel on disk),
    # each lookup there fails at once instead of after five tries.
    env = {**os.environ, "PIP_RETRIES": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps", "--quiet",
         "--report", "-", "-c", str(REPO / "constraints-cpu.txt"), "torch"],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    resolved = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in report["install"]}
    assert resolved.get("torch", "").endswith("+cpu"), resolved
    assert not [name for name in resolved if name.startswith("nvidia")], resolved


def test_the_constraints_pin_the_cpu_build_and_name_its_index() -> None:
    # On a machine whose local wheel is the CPU build, a bare `torch==2.13.0` resolves to it as
    # well; elsewhere it takes PyPI's CUDA build. Only the local version and the index make sure.
    lines = [line.strip() for line in (REPO / "constraints-cpu.txt").read_text().splitlines()]
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in lines
    pins = [line for line in lines if line.startswith("torch==")]
    assert len(pins) == 1 and pins[0].endswith("+cpu"), pins
