"""STYLE.md asks for types on public functions and a mypy-clean ``protocol/`` (strict mode,
configured in pyproject.toml); the daemon's ``node/`` is held to the same. mypy is part of the
test extras, so this runs in CI. (``workloads/`` is not: torch's modules return ``Any``.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_protocol_and_node_packages_are_mypy_clean(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"), "protocol", "node"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
