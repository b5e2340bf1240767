"""Plumbing between the asyncio loop and the host's trio thread: a task running in trio whose
outcome settles an asyncio future, and hand-offs that never raise once either side is gone."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar

import trio

T = TypeVar("T")


class TrioCalls(Protocol):
    """How code on the asyncio side runs functions in the trio thread (``Libp2pBridge``)."""

    def spawn(self, afn: Callable[..., Awaitable[T]], *args: Any, timeout: float) -> TrioTask[T]: ...

    def run_soon(self, fn: Callable[..., Any], *args: Any) -> None: ...

    async def call(self, afn: Callable[..., Awaitable[T]], *args: Any, timeout: float) -> T: ...


class TrioTask(Generic[T]):
    """A function running in the trio thread: ``future`` settles with its outcome."""

    def __init__(self, future: asyncio.Future[T], token: trio.lowlevel.TrioToken) -> None:
        self.future = future
        self.scope: trio.CancelScope | None = None
        self.cancelled = False
        self._token = token
        future.add_done_callback(mark_retrieved)

    def cancel(self) -> None:
        """Cancel it (from asyncio); the future is cancelled unless it settled first."""
        if self.future.done() or self.cancelled:
            return
        self.cancelled = True

        def cancel_in_trio() -> None:
            if self.scope is not None:
                self.scope.cancel()

        run_sync_soon_quietly(self._token, cancel_in_trio)


def mark_retrieved(future: asyncio.Future[Any]) -> None:
    """A done-callback: whoever awaits ``future`` still gets its error, and when nobody does (a
    reader left early, a fetch that stopped at another error) asyncio logs no "never retrieved"."""
    if not future.cancelled():
        future.exception()


def call_soon_quietly(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    """(trio thread) Call ``fn(*args)`` on the asyncio loop, unless the loop is closed."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the asyncio loop is closed: nobody is waiting any more
        pass


def run_sync_soon_quietly(token: trio.lowlevel.TrioToken, fn: Callable[[], None]) -> None:
    """(asyncio side) Call ``fn()`` in the trio thread, unless its run has finished."""
    try:
        token.run_sync_soon(fn)
    except trio.RunFinishedError:
        pass
