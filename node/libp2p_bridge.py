"""The only module that imports trio or libp2p: a libp2p host in its own trio thread.

The asyncio side awaits ``Libp2pBridge`` methods; each one runs a small trio
function in the host's nursery and settles an asyncio future with the result.
Gossip is pumped from trio subscriptions into bounded asyncio queues, and
inbound streams are handed to asyncio handlers as ``FramedStream`` objects.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import contextvars
import enum
import logging
import math
import os
import struct
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import multiaddr
import trio

from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.io.trio import TrioTCPStream
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub import gossipsub as gossipsub_module
from libp2p.pubsub import pubsub as pubsub_module
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.secure_session import SecureSession
from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH as NOISE_MAX_PLAINTEXT
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.exceptions import MuxedStreamError
from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream
from libp2p.stream_muxer.yamux import yamux as yamux_module
from libp2p.tools.anyio_service import background_trio_service

from node.libp2p_guards import attach_fault_counter, guard_inbound_streams, warn_if_libp2p_unpinned

T = TypeVar("T")
log = logging.getLogger("p2p_node.libp2p")

# py-libp2p's yamux reads PY_YAMUX_* tuning from the environment whenever it credits a stream's
# flow-control window. Its default sends a WINDOW_UPDATE after every read; with RELEASE_ON_READ
# off it batches the credit until half the window is consumed, as go-yamux does. Same protocol on
# the wire, far fewer frames to encrypt and parse (BENCHMARKS.md, chunk exchange). A value the
# operator set in the environment wins.
YAMUX_TUNING = {"PY_YAMUX_RELEASE_ON_READ": "0"}

# The largest DATA frame this process sends, its 12-byte header included. py-libp2p (like
# go-yamux) sends at most 64 KiB per frame, and most of a stream's CPU cost is per frame, on both
# ends (header parsing, a wake-up of the reader, credit accounting). Up to 256 KiB, the initial
# window, a frame still never exceeds what the receiver has granted, so the protocol is unchanged
# and any yamux peer takes it (the spec bounds a frame by the window, nothing else). Measured: a
# fifth to a third less CPU per byte on each end (BENCHMARKS.md, chunk exchange); larger frames
# were slower again. Noise then carries a frame in messages of at most NOISE_MAX_PLAINTEXT bytes
# (65535 less the 16-byte tag): a frame of exactly four of them, just under 256 KiB, fills each
# message, where 256 KiB took a fifth message of 68 bytes (its own length read, decryption and
# tag) for every frame.
YAMUX_MAX_FRAME_BYTES = 4 * NOISE_MAX_PLAINTEXT


def apply_yamux_tuning() -> None:
    """Set ``YAMUX_TUNING`` in this process's environment where the operator has not, and
    raise py-libp2p's yamux send frame size to ``YAMUX_MAX_FRAME_BYTES``."""
    for name, value in YAMUX_TUNING.items():
        os.environ.setdefault(name, value)
    yamux_module.MAX_MESSAGE_SIZE = YAMUX_MAX_FRAME_BYTES


# py-libp2p's yamux writer, finding a stream's send window spent, sleeps 10 ms and looks again,
# however soon the receiver's credit arrives. With 256 KiB frames (the whole initial window) a
# frame can spend the window, and a sender then idled for up to 10 ms per frame; across the
# internet, where credit takes a round trip, every window-bound stream lost that much per round.
# ``wake_writers_on_credit`` makes the three attributes a waiting writer looks at (the send
# window, and whether the stream is closed, or closed for sending) properties that wake it when
# they change its answer: credit arrives, or the stream closes. py-libp2p's 5 s limit on
# waiting for credit stays. The writer also hands each frame to the connection without
# ``Yamux._write_frame``'s per-frame debug formatting, which runs even with debug logging off.
CREDIT_WAIT_LIMIT_S = 5.0


def _waking(name: str, wakes: Callable[[Any, Any], bool]) -> property:
    """A YamuxStream attribute whose change from ``old`` to ``new`` wakes the stream's writer
    waiting for credit when ``wakes(old, new)``."""
    key = f"_{name}"

    def get(self: YamuxStream) -> Any:
        fields = self.__dict__
        # A stream made before the property was installed keeps a plain attribute.
        return fields[key] if key in fields else fields[name]

    def set_(self: YamuxStream, value: Any) -> None:
        fields = self.__dict__
        old = fields[key] if key in fields else fields.get(name, value)
        fields[key] = value
        if wakes(old, value) and (credit := fields.pop("_credit", None)) is not None:
            credit.set()

    return property(get, set_)


