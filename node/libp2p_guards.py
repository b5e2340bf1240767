"""Containment of remote peers' bad bytes in py-libp2p: a failing inbound stream ends that stream, never the host.

Part of the libp2p layer: it imports trio and libp2p, and only ``node/libp2p_bridge.py`` imports it.
"""

from __future__ import annotations

import collections
import importlib.metadata
import logging
import time
import types
from typing import Any

import trio

from libp2p.exceptions import BaseLibp2pError
from libp2p.host.basic_host import BasicHost
from libp2p.pubsub.pubsub import Pubsub

log = logging.getLogger("p2p_node.libp2p")

# Every patch in the bridge and here replaces a private py-libp2p function by one written
# against this release's source; another release may have moved, renamed or fixed them.
PINNED_LIBP2P_VERSION = "0.8.1"
_version_checked = False


def installed_libp2p_version() -> str:
    try:
        return importlib.metadata.version("libp2p")
    except importlib.metadata.PackageNotFoundError:
        import libp2p

        return str(getattr(libp2p, "__version__", "unknown"))


def libp2p_version_warning(installed: str) -> str | None:
    """What to tell the operator when ``installed`` is not the release the patches are pinned to."""
    if installed == PINNED_LIBP2P_VERSION:
        return None
    return (
        f"py-libp2p {installed} is installed, but p2p-node's transport patches are written for"
        f" {PINNED_LIBP2P_VERSION}: they may not apply, and a remote peer's malformed stream may"
        f" again stop the node; install libp2p=={PINNED_LIBP2P_VERSION}"
    )


def warn_if_libp2p_unpinned() -> None:
    """Log ``libp2p_version_warning`` once per process; starting goes on either way."""
    global _version_checked
    if _version_checked:
        return
    _version_checked = True
    if (warning := libp2p_version_warning(installed_libp2p_version())) is not None:
        log.warning("%s", warning)


# Faults are counted per host in the Counter the bridge attaches (its ``stats.stream_faults``),
# keyed "<protocol family>:<exception type>". Warnings go out at most once per reason per
# FAULT_WARNING_INTERVAL_S, naming how many were held back meanwhile: a hostile peer
# repeating one payload must not turn the log into a flood of tracebacks.
FAULT_WARNING_INTERVAL_S = 60.0
STREAM_RESET_LIMIT_S = 5.0
_FAULTS_ATTR = "_p2p_node_stream_faults"
_FAMILIES = (
    ("/meshsub/", "pubsub"),
    ("/floodsub/", "pubsub"),
    ("/ipfs/id/push/", "identify-push"),
    ("/ipfs/id/", "identify"),
    ("/ipfs/ping/", "ping"),
    ("/ipfs/kad/", "kad"),
)
# The project's own packages: an exception raised in their code is a bug, not a peer's fault.
_OUR_PACKAGES = frozenset({"node", "protocol", "workloads"})


class _FaultWarnings:
    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._held: collections.Counter[str] = collections.Counter()

    def warn(self, reason: str, peer: str, error: BaseException) -> None:
        now = time.monotonic()
        last = self._last.get(reason)
        if last is not None and now - last < FAULT_WARNING_INTERVAL_S:
            self._held[reason] += 1
            return
        self._last[reason] = now
        held = self._held.pop(reason, 0)
        log.warning(
            "dropped what peer %s sent (%s): %r%s",
            peer,
            reason,
            error,
            f" ({held} more since the last such warning)" if held else "",
        )


_warnings = _FaultWarnings()


def attach_fault_counter(host: Any, counts: collections.Counter[str]) -> None:
    """Count ``host``'s contained faults in ``counts``."""
    setattr(host, _FAULTS_ATTR, counts)


def fault_counter(host: Any) -> collections.Counter[str]:
    """The Counter ``host``'s faults go to (a fresh one for a host nobody attached one to)."""
    counts: collections.Counter[str] | None = getattr(host, _FAULTS_ATTR, None)
    if counts is None:
        counts = collections.Counter()
        attach_fault_counter(host, counts)
    return counts


