"""Convergence of a head across the swarm, from heartbeats: who holds it, who lags and why."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from node.exchange import Exchange
from protocol.membership import PeerTable
from protocol.exchange import FETCH_OUTCOMES

# Heartbeat capability keys this module writes and reads.
FETCH = "fetch"  # "<manifest id>" of the fetch in flight, if any
FETCH_PROGRESS = "fetch_permille"
FETCH_RATE = "fetch_rate"  # bytes per second
FETCH_LEFT = "fetch_left"  # bytes still to fetch
FETCH_ERROR = "fetch_error"
PHASE = "phase"
# A failed fetch explains a lag only while it is news: the exchange keeps every fetch it ran,
# and one that failed an hour ago (or was retried and done since) says nothing about now.
FETCH_ERROR_FRESH_S = 60.0


def fetch_capabilities(exchange: Exchange) -> dict[str, int | str]:
    """What this peer says about its own transfers in its heartbeat."""
    running = [p for p in exchange.fetches.values() if not p.state.ended]
    if running:
        progress = max(running, key=lambda p: p.started)
        view = progress.view()
        return {
            FETCH: progress.manifest_id,
            FETCH_PROGRESS: int(view["progress"] * 1000),
            FETCH_RATE: int(view["rate_bytes_per_s"]),
            FETCH_LEFT: max(progress.total_bytes - progress.have_bytes, 0),
        }
    ended = [p for p in exchange.fetches.values() if p.state in FETCH_OUTCOMES and p.finished is not None]
    latest = max(ended, key=lambda p: p.finished or 0.0, default=None)
    fresh = latest is not None and time.monotonic() - (latest.finished or 0.0) < FETCH_ERROR_FRESH_S
    if latest is not None and latest.state == "failed" and fresh:
        return {FETCH_ERROR: (latest.error or "failed")[:180]}
    return {}


def node_view(table: PeerTable, peer: str) -> dict[str, Any] | None:
    """One peer's model status as its heartbeats tell it."""
    state = table.peers.get(peer)
    if state is None:
        return None
    beat = state.heartbeat
    caps = dict(beat.capabilities)
    return {
        "peer_id": peer,
        "alive": state.alive,
        "role": beat.role,
        "head": beat.head,
        "round": beat.round,
        "phase": caps.get(PHASE),
        "device": beat.device,
        "fetch": {
            "manifest": caps.get(FETCH),
            "progress": progress / 1000 if isinstance(progress := caps.get(FETCH_PROGRESS), int) else None,
            "rate_bytes_per_s": caps.get(FETCH_RATE),
            "bytes_left": caps.get(FETCH_LEFT),
            "error": caps.get(FETCH_ERROR),
        },
        "last_seen_ms": state.last_seen_ms,
    }


def _lag_reason(view: dict[str, Any]) -> tuple[str, float | None]:
    """Why a peer does not hold the head yet, and seconds to go where a transfer rate says so."""
    if not view["alive"]:
        return "offline", None
    fetch = view["fetch"]
    if fetch["manifest"]:
        rate, left = fetch["rate_bytes_per_s"], fetch["bytes_left"]
        eta = round(left / rate, 1) if isinstance(rate, int) and rate > 0 and isinstance(left, int) else None
        return "fetching", eta
    if fetch["error"]:
        return f"failed: {fetch['error']}", None
    if view["phase"] in ("merging", "verifying"):
        return "verifying", None
    return "behind", None


def convergence(table: PeerTable, head_id: str, head_round: int, self_view: dict[str, Any]) -> dict[str, Any]:
    """How far ``head_id`` has spread: holders, the histogram of heads held, laggards with reasons."""
    views = [self_view] + [v for p in sorted(table.peers) if (v := node_view(table, p)) is not None]
    live = [v for v in views if v["alive"]]
    histogram = Counter(v["head"] for v in live if v["head"])
    holders = [v["peer_id"] for v in live if v["head"] == head_id]
    lagging = []
    for view in views:
        if view["alive"] and view["head"] == head_id:
            continue
        if view["alive"] and view["round"] > head_round:
            continue  # already past this head
        reason, eta = _lag_reason(view)
        lagging.append({"peer_id": view["peer_id"], "head": view["head"], "round": view["round"],
                        "reason": reason, "eta_s": eta, "fetch": view["fetch"]})
    etas = [row["eta_s"] for row in lagging if row["eta_s"] is not None]
    ahead = [v["peer_id"] for v in live if v["head"] != head_id and v["round"] > head_round]
    return {
        "head": head_id,
        "round": head_round,
        "live_peers": len(live),
        "holders": len(holders),
        "holder_ids": holders,
        "ahead": ahead,
        "converged": not [row for row in lagging if row["reason"] != "offline"],
        "heads_held": dict(histogram),
        "lagging": lagging,
        "estimated_completion_s": max(etas) if etas else None,
    }