async def _write_on_credit(self: YamuxStream, data: bytes) -> None:
    total, sent = len(data), 0
    view = memoryview(data).cast("B")
    deadline: float | None = None
    while sent < total:
        frame = b""
        async with self.rw_lock.write_lock():
            if self.send_closed:
                raise MuxedStreamError("Stream is closed for sending")
            # Under the window lock, which py-libp2p's credit handler holds while it adds credit:
            # credit landing after this check finds the event and sets it.
            async with self.window_lock:
                if self.closed:
                    raise MuxedStreamError("Stream is closed")
                if self.send_window > 0:
                    size = min(self.send_window, yamux_module.MAX_MESSAGE_SIZE - yamux_module.HEADER_SIZE, total - sent)
                    header = struct.pack(
                        yamux_module.YAMUX_HEADER_FORMAT, 0, yamux_module.TYPE_DATA, 0, self.stream_id, size
                    )
                    frame = b"".join((header, view[sent : sent + size]))
                    self.send_window -= size
                else:
                    credit = self.__dict__["_credit"] = trio.Event()
        if frame:
            deadline = None
            async with self.conn._write_lock:
                await self.conn.secured_conn.write(frame)
            await trio.lowlevel.checkpoint()
            sent += size
            continue
        self._zero_window_waits += 1
        now = trio.current_time()
        deadline = deadline or now + CREDIT_WAIT_LIMIT_S
        with trio.move_on_at(deadline):
            await credit.wait()
        if not credit.is_set() and trio.current_time() >= deadline:
            raise MuxedStreamError(f"Timed out waiting for window update after {CREDIT_WAIT_LIMIT_S:.0f} seconds.")


def wake_writers_on_credit() -> None:
    """Wake a yamux writer waiting for credit as soon as it can go on (see above)."""
    YamuxStream.send_window = _waking("send_window", lambda old, new: new > old)  # type: ignore[assignment]
    YamuxStream.closed = _waking("closed", lambda old, new: bool(new) and not old)  # type: ignore[assignment]
    YamuxStream.send_closed = _waking("send_closed", lambda old, new: bool(new) and not old)  # type: ignore[assignment]
    YamuxStream.write = _write_on_credit  # type: ignore[method-assign]


# A frame on a secured connection is encrypted (spending a nonce) and then written. Cancelled
# in between, or half way through the socket write, the connection is left out of step with
# its peer: the next frame fails to decrypt there and every stream on it dies. py-libp2p lets
# that happen whenever a stream operation is cancelled while it writes, and a read writes too
# (its window update). ``guard_frame_writes`` makes each frame write finish regardless of the
# caller's cancellation, the cancellation landing after it; a frame (at most 256 KiB) that
# cannot be written within FRAME_WRITE_LIMIT_S means a dead connection, which is closed.
FRAME_WRITE_LIMIT_S = 30.0
_unguarded_write = SecureSession.write


async def _guarded_write(self: SecureSession, data: bytes) -> None:
    with trio.CancelScope(shield=True) as writing:
        writing.deadline = trio.current_time() + FRAME_WRITE_LIMIT_S
        await _unguarded_write(self, data)
    if writing.cancelled_caught:
        log.warning("a frame write took over %.0f s; closing the connection", FRAME_WRITE_LIMIT_S)
        with trio.CancelScope(shield=True) as closing:
            closing.deadline = trio.current_time() + 5.0
            try:
                await self.close()
            except Exception as exc:  # noqa: BLE001 - it is being dropped either way
                log.debug("closing a stalled connection failed: %r", exc)
        raise ConnectionClosedError(f"frame write stalled for {FRAME_WRITE_LIMIT_S:.0f} s")


def guard_frame_writes() -> None:
    """Make every secured-connection frame write in this process run to completion (see above)."""
    SecureSession.write = _guarded_write  # type: ignore[method-assign]


# py-libp2p reads a TCP connection with one ``recv`` per read call, and noise reads each
# message in two calls (its 2-byte length, then its body): two syscalls or more per 64 KiB,
# each a GIL release and re-acquire, which in a daemon's busy process means waiting behind its
# other threads. ``buffer_tcp_reads`` makes each ``recv`` take up to TCP_READ_AHEAD_BYTES and
# serves the following reads from what it got. Reads still return at most what was asked.
TCP_READ_AHEAD_BYTES = 256 * 1024


@dataclass
class TcpReadFill:
    """What this process's TCP reads found waiting for them, since it started: ``bytes`` read,
    and ``waiting_bytes`` of them by a ``recv`` that filled the whole read-ahead buffer, so that
    more data was already there than it could take. A reader that keeps up with its peers finds
    a little each time; one that is the limit finds a full buffer every time (a fetch reads this
    to tell whether more providers could deliver more, ``node/fanout.py``)."""

    bytes: int = 0
    waiting_bytes: int = 0


TCP_READS = TcpReadFill()


