"""Keeps the README's generated sections (the config reference) in step with the code.

``python -m node.docs`` rewrites them; a test fails when they drift.
"""

from __future__ import annotations

import sys
from pathlib import Path

from node.config import config_reference

README = Path(__file__).resolve().parents[1] / "README.md"
START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"


def render(readme: str) -> str:
    """``readme`` with the config reference between its markers regenerated."""
    head, start, rest = readme.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        raise ValueError(f"README lacks the {START} … {END} markers")
    return f"{head}{START}\n{config_reference().strip()}\n{END}{tail}"


def main() -> int:
    text = README.read_text()
    updated = render(text)
    if updated != text:
        README.write_text(updated)
        print(f"updated {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
