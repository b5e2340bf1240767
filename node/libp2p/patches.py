"""Every process-wide change this project makes to py-libp2p's internals, and ``apply()``.

Each patch replaces a private py-libp2p function or attribute with one written against the
source of SUPPORTED_LIBP2P_VERSION; another release may have moved, renamed or fixed them, so
``apply()`` refuses any other release unless UNCHECKED_ENV is set. docs/libp2p-patches.md says
for each patch what py-libp2p does, what changes, why, and what would make it unnecessary.
"""

from __future__ import annotations

import contextvars
import importlib.metadata
import logging
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from libp2p.host.basic_host import BasicHost
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.io.trio import TrioTCPStream
from libp2p.pubsub import gossipsub as gossipsub_module
from libp2p.pubsub import pubsub as pubsub_module
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH as NOISE_MAX_PLAINTEXT
from libp2p.security.secure_session import SecureSession
from libp2p.stream_muxer.exceptions import MuxedStreamError
from libp2p.stream_muxer.yamux import yamux as yamux_module
from libp2p.stream_muxer.yamux.yamux import YamuxStream

from node.libp2p.errors import UnsupportedLibp2p
from node.libp2p.faults import protocol_family, record_fault

log = logging.getLogger("p2p_node.libp2p")

SUPPORTED_LIBP2P_VERSION = "0.8.1"
# Set to 1, ``apply()`` patches another py-libp2p release too, with a warning: for trying a
# newer release, whose changed internals may make a patch fail or silently do nothing.
UNCHECKED_ENV = "P2P_NODE_LIBP2P_UNCHECKED"
_unchecked_warned = False


def apply() -> None:
    """Check the installed py-libp2p release, then apply every patch below to this process.

    Raises ``UnsupportedLibp2p`` naming both releases when the installed one is not
    SUPPORTED_LIBP2P_VERSION, unless UNCHECKED_ENV is 1. Idempotent: each patch wraps the
    function py-libp2p had when this module was imported.
    """
    check_libp2p_version()
    apply_yamux_tuning()
    wake_writers_on_credit()
    guard_frame_writes()
    buffer_tcp_reads()
    cache_peer_records()
    skip_small_idontwant()
    guard_inbound_streams()


def installed_libp2p_version() -> str:
    try:
        return importlib.metadata.version("libp2p")
    except importlib.metadata.PackageNotFoundError:
        import libp2p

        return str(getattr(libp2p, "__version__", "unknown"))


def check_libp2p_version() -> None:
    """Raise ``UnsupportedLibp2p`` unless py-libp2p is SUPPORTED_LIBP2P_VERSION or UNCHECKED_ENV
    is 1 (then warn, once per process)."""
    global _unchecked_warned
    installed = installed_libp2p_version()
    if installed == SUPPORTED_LIBP2P_VERSION:
        return
    if os.environ.get(UNCHECKED_ENV) != "1":
        raise UnsupportedLibp2p(
            f"py-libp2p {installed} is installed, but p2p-node's patches of its internals are"
            f" written for py-libp2p {SUPPORTED_LIBP2P_VERSION}: install libp2p=={SUPPORTED_LIBP2P_VERSION},"
            f" or set {UNCHECKED_ENV}=1 to try {installed} anyway"
        )
    if not _unchecked_warned:
        _unchecked_warned = True
        log.warning(
            "py-libp2p %s is installed and %s=1: patches written for py-libp2p %s applied unchecked;"
            " they may fail, or silently not take effect",
            installed,
            UNCHECKED_ENV,
            SUPPORTED_LIBP2P_VERSION,
        )


# ---- yamux: credit batching and frame size ------------------------------------------------

# A value the operator set in the environment wins.
YAMUX_TUNING = {"PY_YAMUX_RELEASE_ON_READ": "0"}
# Four full noise messages (65535 bytes less the 16-byte tag each): a frame of exactly 256 KiB
# would need a fifth, short message, with its own length read, decryption and tag.
YAMUX_MAX_FRAME_BYTES = 4 * NOISE_MAX_PLAINTEXT