async def _buffered_read(self: TrioTCPStream, n: int | None = None) -> bytes:
    async with self.read_lock:
        if n == 0:
            return b""
        ahead: bytes = getattr(self, "_read_ahead", b"")
        start: int = getattr(self, "_read_start", 0)
        if start >= len(ahead):
            wanted = max(n or 0, TCP_READ_AHEAD_BYTES)
            try:
                ahead = await self.stream.receive_some(wanted)
            except trio.BrokenResourceError as exc:
                raise ConnectionClosedError(f"TCP connection reset by remote peer: {exc}", transport="tcp") from exc
            except trio.ClosedResourceError:
                return b""  # closed locally: end of stream, as py-libp2p reports it
            TCP_READS.bytes += len(ahead)
            if len(ahead) >= wanted:
                TCP_READS.waiting_bytes += len(ahead)
            start = 0
        end = len(ahead) if n is None else min(len(ahead), start + n)
        if start == 0 and end == len(ahead):
            self._read_ahead, self._read_start = b"", 0  # type: ignore[attr-defined]
            return ahead
        self._read_ahead, self._read_start = ahead, end  # type: ignore[attr-defined]
        return ahead[start:end]


def buffer_tcp_reads() -> None:
    """Serve py-libp2p's TCP reads from a read-ahead buffer (see above)."""
    TrioTCPStream.read = _buffered_read  # type: ignore[method-assign]


# py-libp2p attaches its signed peer record to every pubsub RPC it sends, rebuilding it each
# time (listen addresses compared, the envelope serialised), and verifies and stores the one on
# every RPC it receives (an ed25519 check). In an idle 8-peer swarm caching both took a daemon
# from 6.6% to 4.1-4.8% of a core (BENCHMARKS.md, idle daemon). ``cache_peer_records`` reuses the outgoing record for
# SENT_RECORD_REUSE_S, and skips the check of a record byte-identical to the one this peer last
# sent that passed it, for at most SEEN_RECORD_REUSE_S (py-libp2p keeps a record for two hours).
SENT_RECORD_REUSE_S = 5.0
SEEN_RECORD_REUSE_S = 600.0
# py-libp2p's pubsub module imports both without re-exporting them (no ``__all__``).
_record_to_send = pubsub_module.env_to_send_in_RPC  # type: ignore[attr-defined]
_consume_record = pubsub_module.maybe_consume_signed_record  # type: ignore[attr-defined]


def _cached_record_to_send(host: Any) -> tuple[bytes, bool]:
    now = time.monotonic()
    cached: tuple[float, bytes] | None = getattr(host, "_p2p_node_sent_record", None)
    if cached is not None and cached[0] > now:
        return cached[1], False
    envelope, fresh = _record_to_send(host)
    host._p2p_node_sent_record = (now + SENT_RECORD_REUSE_S, envelope)
    return envelope, fresh


def _cached_consume_record(message: Any, host: Any, peer_id: Any) -> bool:
    if not message.HasField("senderRecord"):
        return True
    now = time.monotonic()
    seen: dict[Any, tuple[bytes, float]] = host.__dict__.setdefault("_p2p_node_seen_records", {})
    record = message.senderRecord
    last = seen.get(peer_id)
    if last is not None and last[0] == record and last[1] > now:
        return True
    accepted = bool(_consume_record(message, host, peer_id))
    if accepted:
        seen[peer_id] = (record, now + SEEN_RECORD_REUSE_S)
    return accepted


def cache_peer_records() -> None:
    """Reuse and skip re-checking pubsub's signed peer records (see above)."""
    for module in (pubsub_module, gossipsub_module):
        module.env_to_send_in_RPC = _cached_record_to_send  # type: ignore[attr-defined]
        module.maybe_consume_signed_record = _cached_consume_record  # type: ignore[attr-defined]


# py-libp2p's gossipsub sends an IDONTWANT to every mesh peer for every message it forwards,
# whatever its size. IDONTWANT exists to spare peers a second copy of a large message; the
# gossipsub v1.2 spec leaves the size to implementations, and go-libp2p sends it only for
# messages of 1 KiB or more. Most of the daemon's records are a few hundred bytes, and for
# them every message cost each mesh peer an extra RPC to read and parse. ``skip_small_idontwant``
# applies go-libp2p's threshold. IDONTWANTs received are handled as before.
IDONTWANT_MIN_BYTES = 1024
_gossip_publish = GossipSub.publish
_emit_idontwant = GossipSub._emit_idontwant_for_message
_forwarding_size: contextvars.ContextVar[int] = contextvars.ContextVar("p2p_node_forwarding_size", default=IDONTWANT_MIN_BYTES)


async def _publish_noting_size(self: GossipSub, msg_forwarder: Any, pubsub_msg: Any) -> None:
    token = _forwarding_size.set(pubsub_msg.ByteSize())
    try:
        await _gossip_publish(self, msg_forwarder, pubsub_msg)
    finally:
        _forwarding_size.reset(token)


async def _emit_idontwant_if_large(self: GossipSub, msg_id: bytes, topic_ids: Any) -> None:
    if _forwarding_size.get() >= IDONTWANT_MIN_BYTES:
        await _emit_idontwant(self, msg_id, topic_ids)


