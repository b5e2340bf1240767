"""Length-prefixed frames on a libp2p stream, driven from asyncio: ``FramedStream`` to read and
write them, ``FrameWriter`` to queue them to one trio task."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import struct
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Generic, TypeVar

import trio

from node.libp2p.errors import BridgeError, FrameTooLarge, StreamClosed
from node.libp2p.trio_thread import TrioCalls, TrioTask

T = TypeVar("T")
_FRAME_HEADER = struct.Struct(">I")

StreamHandler = Callable[["FramedStream"], Awaitable[None]]


class FramedStream:
    """A libp2p stream carrying length-prefixed frames, driven from asyncio."""

    def __init__(self, trio_calls: TrioCalls, stream: Any, peer_id: str) -> None:
        self._trio = trio_calls
        self._stream = stream
        self.peer_id = peer_id

    async def write_frame(self, payload: bytes, timeout: float) -> None:
        await self._trio.call(self._stream.write, _framed(payload), timeout=timeout)

    async def read_frame(self, max_size: int, timeout: float) -> bytes:
        return await self._trio.call(_read_frame, self._stream, max_size, timeout=timeout)

    async def read_frames(self, count: int, max_size: int, timeout: float) -> AsyncGenerator[bytes, None]:
        """The next ``count`` frames, read by one task on the trio side as fast as they arrive.

        One hop into trio for the whole run instead of one per frame: the stream keeps
        reading (and crediting the sender's flow-control window) while asyncio handles the
        frames already read. ``timeout`` bounds the whole run. Leaving the loop early cancels
        the reader; what it had read and not yet yielded is dropped.
        """
        loop = asyncio.get_running_loop()
        frames: asyncio.Queue[bytes] = asyncio.Queue()
        stream = self._stream

        inbox = _Inbox(loop, frames.put_nowait)

        async def pump() -> None:
            for _ in range(count):
                inbox.put(await _read_frame(stream, max_size))

        task = self._trio.spawn(pump, timeout=timeout)
        try:
            for _ in range(count):
                # Frames are delivered before the task settles (one thread, FIFO callbacks), so
                # an empty queue after it settled means it failed or timed out.
                if frames.empty():
                    waiting = asyncio.ensure_future(frames.get())
                    try:
                        await asyncio.wait((waiting, task.future), return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        waiting.cancel()
                    if not waiting.cancelled() and waiting.done():
                        yield waiting.result()
                        continue
                    if frames.empty():
                        task.future.result()  # raises what ended the reader
                        raise StreamClosed("reader ended early")
                yield frames.get_nowait()
        finally:
            task.cancel()

    def writer(self, max_pending_bytes: int) -> FrameWriter:
        """A queue of outgoing frames drained by one trio task (see ``FrameWriter``)."""
        return FrameWriter(self._trio, self._stream, max_pending_bytes)

    async def close(self) -> None:
        """Close our end; never raises. A close the peer does not let finish in time (a frozen
        or vanished peer) is given up: the stream goes with its connection."""
        with contextlib.suppress(TimeoutError, BridgeError):
            await self._trio.call(close_quietly, self._stream, timeout=5.0)

    async def reset(self) -> None:
        """Reset the stream; never raises (see ``close``)."""
        with contextlib.suppress(TimeoutError, BridgeError):
            await self._trio.call(_reset_quietly, self._stream, timeout=5.0)



class _Inbox(Generic[T]):
    """Items passed from the trio thread to ``deliver`` on the asyncio loop, in order.

    Each wake-up of the loop (``call_soon_threadsafe``) is a syscall, and a GIL hand-off in a
    busy process; at most one is pending at a time, and items that arrive meanwhile ride on it.
    Delivered before any callback the trio thread schedules after ``put``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, deliver: Callable[[T], None]) -> None:
        self._loop = loop
        self._deliver = deliver
        self._items: collections.deque[T] = collections.deque()
        self._scheduled = False

    def put(self, item: T) -> None:
        """(trio thread) Queue ``item``; wake the loop unless a wake-up is already pending."""
        self._items.append(item)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        # Cleared before draining: an item queued after this line gets a wake-up of its own.
        self._scheduled = False
        while self._items:
            self._deliver(self._items.popleft())



