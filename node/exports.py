"""The status port's weight downloads: safetensors exports kept in a small, bounded cache on disk."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import BinaryIO

# Anyone who can reach the status port may ask for any head's weights in any variant; each
# export is a file as large as the model. At most this many stay on disk, and at most this
# many bytes in all (the newest stays whatever its size), plus the one being written.
EXPORTS_KEPT = 4
EXPORTS_MAX_BYTES = 4 << 30
SUFFIX = ".safetensors"


class ExportCache:
    """Exports by name in ``directory``, least recently served first out (their mtime says when)."""

    def __init__(self, directory: Path, keep: int = EXPORTS_KEPT, max_bytes: int = EXPORTS_MAX_BYTES) -> None:
        self.directory = directory
        self.keep = keep
        self.max_bytes = max_bytes
        # One export written at a time: each costs a model's worth of CPU, memory and disk.
        self._writing = asyncio.Lock()

    async def open(self, name: str, write: Callable[[Path], Awaitable[None]]) -> tuple[BinaryIO, int]:
        """The export ``name`` opened for reading, and its size; ``write(path)`` makes it when it is
        not cached. The open file streams whole even if the export is evicted meanwhile."""
        path = self.directory / f"{name}{SUFFIX}"
        opened = await asyncio.to_thread(_open_touched, path)
        if opened is None:
            async with self._writing:
                opened = await asyncio.to_thread(_open_touched, path)
                if opened is None:
                    await asyncio.to_thread(self.directory.mkdir, parents=True, exist_ok=True)
                    await write(path)
                    opened = await asyncio.to_thread(_open_touched, path)
                    if opened is None:
                        raise FileNotFoundError(path)
                await asyncio.to_thread(self.trim, path)
        return opened

    def trim(self, keep: Path | None = None) -> list[Path]:
        """Delete the least recently served exports beyond the bounds (never ``keep``); the deleted."""
        entries = []
        for path in self.directory.glob(f"*{SUFFIX}"):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            entries.append((stat.st_mtime_ns, stat.st_size, path))
        entries.sort(reverse=True)
        kept, total, deleted = 0, 0, []
        for _, size, path in entries:
            if path == keep or (kept < self.keep and (kept == 0 or total + size <= self.max_bytes)):
                kept, total = kept + 1, total + size
                continue
            path.unlink(missing_ok=True)
            deleted.append(path)
        return deleted


def _open_touched(path: Path) -> tuple[BinaryIO, int] | None:
    try:
        file = open(path, "rb")
    except FileNotFoundError:
        return None
    os.utime(file.fileno())  # served now: the last to go
    return file, os.fstat(file.fileno()).st_size