def skip_small_idontwant() -> None:
    """Send IDONTWANT only for gossip messages of IDONTWANT_MIN_BYTES or more (see above)."""
    GossipSub.publish = _publish_noting_size  # type: ignore[method-assign]
    GossipSub._emit_idontwant_for_message = _emit_idontwant_if_large  # type: ignore[method-assign]


def tune_transport() -> None:
    """Everything this module changes in py-libp2p, for this process: yamux credit batching
    and frame size, writers woken by credit, whole frame writes, TCP read-ahead, cached pubsub
    peer records, IDONTWANT only for large messages, and inbound streams whose failure ends
    only themselves (``node/libp2p_guards.py``). Idempotent; warns when the installed
    py-libp2p is not the release all this is written for."""
    warn_if_libp2p_unpinned()
    apply_yamux_tuning()
    wake_writers_on_credit()
    guard_frame_writes()
    buffer_tcp_reads()
    cache_peer_records()
    skip_small_idontwant()
    guard_inbound_streams()


GOSSIP_PROTOCOLS = [TProtocol("/meshsub/1.2.0"), TProtocol("/meshsub/1.1.0")]
_FRAME_HEADER = struct.Struct(">I")


class BridgeError(RuntimeError):
    """A libp2p operation failed; ``str()`` says which and why."""


class StreamClosed(BridgeError):
    """The remote end closed or reset the stream before a whole frame arrived."""


class ListenFailed(BridgeError):
    """The host could not listen on a configured address."""


def _listen_failure(error: BaseException | None) -> ListenFailed | None:
    """The ListenFailed that ended a trio run, however deep in exception groups it lies."""
    if isinstance(error, ListenFailed):
        return error
    if isinstance(error, BaseExceptionGroup):
        return next((found for inner in error.exceptions if (found := _listen_failure(inner))), None)
    return None


class FrameTooLarge(BridgeError):
    """The peer announced a frame above the reader's limit."""


@dataclass(frozen=True)
class GossipSettings:
    degree: int = 6
    degree_low: int = 4
    degree_high: int = 12
    heartbeat_interval_s: float = 1.0
    max_message_bytes: int = 64 * 1024
    inbound_queue: int = 4096
    rate_limit_per_s: float = 0.0  # messages per second relayed from one publisher; 0: no limit


MAX_RATED_PUBLISHERS = 10_000  # publishers whose token buckets are kept; the least recently heard go first


class Verdict(enum.Enum):
    """What the relay check says of one gossip message."""

    ALLOWED = "allowed"
    HELD_BACK = "held_back"
    FLOODING = "flooding"