class FrameWriter:
    """Frames written in order by one trio task, so the stream never waits on asyncio.

    ``send`` queues a frame and returns at once while less than ``max_pending_bytes`` are
    queued or being written, else it waits for room; ``drain`` waits until all is written.
    A failed write fails every later call with the same error.
    """

    def __init__(self, trio_calls: TrioCalls, stream: Any, max_pending_bytes: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._max_pending = max_pending_bytes
        self._pending = 0
        self._room = asyncio.Event()
        self._room.set()
        self._error: BaseException | None = None
        self._trio = trio_calls
        self._stream = stream
        self._put: Callable[[bytes | bytearray], None] | None = None
        self._task: TrioTask[None] | None = None

    def _start(self) -> None:
        send, receive = trio.open_memory_channel(math.inf)
        stream, written = self._stream, _Inbox(self._loop, self._written)

        def put(data: bytes | bytearray) -> None:
            try:
                send.send_nowait(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the writer task has ended; its outcome reports why (``_ended``)

        self._put = put

        async def drain_queue() -> None:
            async with receive:
                async for data in receive:
                    await stream.write(data)
                    written.put(len(data))

        self._task = self._trio.spawn(drain_queue, timeout=math.inf)
        self._task.future.add_done_callback(self._ended)

    def _written(self, size: int) -> None:
        self._pending -= size
        if self._pending < self._max_pending:
            self._room.set()

    def _ended(self, future: asyncio.Future[None]) -> None:
        if future.cancelled():
            self._error = self._error or StreamClosed("writer cancelled")
        elif future.exception() is not None:
            self._error = future.exception()
        self._room.set()

    async def send(self, payload: bytes, timeout: float) -> None:
        await self.send_framed(_framed(payload), timeout)

    async def send_framed(self, frame: bytes | bytearray, timeout: float) -> None:
        """Queue a frame that already carries its length prefix (``frame_prefix``).

        The writer owns ``frame`` from here on: a large payload read straight into its frame
        goes to the wire without being copied once more."""
        if self._task is None:
            self._start()
        await self._wait_while(lambda: self._pending >= self._max_pending, timeout)
        self._pending += len(frame)
        assert self._put is not None  # set by _start
        self._trio.run_soon(self._put, frame)

    async def drain(self, timeout: float) -> None:
        """Wait until every queued frame is written; raise the write's error if one failed."""
        if self._task is not None:
            await self._wait_while(lambda: self._pending > 0, timeout)

    async def _wait_while(self, busy: Callable[[], bool], timeout: float) -> None:
        """Wait (at most ``timeout``) while ``busy()`` and no write failed; raise a failed write's error."""
        async with asyncio.timeout(timeout):
            while busy() and self._error is None:
                self._room.clear()
                await self._room.wait()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Stop the writer task (frames still queued are dropped)."""
        if self._task is not None:
            self._task.cancel()


def frame_prefix(payload_size: int) -> bytes:
    """The length prefix of a frame carrying ``payload_size`` bytes."""
    return _FRAME_HEADER.pack(payload_size)


def _framed(payload: bytes) -> bytes:
    """``payload`` behind its length prefix: one frame on the wire."""
    return frame_prefix(len(payload)) + payload


async def _read_exactly(stream: Any, size: int) -> bytes:
    parts: list[bytes] = []
    remaining = size
    while remaining:
        try:
            part = await stream.read(remaining)
        except Exception as exc:  # StreamEOF, StreamReset, connection errors: all mean "gone"
            raise StreamClosed(f"stream ended: {type(exc).__name__}") from None
        if not part:
            raise StreamClosed("stream ended")
        parts.append(part)
        remaining -= len(part)
    return b"".join(parts)


async def _read_frame(stream: Any, max_size: int) -> bytes:
    (size,) = _FRAME_HEADER.unpack(await _read_exactly(stream, _FRAME_HEADER.size))
    if size > max_size:
        raise FrameTooLarge(f"frame of {size} bytes > limit {max_size}")
    return await _read_exactly(stream, size) if size else b""


async def close_quietly(stream: Any) -> None:
    """(trio thread) Close ``stream``, dropping the error of one already reset or gone."""
    try:
        await stream.close()
    except Exception:  # closing an already-reset stream is not an error worth surfacing
        pass


async def _reset_quietly(stream: Any) -> None:
    try:
        await stream.reset()
    except Exception:
        pass