def apply_yamux_tuning() -> None:
    """Batch yamux credit and send frames of up to YAMUX_MAX_FRAME_BYTES.

    py-libp2p's yamux reads PY_YAMUX_* tuning from the environment whenever it credits a
    stream's window; by default it sends a WINDOW_UPDATE after every read. With
    RELEASE_ON_READ off it batches the credit until half the window is consumed, as go-yamux
    does: the same protocol, far fewer frames to encrypt and parse. py-libp2p sends at most
    64 KiB per DATA frame, and most of a stream's CPU cost is per frame on both ends (header
    parsing, a wake-up of the reader, credit accounting). A frame up to the initial window
    still never exceeds what the receiver granted, the only bound the yamux spec sets, so any
    yamux peer takes it (BENCHMARKS.md, chunk exchange).
    """
    for name, value in YAMUX_TUNING.items():
        os.environ.setdefault(name, value)
    yamux_module.MAX_MESSAGE_SIZE = YAMUX_MAX_FRAME_BYTES


# ---- yamux: writers woken by credit --------------------------------------------------------

CREDIT_WAIT_LIMIT_S = 5.0  # py-libp2p's own limit on waiting for credit


def wake_writers_on_credit() -> None:
    """Wake a yamux writer waiting for credit as soon as it can go on.

    py-libp2p's yamux writer, finding a stream's send window spent, sleeps 10 ms and looks
    again, however soon the receiver's credit arrives. A frame as large as the window spends
    it, so a window-bound sender idles for up to 10 ms per frame, and across the internet,
    where credit takes a round trip, every window-bound stream loses that much per round
    trip. The three attributes a waiting writer looks at (the send window, and whether the
    stream is closed, or closed for sending) become properties that wake it when they change
    its answer: credit arrives, or the stream closes. The writer also hands each frame to the
    connection without ``Yamux._write_frame``'s per-frame debug formatting, which runs even
    with debug logging off.
    """
    YamuxStream.send_window = _waking("send_window", lambda old, new: new > old)  # type: ignore[assignment]
    YamuxStream.closed = _waking("closed", lambda old, new: bool(new) and not old)  # type: ignore[assignment]
    YamuxStream.send_closed = _waking("send_closed", lambda old, new: bool(new) and not old)  # type: ignore[assignment]
    YamuxStream.write = _write_on_credit  # type: ignore[method-assign]


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


# ---- secured connections: whole frame writes -----------------------------------------------

FRAME_WRITE_LIMIT_S = 30.0
_unguarded_write = SecureSession.write


def guard_frame_writes() -> None:
    """Make every secured-connection frame write in this process run to completion.

    ``SecureSession.write`` encrypts a frame (spending a nonce of the connection's send
    cipher) and then writes the ciphertext. Cancelled in between, or half way through the
    socket write, it leaves the connection out of step with its peer: the peer's next
    decryption fails (a skipped nonce, or a length prefix read from the middle of a frame)
    and every stream on the connection dies. py-libp2p lets that happen whenever a stream
    operation is cancelled while it writes, and a read writes too (its window update). Each
    frame write here finishes regardless of the caller's cancellation, which lands after it;
    a frame (at most 256 KiB) not written within FRAME_WRITE_LIMIT_S means a dead connection,
    which is closed.
    """
    SecureSession.write = _guarded_write  # type: ignore[method-assign]


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


# ---- TCP: read-ahead, and what the reads found waiting -------------------------------------

TCP_READ_AHEAD_BYTES = 256 * 1024


@dataclass(frozen=True)
class TcpReadFill:
    """What this process's TCP reads found waiting for them, since it started: ``bytes`` read,
    and ``waiting_bytes`` of them by a ``recv`` that filled the whole read-ahead buffer, so that
    more data was already there than it could take. A reader that keeps up with its peers finds
    a little each time; one that is the limit finds a full buffer every time (a fetch reads this
    to tell whether more providers could deliver more, ``node/fanout.py``)."""

    bytes: int = 0
    waiting_bytes: int = 0


