"""The node's event bus: what happened (head adopted, round closed, peer joined…) for SSE and watchers."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

HISTORY = 256
SUBSCRIBER_QUEUE = 1024


@dataclass(frozen=True)
class NodeEvent:
    seq: int
    kind: str
    at: float
    data: dict[str, Any] = field(default_factory=dict)

    def view(self) -> dict[str, Any]:
        return {"seq": self.seq, "kind": self.kind, "at": round(self.at, 3), **self.data}


class EventBus:
    """Fan-out of node events to any number of subscribers; a slow subscriber loses events, not the node."""

    def __init__(self) -> None:
        self._seq = 0
        self._history: deque[NodeEvent] = deque(maxlen=HISTORY)
        self._subscribers: set[asyncio.Queue[NodeEvent]] = set()
        self.dropped = 0

    def emit(self, kind: str, **data: Any) -> None:
        self._seq += 1
        event = NodeEvent(self._seq, kind, time.time(), data)
        self._history.append(event)
        for queue in self._subscribers:
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                self.dropped += 1

    def recent(self, limit: int = HISTORY) -> list[NodeEvent]:
        return list(self._history)[-limit:]

    async def subscribe(self, replay: int = 0) -> AsyncIterator[NodeEvent]:
        """Events from now on (after the last ``replay`` past ones), until the caller stops iterating."""
        queue: asyncio.Queue[NodeEvent] = asyncio.Queue(SUBSCRIBER_QUEUE)
        for event in self.recent(replay) if replay else ():
            queue.put_nowait(event)
        self._subscribers.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.discard(queue)
