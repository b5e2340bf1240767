"""The fetches in flight, kept on disk so a restarted peer resumes them."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from node.store import fsync_dir
from protocol.cid import is_content_id


class FetchJournal:
    """A small JSON list of manifest ids, rewritten atomically on every change."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()  # fetches start and finish from several worker threads
        self._ids: list[str] = self._load()

    def _load(self) -> list[str]:
        try:
            value = json.loads(self._path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError):
            return []  # a torn or foreign file only costs us the resume of those fetches
        return [v for v in value if is_content_id(v)] if isinstance(value, list) else []

    def pending(self) -> list[str]:
        return list(self._ids)

    def add(self, manifest_id: str) -> None:
        with self._lock:
            if manifest_id not in self._ids:
                self._ids.append(manifest_id)
                self._write()

    def remove(self, manifest_id: str) -> None:
        with self._lock:
            if manifest_id in self._ids:
                self._ids.remove(manifest_id)
                self._write()

    def _write(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        temp = self._path.with_name(f".{self._path.name}.tmp")
        with open(temp, "w") as handle:
            json.dump(self._ids, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, self._path)
        fsync_dir(self._path.parent)
