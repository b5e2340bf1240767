"""What ``p2p-node status`` prints by default: a peer's ``/status`` answer as a few aligned lines."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

LABEL_WIDTH = 12


def status_summary(status: Mapping[str, Any]) -> str:
    """The lines a person reads first: who the peer is, where its training stands, who it sees.

    Peers live counts the peer itself (``/status`` counts the others). Keys the answer lacks
    show as ``-``, so an older or newer peer still gets a summary.
    """
    peer_id = str(status.get("peer_id", "?"))
    name = status.get("name") or peer_id[-8:]
    peers = status.get("peers") or {}
    others = int(peers.get("live", 0))
    lines = [
        ("peer", f"{name} {peer_id}"),
        ("swarm", f"{status.get('swarm', '-')}, up {_duration(status.get('uptime_s'))}"),
    ]
    training = status.get("training")
    if training:
        lines += [
            ("role", f"{training.get('role', '-')}, workload {training.get('workload', '-')}"),
            ("round", f"{training.get('round', '-')}, {training.get('phase', '-')}"),
            ("head", f"{short_id(training.get('head'))} (round {training.get('head_round', '-')})"),
            ("val loss", _loss(training.get("val_loss"))),
        ]
    else:
        lines.append(("training", "not running yet"))
    lines.append((
        "peers live",
        f"{others + 1} (this one and {others} other{'' if others == 1 else 's'}),"
        f" {peers.get('dead', 0)} dead, {peers.get('connected', 0)} connected",
    ))
    if training:
        lines.append(("utilisation", _percent(training.get("utilisation"))))
        if training.get("last_error"):
            lines.append(("last error", " ".join(str(training["last_error"]).split())))
    return "\n".join(f"{label:<{LABEL_WIDTH}}{value}" for label, value in lines)


def short_id(content_id: Any) -> str:
    """``b3:`` and the first 12 hex digits of a content id: enough to tell heads apart."""
    if not isinstance(content_id, str) or not content_id:
        return "-"
    prefix, sep, digest = content_id.partition(":")
    return f"{prefix}:{digest[:12]}" if sep else content_id[:15]


def _loss(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def _percent(value: Any) -> str:
    return f"{value * 100:.1f}%" if isinstance(value, (int, float)) else "-"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"
