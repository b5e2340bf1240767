"""``node.libp2p.patches.apply``: it patches only the py-libp2p release it is written for,
unless the operator says otherwise; and the libp2p layer stands on its own."""

from __future__ import annotations

import importlib.metadata
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from node.libp2p import UnsupportedLibp2p, patches

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def newer_libp2p(monkeypatch: pytest.MonkeyPatch) -> str:
    """The installed py-libp2p reads as a release the patches are not written for."""
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.9.0" if name == "libp2p" else real(name))
    monkeypatch.delenv(patches.UNCHECKED_ENV, raising=False)
    monkeypatch.setattr(patches, "_unchecked_warned", False)
    return "0.9.0"


def test_the_installed_release_is_the_one_the_patches_are_written_for() -> None:
    assert patches.installed_libp2p_version() == patches.SUPPORTED_LIBP2P_VERSION
    patches.apply()


def test_another_release_is_refused_with_both_versions_named(newer_libp2p: str) -> None:
    with pytest.raises(UnsupportedLibp2p) as refused:
        patches.apply()
    message = str(refused.value)
    assert newer_libp2p in message and patches.SUPPORTED_LIBP2P_VERSION in message, message
    assert f"{patches.UNCHECKED_ENV}=1" in message, message


def test_the_override_applies_the_patches_to_another_release_with_one_warning(
    newer_libp2p: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(patches.UNCHECKED_ENV, "1")
    caplog.set_level(logging.WARNING, logger="p2p_node.libp2p")
    patches.apply()
    patches.apply()
    warnings = [r.getMessage() for r in caplog.records if newer_libp2p in r.getMessage()]
    assert len(warnings) == 1 and patches.SUPPORTED_LIBP2P_VERSION in warnings[0], warnings


def test_the_libp2p_layer_imports_without_the_daemon() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import node.libp2p, sys; assert 'node.daemon' not in sys.modules"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