class PublisherRate:
    """Token buckets per publishing peer, checked before gossipsub relays a message.

    Checked where the message enters, so a peer publishing faster than ``per_s`` (bursts of
    twice that) does not have its excess relayed by anyone: a flood stays at its source
    instead of filling every peer's gossip queues, where honest records would be dropped.
    """

    def __init__(self, per_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._per_s = per_s
        self._clock = clock
        # publisher -> (tokens, excess, last refill); excess drains at ``per_s`` and grows by
        # each message held back, so it measures how far above its rate a publisher keeps going.
        self._buckets: collections.OrderedDict[Hashable, tuple[float, float, float]] = collections.OrderedDict()
        self.dropped = 0

    def allow(self, publisher: Hashable) -> bool:
        return self.check(publisher) is Verdict.ALLOWED

    def check(self, publisher: Hashable) -> Verdict:
        """ALLOWED, HELD_BACK (over the rate), or FLOODING: held back while sustaining several
        times the rate for seconds, which no honest peer does (it sends a few a second)."""
        now = self._clock()
        capacity = 2 * self._per_s
        tokens, excess, last = self._buckets.pop(publisher, (capacity, 0.0, now))
        elapsed = now - last
        tokens = min(capacity, tokens + elapsed * self._per_s)
        excess = max(0.0, excess - elapsed * self._per_s)
        allowed = tokens >= 1
        if allowed:
            tokens -= 1
        else:
            excess += 1
            self.dropped += 1
        self._buckets[publisher] = (tokens, excess, now)
        while len(self._buckets) > MAX_RATED_PUBLISHERS:
            self._buckets.popitem(last=False)
        if allowed:
            return Verdict.ALLOWED
        return Verdict.FLOODING if excess > FLOOD_FACTOR * capacity else Verdict.HELD_BACK


FLOOD_FACTOR = 5  # a publisher held back for this many bursts' worth beyond its rate is banned for a while
FLOOD_BAN_S = 60.0  # how long a flooding publisher's gossip is refused and its pubsub link closed


@dataclass(frozen=True)
class GossipMessage:
    topic: str
    data: bytes
    source: str


@dataclass
class BridgeStats:
    """``stream_faults``: inbound streams and gossip messages from remote peers that made
    py-libp2p raise, dropped instead of stopping the host, by "<protocol family>:<error type>"
    (``pubsub:DecodeError``, ``pubsub-message:ValueError``, ``identify-push:...``)."""

    gossip_dropped_full_queue: int = 0
    gossip_rate_limited: int = 0
    gossip_publishers_banned: int = 0
    handler_errors: int = 0
    dials_failed: int = 0
    callback_errors: int = 0
    extra: dict[str, int] = field(default_factory=dict)
    stream_faults: collections.Counter[str] = field(default_factory=collections.Counter)


StreamHandler = Callable[["FramedStream"], Awaitable[None]]


class FramedStream:
    """A libp2p stream carrying length-prefixed frames, driven from asyncio."""

    def __init__(self, bridge: Libp2pBridge, stream: Any, peer_id: str) -> None:
        self._bridge = bridge
        self._stream = stream
        self.peer_id = peer_id

    async def write_frame(self, payload: bytes, timeout: float) -> None:
        await self._bridge.call(self._stream.write, _framed(payload), timeout=timeout)

    async def read_frame(self, max_size: int, timeout: float) -> bytes:
        return await self._bridge.call(_read_frame, self._stream, max_size, timeout=timeout)

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

        task = self._bridge.spawn(pump, timeout=timeout)
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
        return FrameWriter(self._bridge, self._stream, max_pending_bytes)

    async def close(self) -> None:
        """Close our end; never raises. A close the peer does not let finish in time (a frozen
        or vanished peer) is given up: the stream goes with its connection."""
        with contextlib.suppress(TimeoutError, BridgeError):
            await self._bridge.call(_close_quietly, self._stream, timeout=5.0)

    async def reset(self) -> None:
        """Reset the stream; never raises (see ``close``)."""
        with contextlib.suppress(TimeoutError, BridgeError):
            await self._bridge.call(_reset_quietly, self._stream, timeout=5.0)


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

    def __init__(self, bridge: Libp2pBridge, stream: Any, max_pending_bytes: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._max_pending = max_pending_bytes
        self._pending = 0
        self._room = asyncio.Event()
        self._room.set()
        self._error: BaseException | None = None
        self._bridge = bridge
        self._stream = stream
        self._put: Callable[[bytes | bytearray], None] | None = None
        self._task: _TrioTask[None] | None = None

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

        self._task = self._bridge.spawn(drain_queue, timeout=math.inf)
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
        self._bridge.run_soon(self._put, frame)

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


async def _close_quietly(stream: Any) -> None:
    try:
        await stream.close()
    except Exception:  # closing an already-reset stream is not an error worth surfacing
        pass


async def _reset_quietly(stream: Any) -> None:
    try:
        await stream.reset()
    except Exception:
        pass


class Libp2pBridge:
    """A libp2p host (noise + yamux, gossipsub, optional Kademlia and mDNS) in a trio thread."""

    def __init__(
        self,
        key_seed: bytes,
        listen: list[str],
        *,
        announce: list[str] | None = None,
        gossip: GossipSettings = GossipSettings(),
        kademlia: bool = True,
        mdns: bool = False,
    ) -> None:
        self._key_pair = create_new_key_pair(key_seed)
        self.peer_id = ID.from_pubkey(self._key_pair.public_key).to_base58()
        self._listen = [multiaddr.Multiaddr(a) for a in listen]
        self._announce = [multiaddr.Multiaddr(a) for a in (announce or [])]
        self._gossip_settings = gossip
        self._kademlia = kademlia
        self._mdns = mdns
        self.stats = BridgeStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._host: Any = None
        self._pubsub: Pubsub | None = None
        self._dht: KadDHT | None = None
        self._stop_event: trio.Event | None = None
        self._handlers: dict[str, StreamHandler] = {}
        self.done: asyncio.Future[None] | None = None

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self, timeout: float = 30.0) -> None:
        """Start the trio thread and wait until the host listens; raise BridgeError if it cannot."""
        tune_transport()
        self._loop = asyncio.get_running_loop()
        self.done = self._loop.create_future()
        # The daemon watches ``done``; after a shutdown nobody does, and an error the trio run
        # raised while stopping must not surface as "Future exception was never retrieved".
        self.done.add_done_callback(_retrieve)
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._thread_main, args=(ready,), name="libp2p-trio", daemon=True
        )
        self._thread.start()
        try:
            await asyncio.wait_for(asyncio.shield(ready), timeout)
        except TimeoutError:
            raise BridgeError(f"libp2p host did not start within {timeout:.0f} s") from None

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop the host and wait for the trio thread to finish its cleanup."""
        if self._thread is None:
            return
        token, stop_event = self._token, self._stop_event
        if token is not None and stop_event is not None:
            try:
                token.run_sync_soon(stop_event.set)
            except trio.RunFinishedError:
                pass
        thread = self._thread
        await asyncio.to_thread(thread.join, timeout)
        if thread.is_alive():
            log.warning("libp2p thread did not stop within %.1f s", timeout)
        self._thread = None

    def _thread_main(self, ready: asyncio.Future[None]) -> None:
        assert self._loop is not None and self.done is not None
        loop, done = self._loop, self.done
        error: BaseException | None = None
        try:
            trio.run(self._trio_main, ready)
        except BaseException as exc:  # anything that ends the run is reported, never swallowed
            error = exc

        def settle() -> None:
            if not ready.done():
                if (refused := _listen_failure(error)) is not None:
                    ready.set_exception(ListenFailed(str(refused)))
                else:
                    ready.set_exception(BridgeError(f"libp2p host failed to start: {error!r}"))
            if not done.done():
                if error is None:
                    done.set_result(None)
                else:
                    done.set_exception(BridgeError(f"libp2p trio run ended: {error!r}"))

        if not loop.is_closed():
            loop.call_soon_threadsafe(settle)

    async def _trio_main(self, ready: asyncio.Future[None]) -> None:
        settings = self._gossip_settings
        host = new_host(
            key_pair=self._key_pair,
            sec_opt={
                TProtocol(NOISE_PROTOCOL_ID): NoiseTransport(
                    self._key_pair, noise_privkey=create_new_x25519_key_pair().private_key
                )
            },
            muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
            listen_addrs=self._listen,
            announce_addrs=self._announce or None,
            enable_mDNS=self._mdns,
        )
        attach_fault_counter(host, self.stats.stream_faults)
        gossipsub = GossipSub(
            protocols=GOSSIP_PROTOCOLS,
            degree=settings.degree,
            degree_low=settings.degree_low,
            degree_high=settings.degree_high,
            heartbeat_interval=settings.heartbeat_interval_s,  # type: ignore[arg-type]
            heartbeat_initial_delay=0.1,
            # The library's spam guard also throttles our own publishes (LIBP2P_NOTES.md);
            # the daemon rate-limits by record validation and per-peer counters instead.
            spam_protection_enabled=False,
        )
        pubsub = Pubsub(host, gossipsub, strict_signing=True, max_inbound_rpc_size=settings.max_message_bytes * 4)
        self._host, self._pubsub = host, pubsub
        self._stop_event = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        async with host.run(listen_addrs=self._listen), trio.open_nursery() as nursery:
            # py-libp2p logs an address it cannot listen on (taken, or not on this machine) and
            # goes on without it: a node nobody can dial. Not listening where told is a failed start.
            listening = host.get_network().listeners
            if missing := [str(addr) for addr in self._listen if str(addr) not in listening]:
                raise ListenFailed(
                    f"cannot listen on {', '.join(missing)} (in use by another process, or not an"
                    " address of this machine; libp2p's error above says which)"
                )
            self._nursery = nursery
            async with background_trio_service(pubsub), background_trio_service(gossipsub):
                await pubsub.wait_until_ready()
                if self._kademlia:
                    self._dht = KadDHT(host, DHTMode.SERVER)
                    async with background_trio_service(self._dht):
                        self._signal_ready(ready)
                        await self._stop_event.wait()
                else:
                    self._signal_ready(ready)
                    await self._stop_event.wait()
            nursery.cancel_scope.cancel()

    def _signal_ready(self, ready: asyncio.Future[None]) -> None:
        assert self._loop is not None

        def settle() -> None:
            if not ready.done():
                ready.set_result(None)

        self._loop.call_soon_threadsafe(settle)

    # ---- calling into trio -----------------------------------------------------------

    def spawn(self, afn: Callable[..., Awaitable[T]], *args: Any, timeout: float) -> _TrioTask[T]:
        """Start ``afn(*args)`` in the trio thread with a deadline; its result settles ``future``."""
        if self._token is None or self._nursery is None or self._loop is None:
            raise BridgeError("libp2p host is not running")
        loop, nursery = self._loop, self._nursery
        task: _TrioTask[T] = _TrioTask(loop.create_future(), self._token)
        future = task.future

        def settle(result: Any, error: BaseException | None) -> None:
            if future.done():
                return
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

        async def runner() -> None:
            name = getattr(afn, "__name__", "call")
            try:
                with trio.move_on_after(timeout) as cancel_scope:
                    task.scope = cancel_scope
                    if task.cancelled:
                        cancel_scope.cancel()
                    try:
                        result = await afn(*args)
                    except BridgeError as exc:
                        _call_soon_quietly(loop, settle, None, exc)
                        return
                    except trio.Cancelled:
                        raise
                    except Exception as exc:
                        _call_soon_quietly(loop, settle, None, BridgeError(f"{name}: {exc!r}"))
                        return
                    _call_soon_quietly(loop, settle, result, None)
                    return
                if task.cancelled:
                    _call_soon_quietly(loop, future.cancel)
                else:
                    _call_soon_quietly(loop, settle, None, TimeoutError(f"{name} timed out after {timeout} s"))
            finally:
                # Only reached unsettled when the host's shutdown cancelled the task: say so.
                # (Callbacks run in order, so an outcome queued above always wins.)
                _call_soon_quietly(loop, settle, None, BridgeError("libp2p host stopped"))

        def start() -> None:
            try:
                nursery.start_soon(runner)
            except RuntimeError:  # the nursery is closed to new tasks: the host is stopping
                _call_soon_quietly(loop, settle, None, BridgeError("libp2p host stopped"))

        self.run_soon(start)
        return task

    def run_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Call ``fn(*args)`` in the trio thread soon, after everything submitted before it.

        An exception from ``fn`` is logged and counted: trio treats one escaping a
        ``run_sync_soon`` callback as its own internal error and ends the run, host and all.
        """
        if self._token is None:
            raise BridgeError("libp2p host is not running")
        try:
            self._token.run_sync_soon(self._run_guarded, fn, args)
        except trio.RunFinishedError:
            raise BridgeError("libp2p host has stopped") from None

    def _run_guarded(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except Exception as exc:
            self.stats.callback_errors += 1
            log.error("callback %s in the libp2p thread failed: %r", getattr(fn, "__name__", fn), exc)

    async def call(self, afn: Callable[..., Awaitable[T]], *args: Any, timeout: float) -> T:
        """Run ``afn(*args)`` in the trio thread with a deadline; cancelling this cancels it."""
        task = self.spawn(afn, *args, timeout=timeout)
        try:
            return await task.future
        except asyncio.CancelledError:
            task.cancel()
            raise

    def _to_asyncio(self, coro: Awaitable[None]) -> concurrent.futures.Future[None]:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]

    # ---- host ------------------------------------------------------------------------

    def listen_addrs(self) -> list[str]:
        """Addresses other peers can dial, each ending in ``/p2p/<our id>``."""
        if self._host is None:
            return []
        addrs = self._host.get_addrs()
        return [str(a) if "/p2p/" in str(a) else f"{a}/p2p/{self.peer_id}" for a in addrs]

    def connected_peers(self) -> list[str]:
        if self._host is None:
            return []
        return sorted(p.to_base58() for p in self._host.get_connected_peers())

    async def connect(self, address: str, timeout: float) -> str:
        """Dial a ``/…/p2p/<id>`` multiaddr; return the peer id."""
        info = info_from_p2p_addr(multiaddr.Multiaddr(address))
        try:
            await self.call(self._connect, info, timeout=timeout)
        except (BridgeError, TimeoutError):
            self.stats.dials_failed += 1
            raise
        return info.peer_id.to_base58()

    async def connect_peer(self, peer_id: str, addresses: list[str], timeout: float) -> None:
        info = PeerInfo(ID.from_base58(peer_id), [multiaddr.Multiaddr(a) for a in addresses])
        try:
            await self.call(self._connect, info, timeout=timeout)
        except (BridgeError, TimeoutError):
            self.stats.dials_failed += 1
            raise

    async def _connect(self, info: PeerInfo) -> None:
        await self._host.connect(info)
        if self._dht is not None:
            await self._dht.add_peer(info.peer_id)

    async def disconnect(self, peer_id: str, timeout: float = 5.0) -> None:
        await self.call(self._host.disconnect, ID.from_base58(peer_id), timeout=timeout)

    def known_peer_addrs(self) -> dict[str, list[str]]:
        """Peers the peerstore knows addresses for (from the DHT, mDNS, identify)."""
        if self._host is None:
            return {}
        store = self._host.get_peerstore()
        found: dict[str, list[str]] = {}
        for peer in store.peers_with_addrs():
            if peer.to_base58() == self.peer_id:
                continue
            found[peer.to_base58()] = [str(a) for a in store.addrs(peer)]
        return found

    async def refresh_routing(self, timeout: float = 10.0) -> None:
        """Run one Kademlia routing-table refresh so peers known to our peers become known to us."""
        if self._dht is not None:
            await self.call(self._dht.refresh_routing_table, timeout=timeout)

    # ---- gossip ----------------------------------------------------------------------

    async def subscribe(self, topic: str) -> asyncio.Queue[GossipMessage]:
        """Subscribe to ``topic``; messages arrive on the returned bounded queue (drops counted)."""
        assert self._loop is not None
        queue: asyncio.Queue[GossipMessage] = asyncio.Queue(self._gossip_settings.inbound_queue)
        await self.call(self._subscribe, topic, queue, timeout=10.0)
        return queue

    async def _subscribe(self, topic: str, queue: asyncio.Queue[GossipMessage]) -> None:
        assert self._pubsub is not None and self._nursery is not None
        subscription = await self._pubsub.subscribe(topic)
        if self._gossip_settings.rate_limit_per_s > 0:
            rate = PublisherRate(self._gossip_settings.rate_limit_per_s)
            pubsub, nursery = self._pubsub, self._nursery
            own = pubsub.my_id.to_bytes()

            async def lift_ban(peer: ID) -> None:
                await trio.sleep(FLOOD_BAN_S)
                pubsub.remove_from_blacklist(peer)

            def within_rate(forwarder: ID, message: Any) -> bool:
                if message.from_id == own:
                    return True
                verdict = rate.check(bytes(message.from_id))
                if verdict is Verdict.ALLOWED:
                    return True
                self.stats.gossip_rate_limited += 1
                publisher = ID(message.from_id)
                if verdict is Verdict.FLOODING and not pubsub.is_peer_blacklisted(publisher):
                    # Refusing each message still costs decoding and checking it; a publisher
                    # that keeps flooding is cut off for a while, which costs nothing per message.
                    self.stats.gossip_publishers_banned += 1
                    log.warning("gossip_publisher_banned: %s for %.0f s", publisher, FLOOD_BAN_S)
                    pubsub.add_to_blacklist(publisher)
                    nursery.start_soon(lift_ban, publisher)
                return False

            self._pubsub.set_topic_validator(topic, within_rate, False)
        self._nursery.start_soon(self._pump, subscription, topic, queue)

    async def _pump(self, subscription: Any, topic: str, queue: asyncio.Queue[GossipMessage]) -> None:
        assert self._loop is not None
        loop = self._loop

        def deliver(message: GossipMessage) -> None:
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:
                self.stats.gossip_dropped_full_queue += 1

        while True:
            message = await subscription.get()
            try:
                source = ID(message.from_id).to_base58()
            except Exception:
                source = ""
            loop.call_soon_threadsafe(deliver, GossipMessage(topic, bytes(message.data), source))

    async def publish(self, topic: str, data: bytes, timeout: float = 5.0) -> None:
        if len(data) > self._gossip_settings.max_message_bytes:
            raise BridgeError(f"gossip payload of {len(data)} bytes is over the limit")
        assert self._pubsub is not None
        await self.call(self._pubsub.publish, topic, data, timeout=timeout)

    def mesh_peers(self, topic: str) -> list[str]:
        if self._pubsub is None:
            return []
        peers = self._pubsub.peer_topics.get(topic, set())
        return sorted(p.to_base58() for p in peers)

    # ---- streams ---------------------------------------------------------------------

    async def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        """Serve ``protocol``: each inbound stream runs ``handler`` on the asyncio loop."""
        self._handlers[protocol] = handler
        await self.call(self._set_handler, protocol, timeout=5.0)

    async def _set_handler(self, protocol: str) -> None:
        self._host.set_stream_handler(TProtocol(protocol), self._make_trio_handler(protocol))

    def _make_trio_handler(self, protocol: str) -> Callable[[Any], Awaitable[None]]:
        async def handle(stream: Any) -> None:
            # An exception escaping a libp2p stream handler ends the whole trio run,
            # host included (LIBP2P_NOTES.md): nothing may leave this function.
            try:
                peer = stream.muxed_conn.peer_id.to_base58()
                handler = self._handlers[protocol]
                finished = trio.Event()
                token = trio.lowlevel.current_trio_token()
                future = self._to_asyncio(handler(FramedStream(self, stream, peer)))
                future.add_done_callback(lambda _f: _run_sync_soon_quietly(token, finished.set))
                try:
                    await finished.wait()
                except trio.Cancelled:
                    future.cancel()
                    raise
                error = future.exception() if not future.cancelled() else None
                if error is not None:
                    self.stats.handler_errors += 1
                    log.warning("stream handler for %s failed: %r", protocol, error)
            except trio.Cancelled:
                raise
            except Exception as exc:
                self.stats.handler_errors += 1
                log.warning("stream handler for %s failed: %r", protocol, exc)
            finally:
                with trio.CancelScope(shield=True):
                    await _close_quietly(stream)

        return handle

    async def open_stream(self, peer_id: str, protocol: str, timeout: float) -> FramedStream:
        stream = await self.call(
            self._host.new_stream, ID.from_base58(peer_id), [TProtocol(protocol)], timeout=timeout
        )
        return FramedStream(self, stream, peer_id)


class _TrioTask(Generic[T]):
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

        _run_sync_soon_quietly(self._token, cancel_in_trio)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.debug("libp2p run ended with %r", future.exception())


def mark_retrieved(future: asyncio.Future[Any]) -> None:
    """A done-callback: whoever awaits ``future`` still gets its error, and when nobody does (a
    reader left early, a fetch that stopped at another error) asyncio logs no "never retrieved"."""
    if not future.cancelled():
        future.exception()


def _call_soon_quietly(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the asyncio loop is closed: nobody is waiting any more
        pass


def _run_sync_soon_quietly(token: trio.lowlevel.TrioToken, fn: Callable[[], None]) -> None:
    try:
        token.run_sync_soon(fn)
    except trio.RunFinishedError:
        pass
