"""The libp2p host (noise + yamux, gossipsub, optional Kademlia and mDNS) in its own trio thread.

The asyncio side awaits ``Libp2pBridge`` methods; each one runs a small trio function in the
host's nursery and settles an asyncio future with the result. Gossip is pumped from trio
subscriptions into bounded asyncio queues, and inbound streams are handed to asyncio handlers
as ``FramedStream`` objects.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import multiaddr
import trio

from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service

from node.libp2p import patches
from node.libp2p.errors import BridgeError, ListenFailed
from node.libp2p.faults import attach_fault_counter
from node.libp2p.framing import FramedStream, StreamHandler, close_quietly
from node.libp2p.patches import TcpReadFill
from node.libp2p.publisher_rate import FLOOD_BAN_S, PublisherRate, Verdict
from node.libp2p.trio_thread import TrioTask, call_soon_quietly, run_sync_soon_quietly

T = TypeVar("T")
log = logging.getLogger("p2p_node.libp2p")

GOSSIP_PROTOCOLS = [TProtocol("/meshsub/1.2.0"), TProtocol("/meshsub/1.1.0")]


@dataclass(frozen=True)
class GossipSettings:
    degree: int = 6
    degree_low: int = 4
    degree_high: int = 12
    heartbeat_interval_s: float = 1.0
    max_message_bytes: int = 64 * 1024
    inbound_queue: int = 4096
    rate_limit_per_s: float = 0.0  # messages per second relayed from one publisher; 0: no limit


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
        """Apply the py-libp2p patches, start the trio thread and wait until the host listens;
        raise BridgeError if it cannot (``UnsupportedLibp2p`` for a py-libp2p release the
        patches are not written for, ``ListenFailed`` for an address it cannot listen on)."""
        patches.apply()
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
            # py-libp2p's spam guard also throttles this host's own publishes;
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

    def spawn(self, afn: Callable[..., Awaitable[T]], *args: Any, timeout: float) -> TrioTask[T]:
        """Start ``afn(*args)`` in the trio thread with a deadline; its result settles ``future``."""
        if self._token is None or self._nursery is None or self._loop is None:
            raise BridgeError("libp2p host is not running")
        loop, nursery = self._loop, self._nursery
        task: TrioTask[T] = TrioTask(loop.create_future(), self._token)
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
                        call_soon_quietly(loop, settle, None, exc)
                        return
                    except trio.Cancelled:
                        raise
                    except Exception as exc:
                        call_soon_quietly(loop, settle, None, BridgeError(f"{name}: {exc!r}"))
                        return
                    call_soon_quietly(loop, settle, result, None)
                    return
                if task.cancelled:
                    call_soon_quietly(loop, future.cancel)
                else:
                    call_soon_quietly(loop, settle, None, TimeoutError(f"{name} timed out after {timeout} s"))
            finally:
                # Only reached unsettled when the host's shutdown cancelled the task: say so.
                # (Callbacks run in order, so an outcome queued above always wins.)
                call_soon_quietly(loop, settle, None, BridgeError("libp2p host stopped"))

        def start() -> None:
            try:
                nursery.start_soon(runner)
            except RuntimeError:  # the nursery is closed to new tasks: the host is stopping
                call_soon_quietly(loop, settle, None, BridgeError("libp2p host stopped"))

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

    def tcp_reads(self) -> TcpReadFill:
        """What TCP reads have found waiting for them so far (``TcpReadFill``). The reads are
        patched process-wide, so the totals are this process's, shared by every host in it."""
        return patches.tcp_read_fill()

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
            # host included: nothing may leave this function.
            try:
                peer = stream.muxed_conn.peer_id.to_base58()
                handler = self._handlers[protocol]
                finished = trio.Event()
                token = trio.lowlevel.current_trio_token()
                future = self._to_asyncio(handler(FramedStream(self, stream, peer)))
                future.add_done_callback(lambda _f: run_sync_soon_quietly(token, finished.set))
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
                    await close_quietly(stream)

        return handle

    async def open_stream(self, peer_id: str, protocol: str, timeout: float) -> FramedStream:
        stream = await self.call(
            self._host.new_stream, ID.from_base58(peer_id), [TProtocol(protocol)], timeout=timeout
        )
        return FramedStream(self, stream, peer_id)



def _listen_failure(error: BaseException | None) -> ListenFailed | None:
    """The ListenFailed that ended a trio run, however deep in exception groups it lies."""
    if isinstance(error, ListenFailed):
        return error
    if isinstance(error, BaseExceptionGroup):
        return next((found for inner in error.exceptions if (found := _listen_failure(inner))), None)
    return None


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.debug("libp2p run ended with %r", future.exception())
