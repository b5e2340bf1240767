"""The daemon: composes bridge, gossip, membership and the status port, and owns their lifetimes."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from node.availability import Availability
from node.config import Config
from node.diloco import OuterLoop
from node.convergence import fetch_capabilities
from node.distribution import Distribution
from node.events import EventBus
from node.operator import Operations
from node.exchange import Exchange, ExchangeSettings
from node.fetch_journal import FetchJournal
from node.gossip import Gossip
from node.keys import KEY_FILE, load_or_create_key, read_key
from node.libp2p import BridgeError, GossipSettings, Libp2pBridge, ListenFailed, UnsupportedLibp2p
from node.logs import get_logger
from node.membership import Membership
from node.status_api import StatusApi
from node.store import ContentStore
from node.trainer import Trainer
from protocol.evals import EVAL_KIND, EVAL_VERSION, EvalRecord
from protocol.variants import VARIANT_KIND, VARIANT_VERSION, VariantRecord
from workloads.registry import load_workload
from protocol.availability import ANNOUNCE_KIND, ANNOUNCE_VERSION, Announce
from protocol.identity import SigningKey
from protocol.kinds import PATCH, ROLLBACK, record_kinds
from protocol.membership import (
    HEARTBEAT_KIND,
    HEARTBEAT_VERSION,
    Heartbeat,
    PeerDied,
    PeerEvent,
    PeerJoined,
    PeerRevived,
)
from protocol.records import RecordKind

log = get_logger("daemon")

LEAVE_BUDGET_S = 1.0  # for the goodbye heartbeat, within SHUTDOWN_BUDGET_S
SHUTDOWN_BUDGET_S = 4.0
# From a stop (SIGTERM) to the process's exit, whatever still runs: a training step that does not
# stop, a write stuck on a full disk. The process exits at STOP_BOUND_S - STOP_MARGIN_S at the latest.
STOP_BOUND_S = 5.0
STOP_MARGIN_S = 0.5
T = TypeVar("T")
HEARTBEAT_RECORD = RecordKind(HEARTBEAT_KIND, frozenset({HEARTBEAT_VERSION}), Heartbeat.from_wire)
ANNOUNCE_RECORD = RecordKind(ANNOUNCE_KIND, frozenset({ANNOUNCE_VERSION}), Announce.from_wire)
EVAL_RECORD = RecordKind(EVAL_KIND, frozenset({EVAL_VERSION}), EvalRecord.from_wire)
VARIANT_RECORD = RecordKind(VARIANT_KIND, frozenset({VARIANT_VERSION}), VariantRecord.from_wire)
NODE_RECORDS = (HEARTBEAT_RECORD, ANNOUNCE_RECORD, EVAL_RECORD, VARIANT_RECORD)


class _Stop(Exception):
    """Raised inside the task group to cancel every task on a clean shutdown."""


def describe_os_error(exc: OSError) -> str:
    """``exc`` as one line: what failed and where, without the traceback."""
    text = exc.strerror or str(exc)
    return f"{text}: {exc.filename}" if exc.filename else text


class Node:
    """One peer. ``run()`` returns the process exit status."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.data_dir = Path(config.node.data_dir)
        self.started_at = time.time()
        self._stop = asyncio.Event()
        self.starting = ""  # what the start is doing, for the error when it fails
        self.key: SigningKey | None = None
        self.bridge: Libp2pBridge | None = None
        self.gossip: Gossip | None = None
        self.membership: Membership | None = None
        self.status: StatusApi | None = None
        self.store: ContentStore | None = None
        self.availability: Availability | None = None
        self.exchange: Exchange | None = None
        self.outer: OuterLoop | None = None
        self.events = EventBus()
        self.operations: Operations | None = None
        self.distribution: Distribution | None = None
        # Set when the stop begins (a signal, or a fault that ends the run); read by the stop
        # deadline's thread, which is why it is a threading.Event.
        self.stopping = threading.Event()
        self.stop_began = 0.0
        self.exit_code = 0

    def request_stop(self) -> None:
        self._begin_stop()
        self._stop.set()

    def _begin_stop(self) -> None:
        if not self.stopping.is_set():
            self.stop_began = time.monotonic()
            self.stopping.set()

    def _load_key(self) -> SigningKey:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.config.node.key_file:
            return read_key(Path(self.config.node.key_file))
        return load_or_create_key(self.data_dir)

    async def start(self) -> None:
        cfg = self.config
        self.starting = "loading the identity key"
        self.key = self._load_key()
        # Loading a workload (a model, a dataset) and a full store check can take minutes: both
        # run in threads the process does not wait for, so a SIGTERM meanwhile stops it at once.
        self.starting = "loading the workload"
        workload = await _in_thread(load_workload, cfg.workload.name, dict(cfg.workload.options))
        self.starting = "opening the store"
        self.store = ContentStore(self.data_dir / "store")
        self.starting = "checking the store"
        report = await _in_thread(self.store.check, cfg.store.check_on_start == "full")
        log.info("store_checked", report=str(report))
        gossip_settings = GossipSettings(
            degree=cfg.gossip.degree,
            degree_low=cfg.gossip.degree_low,
            degree_high=cfg.gossip.degree_high,
            heartbeat_interval_s=cfg.gossip.heartbeat_interval_s,
            max_message_bytes=cfg.gossip.max_message_bytes,
            inbound_queue=cfg.gossip.publish_queue * 4,
            rate_limit_per_s=cfg.gossip.rate_limit_per_s,
        )
        self.starting = "starting libp2p"
        self.bridge = Libp2pBridge(
            self.key.seed,
            list(cfg.network.listen),
            announce=list(cfg.network.announce),
            gossip=gossip_settings,
            kademlia=cfg.network.kademlia,
            mdns=cfg.network.mdns,
        )
        await self.bridge.start()
        members = frozenset(cfg.swarm.members) | {self.key.peer_id} if cfg.swarm.members else None
        self.gossip = Gossip(
            self.bridge, self.key, cfg.swarm.name, record_kinds(NODE_RECORDS), members, cfg.gossip.rate_limit_per_s,
            timeless=frozenset({ROLLBACK, PATCH}),
        )
        await self.gossip.start()
        self.membership = Membership(
            self.bridge,
            self.gossip,
            role=cfg.training.role,
            interval_s=cfg.membership.heartbeat_interval_s,
            dead_after_missed=cfg.membership.dead_after_missed,
            bootstrap=list(cfg.swarm.bootstrap),
            dial_timeout_s=cfg.network.dial_timeout_s,
        )
        self.membership.subscribe(self._on_peer_event)
        self.availability = Availability(self.gossip, self.key.peer_id, cfg.exchange.announce_interval_s)
        for manifest_id in await asyncio.to_thread(complete_manifests, self.store):
            self.availability.add_held(manifest_id)
        self.starting = "starting the chunk exchange"
        ex = cfg.exchange
        self.exchange = Exchange(
            self.bridge,
            self.store,
            self.availability,
            ExchangeSettings(
                request_timeout_s=ex.request_timeout_s,
                streams_per_provider=ex.streams_per_provider,
                batch_bytes=ex.batch_bytes,
                max_streams_per_peer=ex.max_streams_per_peer,
                max_bytes_in_flight=ex.max_bytes_in_flight,
                stall_timeout_s=ex.stall_timeout_s,
                fan_out=ex.fan_out,
            ),
            FetchJournal(self.data_dir / "fetches.json"),
        )
        await self.exchange.start()
        self.starting = "starting the outer loop"
        trainer = Trainer(
            workload, cfg.workload.device, self.data_dir, cfg.workload.seed, cfg.training.inner_state_every_s
        )
        self.outer = OuterLoop(
            cfg, self.key.peer_id, trainer, self.store, self.exchange, self.availability, self.gossip, self.membership
        )
        self.outer.emit = self.events.emit
        self.operations = Operations(
            self.gossip, self.key, frozenset(cfg.swarm.operators), self.data_dir / "operator_records.json"
        )
        self.operations.emit = self.events.emit
        self.outer.patches_at = self.operations.settings_at
        self.distribution = Distribution(
            self.gossip, self.key.peer_id, self.store, self.availability,
            cfg.training.publish_variants, cfg.training.export_dir, cfg.training.export_variant,
            self.outer.chunking,
        )
        self.outer.adopted_hooks.append(self.distribution.on_adopted)
        await self.outer.start(self.data_dir)
        assert self.outer.heads is not None
        self.outer.heads.emit = self.events.emit
        self.operations.on_rollback = self.outer.heads.apply_rollback
        self.starting = "restoring operator records"
        await self.operations.restore()
        self.membership.set_fields(self._heartbeat_fields)
        self.starting = "starting the status port"
        if cfg.status.enabled:
            self.status = StatusApi(self)
            await self.status.start(cfg.status.host, cfg.status.port)
            if cfg.status.allow_remote:
                log.warning(
                    "status_port_remote", url=self.status.url, mutating="on" if cfg.status.token else "off",
                    hint="status.allow_remote is set: anyone who can reach this address can read the node's state",
                )
        log.info(
            "node_started",
            peer_id=self.key.peer_id,
            swarm=cfg.swarm.name,
            listen=self.bridge.listen_addrs(),
            status=self.status.url if self.status else None,
        )

    async def run(self) -> int:
        """Run until SIGINT/SIGTERM (exit 0) or until libp2p dies (exit 1)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop)
        exit_code = 0
        try:
            try:
                started = await self._start_unless_stopped()
            except (OSError, ListenFailed, UnsupportedLibp2p) as exc:
                # A local fault (a full or read-only disk, a port in use, another py-libp2p
                # release installed): one clear line, exit 1.
                error = describe_os_error(exc) if isinstance(exc, OSError) else str(exc)
                log.error("node_start_failed", during=self.starting, error=error)
                self.exit_code = 1
                return 1
            if not started:
                log.info("node_stopping", reason="signal", during="start")
                return exit_code
            try:
                await self._serve()
            except* _Stop:
                log.info("node_stopping", reason="signal")
            except* BridgeError as group:
                log.error("libp2p_died", error=str(group.exceptions[0]))
                exit_code = self.exit_code = 1
            return exit_code
        finally:
            self._begin_stop()
            await self._shutdown()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    async def _start_unless_stopped(self) -> bool:
        """Start; False if a stop was asked for first. A stop during the start (docker stop
        while a large workload loads) cancels it, so the process exits now, not after it."""
        starting = asyncio.ensure_future(self.start())
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not starting.done():
                starting.cancel()
                await asyncio.wait((starting,))
        if starting.cancelled():
            return False
        starting.result()  # raises what failed the start
        return True

    async def _serve(self) -> None:
        assert self.gossip is not None and self.membership is not None
        assert self.availability is not None and self.exchange is not None
        assert self.outer is not None and self.outer.heads is not None and self.operations is not None
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.gossip.run(), name="gossip")
            tasks.create_task(self.membership.run(), name="membership")
            tasks.create_task(self._watch_bridge(), name="bridge-watch")
            tasks.create_task(self.availability.run(), name="availability")
            tasks.create_task(self._gc_loop(), name="store-gc")
            tasks.create_task(self.outer.heads.run(), name="heads")
            tasks.create_task(self.outer.run(), name="outer-loop")
            tasks.create_task(self._report_fetches(), name="fetch-events")
            tasks.create_task(self.operations.run(self.config.training.head_reannounce_s * 2), name="operator-replay")
            resumed = self.exchange.resume()
            if resumed:
                log.info("fetches_resumed", manifests=resumed)
            await self._stop.wait()
            raise _Stop

    def _heartbeat_fields(self) -> dict[str, Any]:
        assert self.outer is not None and self.exchange is not None
        fields = self.outer.heartbeat_fields()
        fields["capabilities"] = {**fields.get("capabilities", {}), **fetch_capabilities(self.exchange)}
        return fields

    def _on_peer_event(self, event: PeerEvent) -> None:
        if self.availability is not None:
            self.availability.on_peer_event(event)
        kind = {PeerJoined: "peer_joined", PeerRevived: "peer_joined", PeerDied: "peer_left"}[type(event)]
        self.events.emit(kind, peer=event.peer)

    async def _report_fetches(self) -> None:
        """Fetch progress as events, once a second while any fetch runs (and once when it ends)."""
        assert self.exchange is not None
        reported: dict[str, str] = {}
        while True:
            await asyncio.sleep(1.0)
            fetches = dict(self.exchange.fetches)
            for gone in reported.keys() - fetches.keys():
                del reported[gone]  # as bounded as the exchange's own list of fetches
            for manifest_id, progress in fetches.items():
                if progress.state.ended and reported.get(manifest_id) == progress.state:
                    continue
                reported[manifest_id] = progress.state
                view = progress.view()
                self.events.emit(
                    "fetch_progress", manifest=manifest_id, state=progress.state.value, progress=view["progress"],
                    rate_bytes_per_s=view["rate_bytes_per_s"], error=progress.error,
                )

    async def _gc_loop(self) -> None:
        assert self.store is not None
        while True:
            await asyncio.sleep(self.config.store.gc_interval_s)
            try:
                report = await asyncio.to_thread(self.store.gc, self.config.store.gc_keep_recent_s)
            except Exception as exc:
                # A store gone read-only or failing (EROFS, EIO) is the disk's fault: said, and
                # tried again next time, while the daemon runs on.
                log.error("store_gc_failed", error=f"{type(exc).__name__}: {exc}")
                continue
            log.info("store_gc", report=str(report))

    async def _watch_bridge(self) -> None:
        assert self.bridge is not None and self.bridge.done is not None
        await asyncio.shield(self.bridge.done)
        raise BridgeError("libp2p host stopped unexpectedly")

    async def _shutdown(self) -> None:
        if self.outer is not None:
            self.outer.trainer.request_stop()
        try:
            async with asyncio.timeout(SHUTDOWN_BUDGET_S):
                if self.membership is not None:
                    # Say goodbye: peers count us out now (their rounds stop waiting for us,
                    # our leases free up) rather than after a few missed heartbeats.
                    await self.membership.leave(timeout=LEAVE_BUDGET_S)
                if self.status is not None:
                    await self.status.close()
                if self.exchange is not None:
                    await self.exchange.close()
                if self.bridge is not None:
                    await self.bridge.stop(timeout=SHUTDOWN_BUDGET_S / 2)
        except TimeoutError:
            log.warning("shutdown_slow", budget_s=SHUTDOWN_BUDGET_S)
        log.info("node_stopped")


def run_process(node: Node, run: Callable[[Any], int]) -> int:
    """Run ``node`` with ``run`` (``uvloop.run``) in this process, which exits within STOP_BOUND_S of
    a stop even when a thread does not end: the event loop's runner and the interpreter wait for
    every worker thread at exit, and a training step stuck on a full disk would hold them."""
    threading.Thread(target=_exit_when_overdue, args=(node,), name="stop-deadline", daemon=True).start()
    return run(node.run())


def _exit_when_overdue(node: Node) -> None:
    node.stopping.wait()
    time.sleep(max(0.0, node.stop_began + STOP_BOUND_S - STOP_MARGIN_S - time.monotonic()))
    # Still here: something the stop does not reach holds the process. Say what, briefly (a
    # logger stuck on a broken stream must not hold it either), and leave: every store write is
    # atomic, so what was half done is lost as in a crash, never corrupted.
    busy = sorted(t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon)
    said = threading.Thread(target=_say_forced, args=(busy,), name="stop-deadline-log", daemon=True)
    said.start()
    said.join(STOP_MARGIN_S / 2)
    os._exit(node.exit_code)


def _say_forced(busy: list[str]) -> None:
    log.warning("shutdown_forced", bound_s=STOP_BOUND_S, threads=busy)
    for handler in logging.getLogger().handlers:
        handler.flush()


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a daemon thread: if the caller is cancelled, the process can still exit
    without waiting for it (``asyncio.to_thread``'s pool threads are waited for at exit)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return  # the caller was cancelled
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as exc:  # handed to the caller, whatever it is
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:
            pass  # the loop has closed: nobody waits for this any more

    threading.Thread(target=run, name=f"start-{getattr(fn, '__name__', 'work')}", daemon=True).start()
    return await future


def key_path(config: Config) -> Path:
    return Path(config.node.key_file) if config.node.key_file else Path(config.node.data_dir) / KEY_FILE


def complete_manifests(store: ContentStore) -> list[str]:
    """Manifests whose every chunk is in ``store``: what this peer can announce as held."""
    complete = []
    for manifest_id in store.manifest_ids():
        manifest = store.get_manifest(manifest_id)
        if manifest is not None and not store.missing(ref.cid for ref in manifest.chunks):
            complete.append(manifest_id)
    return complete
