"""The fetches in flight, kept on disk so a restarted peer resumes them."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from node.store import write_atomic
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
        write_atomic(self._path, json.dumps(self._ids).encode())
