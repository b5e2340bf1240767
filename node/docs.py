"""Keeps the docs' generated sections (the config reference in docs/configuration.md) in step with the code.

``python -m node.docs`` rewrites them; a test fails when they drift.
"""

from __future__ import annotations

import sys
from pathlib import Path

from node.config import config_reference

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"


def render(page: str) -> str:
    """``page`` with the config reference between its markers regenerated."""
    head, start, rest = page.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        raise ValueError(f"the page lacks the {START} … {END} markers")
    return f"{head}{START}\n{config_reference().strip()}\n{END}{tail}"


def main() -> int:
    text = REFERENCE.read_text()
    updated = render(text)
    if updated != text:
        REFERENCE.write_text(updated)
        print(f"updated {REFERENCE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