def protocol_family(protocol: str | None) -> str:
    """The name a protocol's faults are counted under: its family, or the protocol id itself."""
    if not protocol:
        return "negotiation"
    return next((family for prefix, family in _FAMILIES if protocol.startswith(prefix)), protocol)


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def _raised_in_our_code(error: BaseException) -> bool:
    # Errors of libp2p's own types are how the bridge's transport patches report a gone peer.
    if isinstance(error, BaseLibp2pError):
        return False
    tb: types.TracebackType | None = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = str(tb.tb_frame.f_globals.get("__name__", ""))
    return module.split(".", 1)[0] in _OUR_PACKAGES


def record_fault(host: Any, family: str, peer: str, error: Exception) -> None:
    """Count and (rate-limited) log a remote peer's fault; re-raise ``error`` when it is a bug
    of this project's code, which must stay loud."""
    leaves = _leaves(error)
    if any(_raised_in_our_code(leaf) for leaf in leaves):
        raise error
    reason = f"{family}:{type(leaves[0]).__name__}"
    fault_counter(host)[reason] += 1
    _warnings.warn(reason, peer, leaves[0])


def _peer_of(stream: Any) -> str:
    try:
        return str(stream.muxed_conn.peer_id.to_base58())
    except Exception:  # noqa: BLE001 - only for the log line
        return "?"


# py-libp2p runs every inbound stream, whatever its protocol (identify, identify push, ping,
# pubsub, Kademlia, the daemon's own), through ``BasicHost._swarm_stream_handler`` in the
# connection's nursery: an exception leaving it ends that nursery, then the swarm, then the
# host's whole trio run. Its pubsub reader, for one, lets a protobuf DecodeError through.
_unguarded_dispatch = BasicHost._swarm_stream_handler


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


# Pubsub hands each message a peer sent to ``push_msg`` as a task of its service, where an
# exception ends the service and with it the host (a message whose ``key`` does not parse as a
# public key, for one). A message that fails to be processed is dropped. Our own publishes
# are left unguarded: their errors reach the publisher.
_unguarded_push = Pubsub.push_msg


async def _guarded_push(self: Pubsub, msg_forwarder: Any, msg: Any) -> None:
    if msg_forwarder == self.my_id:
        await _unguarded_push(self, msg_forwarder, msg)
        return
    try:
        await _unguarded_push(self, msg_forwarder, msg)
    except Exception as error:
        record_fault(self.host, "pubsub-message", str(msg_forwarder), error)


# Blacklisting a peer (the gossip rate ban does) tears its pubsub stream down in a task that
# resets the stream and then deletes the peer's entry. The peer's stream dying meanwhile (it
# does: the reset ends it, and so does its disconnecting) removes the entry first, and the
# delete's KeyError ends the pubsub service and with it the host: a flooding peer got an
# honest daemon stopped that way. The entry goes if it is still there.
async def _teardown_if_connected(self: Pubsub, peer_id: Any) -> None:
    stream = self.peers.get(peer_id)
    if stream is not None:
        try:
            await stream.reset()
        except Exception:  # noqa: BLE001 - it is being dropped either way
            pass
        self.peers.pop(peer_id, None)
    self._forget_all_subscriptions(peer_id)


def guard_inbound_streams() -> None:
    """Contain every exception a remote peer's bytes raise in py-libp2p's inbound stream
    handlers and pubsub message processing, and the race in tearing down a banned peer's
    pubsub stream (see above). Idempotent."""
    BasicHost._swarm_stream_handler = _guarded_dispatch  # type: ignore[method-assign]
    Pubsub.push_msg = _guarded_push  # type: ignore[method-assign]
    Pubsub._teardown_if_connected = _teardown_if_connected  # type: ignore[method-assign]
