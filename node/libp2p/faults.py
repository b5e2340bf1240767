"""Remote peers' faults contained by the inbound-stream guards: counted per host by reason,
logged at most once a minute per reason, and told apart from this project's own bugs."""

from __future__ import annotations

import collections
import logging
import time
import types
from typing import Any

from libp2p.exceptions import BaseLibp2pError

log = logging.getLogger("p2p_node.libp2p")

# Faults are counted per host in the Counter the bridge attaches (its ``stats.stream_faults``),
# keyed "<protocol family>:<exception type>". Warnings go out at most once per reason per
# FAULT_WARNING_INTERVAL_S, naming how many were held back meanwhile: a hostile peer
# repeating one payload must not turn the log into a flood of tracebacks.
FAULT_WARNING_INTERVAL_S = 60.0
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
    # Errors of libp2p's own types are how the transport patches report a gone peer.
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