class _TcpReadCounts:
    """The running totals behind ``tcp_read_fill``: one per process, as the patched reads are."""

    bytes = 0
    waiting_bytes = 0


_tcp_reads = _TcpReadCounts()


def tcp_read_fill() -> TcpReadFill:
    """The totals of this process's TCP reads so far (``Libp2pBridge.tcp_reads`` for callers)."""
    return TcpReadFill(_tcp_reads.bytes, _tcp_reads.waiting_bytes)


def buffer_tcp_reads() -> None:
    """Serve py-libp2p's TCP reads from a read-ahead buffer of TCP_READ_AHEAD_BYTES.

    py-libp2p reads a TCP connection with one ``recv`` per read call, and noise reads each
    message in two calls (its 2-byte length, then its body): two syscalls or more per 64 KiB,
    each a GIL release and re-acquire, which in a busy process means waiting behind its
    other threads. Each ``recv`` here takes up to TCP_READ_AHEAD_BYTES and the following
    reads are served from what it got; a read still returns at most what was asked. The
    reads also count what they found waiting (``TcpReadFill``).
    """
    TrioTCPStream.read = _buffered_read  # type: ignore[method-assign]


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
            _tcp_reads.bytes += len(ahead)
            if len(ahead) >= wanted:
                _tcp_reads.waiting_bytes += len(ahead)
            start = 0
        end = len(ahead) if n is None else min(len(ahead), start + n)
        if start == 0 and end == len(ahead):
            self._read_ahead, self._read_start = b"", 0  # type: ignore[attr-defined]
            return ahead
        self._read_ahead, self._read_start = ahead, end  # type: ignore[attr-defined]
        return ahead[start:end]


# ---- pubsub: signed peer records -----------------------------------------------------------

SENT_RECORD_REUSE_S = 5.0
SEEN_RECORD_REUSE_S = 600.0  # py-libp2p itself keeps a record for two hours
# py-libp2p's pubsub module imports both without re-exporting them (no ``__all__``).
_record_to_send = pubsub_module.env_to_send_in_RPC  # type: ignore[attr-defined]
_consume_record = pubsub_module.maybe_consume_signed_record  # type: ignore[attr-defined]


def cache_peer_records() -> None:
    """Reuse the outgoing signed peer record, and skip re-checking an unchanged incoming one.

    py-libp2p attaches its signed peer record to every pubsub RPC it sends, rebuilding it
    each time (listen addresses compared, the envelope serialised), and verifies and stores
    the one on every RPC it receives (an ed25519 check): a large share of an idle daemon's
    CPU (BENCHMARKS.md, idle daemon). The outgoing record is reused for SENT_RECORD_REUSE_S, and
    a record byte-identical to the one the same peer last sent that passed the check is not
    checked again for SEEN_RECORD_REUSE_S.
    """
    for module in (pubsub_module, gossipsub_module):
        module.env_to_send_in_RPC = _cached_record_to_send  # type: ignore[attr-defined]
        module.maybe_consume_signed_record = _cached_consume_record  # type: ignore[attr-defined]


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


# ---- gossipsub: IDONTWANT only for large messages ------------------------------------------

IDONTWANT_MIN_BYTES = 1024  # go-libp2p's threshold
_gossip_publish = GossipSub.publish
_emit_idontwant = GossipSub._emit_idontwant_for_message
_forwarding_size: contextvars.ContextVar[int] = contextvars.ContextVar("p2p_node_forwarding_size", default=IDONTWANT_MIN_BYTES)


def skip_small_idontwant() -> None:
    """Send IDONTWANT only for gossip messages of IDONTWANT_MIN_BYTES or more.

    py-libp2p's gossipsub sends an IDONTWANT to every mesh peer for every message it
    forwards, whatever its size. IDONTWANT exists to spare peers a second copy of a large
    message; the gossipsub v1.2 spec leaves the size to implementations, and go-libp2p sends
    it only for messages of 1 KiB or more. Most of the daemon's records are a few hundred
    bytes, and for them every message costs each mesh peer an extra RPC to read and parse.
    IDONTWANTs received are handled as before.
    """
    GossipSub.publish = _publish_noting_size  # type: ignore[method-assign]
    GossipSub._emit_idontwant_for_message = _emit_idontwant_if_large  # type: ignore[method-assign]


async def _publish_noting_size(self: GossipSub, msg_forwarder: Any, pubsub_msg: Any) -> None:
    token = _forwarding_size.set(pubsub_msg.ByteSize())
    try:
        await _gossip_publish(self, msg_forwarder, pubsub_msg)
    finally:
        _forwarding_size.reset(token)


async def _emit_idontwant_if_large(self: GossipSub, msg_id: bytes, topic_ids: Any) -> None:
    if _forwarding_size.get() >= IDONTWANT_MIN_BYTES:
        await _emit_idontwant(self, msg_id, topic_ids)


# ---- inbound streams and pubsub messages: a peer's fault ends only its own stream ----------

STREAM_RESET_LIMIT_S = 5.0
_unguarded_dispatch = BasicHost._swarm_stream_handler
_unguarded_push = Pubsub.push_msg


def guard_inbound_streams() -> None:
    """Contain every exception a remote peer's bytes raise in py-libp2p's inbound stream
    handlers and pubsub message processing, and the race in tearing down a banned peer's
    pubsub stream.

    py-libp2p runs every inbound stream, whatever its protocol (identify, identify push,
    ping, pubsub, Kademlia, the daemon's own), through ``BasicHost._swarm_stream_handler`` in
    the connection's nursery: an exception leaving it ends that nursery, then the swarm, then
    the host's whole trio run. Its pubsub reader, for one, lets a protobuf DecodeError
    through. Pubsub hands each message a peer sent to ``push_msg`` as a task of its service,
    where an exception ends the service and with it the host (a message whose ``key`` does
    not parse as a public key, for one). Here a failing stream is reset and a failing
    message dropped, each counted and logged (``node/libp2p/faults.py``); this project's
    own bugs still end the run, and our own publishes stay unguarded, their errors reaching
    the publisher.
    """
    BasicHost._swarm_stream_handler = _guarded_dispatch  # type: ignore[method-assign]
    Pubsub.push_msg = _guarded_push  # type: ignore[method-assign]
    Pubsub._teardown_if_connected = _teardown_if_connected  # type: ignore[method-assign]


def _peer_of(stream: Any) -> str:
    try:
        return str(stream.muxed_conn.peer_id.to_base58())
    except Exception:  # noqa: BLE001 - only for the log line
        return "?"


async def _guarded_dispatch(self: BasicHost, net_stream: Any) -> None:
    try:
        await _unguarded_dispatch(self, net_stream)
    except Exception as error:
        record_fault(self, protocol_family(net_stream.get_protocol()), _peer_of(net_stream), error)
        with trio.move_on_after(STREAM_RESET_LIMIT_S):
            try:
                await net_stream.reset()
            except Exception:  # noqa: BLE001 - it is being dropped either way
                pass


async def _guarded_push(self: Pubsub, msg_forwarder: Any, msg: Any) -> None:
    if msg_forwarder == self.my_id:
        await _unguarded_push(self, msg_forwarder, msg)
        return
    try:
        await _unguarded_push(self, msg_forwarder, msg)
    except Exception as error:
        record_fault(self.host, "pubsub-message", str(msg_forwarder), error)


async def _teardown_if_connected(self: Pubsub, peer_id: Any) -> None:
    # Blacklisting a peer (the gossip rate ban does) tears its pubsub stream down in a task
    # that resets the stream and then deletes the peer's entry. The stream dying meanwhile
    # (the reset ends it, and so does the peer disconnecting) removes the entry first, and
    # py-libp2p's delete then raises KeyError, which ends the pubsub service and the host.
    # The entry goes here only if it is still there.
    stream = self.peers.get(peer_id)
    if stream is not None:
        try:
            await stream.reset()
        except Exception:  # noqa: BLE001 - it is being dropped either way
            pass
        self.peers.pop(peer_id, None)
    self._forget_all_subscriptions(peer_id)
