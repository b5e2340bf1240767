"""Prometheus metrics for the status port: the node's counters in the text exposition format 0.0.4.

Written by hand (the format is a few lines of text) so the daemon needs no metrics library.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from node.http import Request, Response, text_response

if TYPE_CHECKING:
    from node.daemon import Node
    from node.exchange import FetchProgress

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "p2p_node_"
FETCH_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
RATE_WINDOW_S = 60.0
ENDED_FETCH_STATES = ("done", "failed")
LIVE_FETCH_STATES = ("starting", "fetching")

Labels = Mapping[str, str]


# ---------------------------------------------------------------- the text format


def escape_label(value: str) -> str:
    """A label value as the format quotes it: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class Exposition:
    """Metric families written one after the other, each with its HELP and TYPE lines."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._names: set[str] = set()

    def family(self, name: str, kind: str, help: str, samples: Iterable[tuple[Labels, float]]) -> None:
        """One family; ``samples`` are (labels, value) pairs. Names get the ``p2p_node_`` prefix."""
        full = PREFIX + name
        if full in self._names:
            raise ValueError(f"metric family {full} written twice")
        self._names.add(full)
        self._lines.append(f"# HELP {full} {escape_help(help)}")
        self._lines.append(f"# TYPE {full} {kind}")
        for labels, value in samples:
            self._lines.append(self._sample(full, labels, value))

    def gauge(self, name: str, help: str, value: float | None, labels: Labels | None = None) -> None:
        """A single-sample gauge; None (not known yet) writes the family with no sample."""
        self.family(name, "gauge", help, [] if value is None else [(labels or {}, value)])

    def counter(self, name: str, help: str, value: float) -> None:
        self.family(name, "counter", help, [({}, value)])

    def histogram(self, name: str, help: str, series: Mapping[tuple[tuple[str, str], ...], Histogram]) -> None:
        """A histogram family: one series per label set, each as buckets, sum and count."""
        full = PREFIX + name
        self.family(name, "histogram", help, [])
        for label_items, hist in sorted(series.items()):
            labels = dict(label_items)
            running = 0
            for bound, count in zip(hist.buckets, hist.counts):
                running += count
                self._lines.append(self._sample(f"{full}_bucket", {**labels, "le": format_value(bound)}, running))
            self._lines.append(self._sample(f"{full}_bucket", {**labels, "le": "+Inf"}, hist.count))
            self._lines.append(self._sample(f"{full}_sum", labels, hist.sum))
            self._lines.append(self._sample(f"{full}_count", labels, hist.count))

    @staticmethod
    def _sample(name: str, labels: Labels, value: float) -> str:
        if not labels:
            return f"{name} {format_value(value)}"
        text = ",".join(f'{key}="{escape_label(str(val))}"' for key, val in labels.items())
        return f"{name}{{{text}}} {format_value(value)}"

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


@dataclass
class Histogram:
    """Cumulative-on-output counts of observations at or under each bound."""

    buckets: tuple[float, ...] = FETCH_BUCKETS_S
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self.buckets):
            self.counts[index] += 1
        self.sum += value
        self.count += 1


# ---------------------------------------------------------------- the node's metrics


class FetchDurations:
    """Durations of ended fetches, taken from the exchange's fetch table (which keeps ended fetches)."""

    def __init__(self) -> None:
        self.by_outcome: dict[tuple[tuple[str, str], ...], Histogram] = {
            (("outcome", outcome),): Histogram() for outcome in ENDED_FETCH_STATES
        }
        self._seen: set[tuple[str, float]] = set()

    def update(self, fetches: Iterable[FetchProgress]) -> None:
        current = set()
        for progress in fetches:
            key = (progress.manifest_id, progress.started)
            current.add(key)
            if progress.state not in ENDED_FETCH_STATES or progress.finished is None or key in self._seen:
                continue
            self._seen.add(key)
            duration = max(0.0, progress.finished - progress.started)
            self.by_outcome[(("outcome", progress.state),)].observe(duration)
        # A fetch replaced in the table (restarted for the same manifest) cannot come back.
        self._seen &= current


class NodeMetrics:
    """The ``GET /metrics`` handler over a running Node."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.fetch_durations = FetchDurations()

    async def handle(self, request: Request) -> Response:
        return text_response(self.render(), content_type=CONTENT_TYPE)

    def render(self) -> str:
        out = Exposition()
        self._identity(out)
        self._training(out)
        self._peers(out)
        self._gossip(out)
        self._exchange(out)
        out.counter("events_dropped_total", "Events a slow event-stream subscriber missed.", self.node.events.dropped)
        return out.text()

    def _identity(self, out: Exposition) -> None:
        node, cfg = self.node, self.node.config
        peer_id = node.key.peer_id if node.key else ""
        info = {
            "peer_id": peer_id, "name": cfg.node.name or peer_id[-8:], "swarm": cfg.swarm.name,
            "role": cfg.training.role, "workload": cfg.workload.name,
        }
        out.gauge("info", "This peer: its id, name, swarm, role and workload (always 1).", 1, info)
        out.gauge("uptime_seconds", "Seconds since the daemon started.", round(time.time() - node.started_at, 3))

    def _training(self, out: Exposition) -> None:
        outer = self.node.outer
        heads = outer.heads if outer is not None else None
        head = heads.canonical() if heads is not None else None
        # The newest head on the canonical chain that someone has evaluated: a head just adopted
        # is evaluated a moment later, and the gauge should not blink out meanwhile.
        losses: list[float] = []
        evaluated_round = None
        if heads is not None and head is not None:
            for ancestor in heads.index.ancestors(head.id):
                losses = list(heads.eval.get(ancestor.id, {}).values())
                if losses:
                    evaluated_round = ancestor.round
                    break
        out.gauge("round", "The round this peer is working on.", outer.view.round if outer else None)
        out.gauge("head_round", "Round of the canonical head.", head.round if head else None)
        out.gauge("epoch", "Epoch of the canonical head.", head.epoch if head else None)
        out.gauge(
            "validation_loss",
            "Validation loss of the newest evaluated head of the canonical chain (mean over the peers that evaluated it).",
            sum(losses) / len(losses) if losses else None,
        )
        out.gauge("validation_loss_round", "Round of the head validation_loss was measured on.", evaluated_round)
        out.family(
            "samples_total", "counter", "Samples merged into the canonical chain.",
            [({}, head.samples_total)] if head else [],
        )
        out.gauge(
            "samples_per_second", f"Samples merged per second over the last {RATE_WINDOW_S:.0f} s of adopted heads.",
            self._samples_rate() if head else None,
        )
        if outer is None or heads is None:
            return
        out.counter("inner_seconds_total", "Seconds spent in inner-loop training.", round(outer.trainer.inner_seconds, 3))
        out.gauge("utilisation", "Share of wall time spent training (0..1).", round(outer.utilisation(), 4))
        out.counter("round_failures_total", "Rounds this peer gave up on.", outer.round_failures)
        out.counter("rounds_without_head_total", "Closed rounds whose every update the merge left out.",
                    outer.rounds_without_head)
        out.family(
            "update_rejections_total", "counter", "Pseudo-gradient updates rejected, by reason.",
            _by("reason", outer.update_rejections),
        )
        out.family("head_rejections_total", "counter", "Head records rejected, by reason.", _by("reason", heads.rejected))
        out.gauge("heads_known", "Heads in this peer's index.", len(heads.index))

    def _samples_rate(self) -> float:
        now = time.time()
        adopted = [e for e in self.node.events.recent() if e.kind == "head_adopted" and now - e.at <= RATE_WINDOW_S]
        if len(adopted) < 2:
            return 0.0
        first, last = adopted[0], adopted[-1]
        gained = float(last.data.get("samples_total", 0)) - float(first.data.get("samples_total", 0))
        return round(max(gained, 0) / max(now - first.at, 1e-3), 3)

    def _peers(self, out: Exposition) -> None:
        membership, bridge = self.node.membership, self.node.bridge
        rows = membership.peers_view() if membership is not None else []
        live = sum(1 for row in rows if row["alive"])
        out.family(
            "peers", "gauge", "Peers in the membership table, by liveness.",
            [({"state": "live"}, live), ({"state": "dead"}, len(rows) - live)],
        )
        out.gauge("peers_connected", "Peers with an open libp2p connection.", len(bridge.connected_peers()) if bridge else 0)
        out.family(
            "libp2p_stream_faults_total", "counter",
            "Inbound streams and messages whose bytes raised in libp2p, reset and dropped, by protocol:error.",
            _by("reason", bridge.stats.stream_faults if bridge else {}),
        )
        out.family(
            "peer_head_round", "gauge", "Round of the head each peer last reported holding.",
            [({"peer": row["peer_id"]}, row["round"]) for row in rows if isinstance(row.get("round"), int)],
        )

    def _gossip(self, out: Exposition) -> None:
        gossip = self.node.gossip
        if gossip is None:
            return
        stats = gossip.stats()
        out.family("gossip_records_accepted_total", "counter", "Valid gossip records received, by kind.",
                   _by("kind", stats["accepted"]))
        out.family("gossip_records_published_total", "counter", "Gossip records this peer published, by kind.",
                   _by("kind", stats["published"]))
        out.family("gossip_records_rejected_total", "counter", "Gossip records dropped, by reason.",
                   _by("reason", stats["rejected"]))
        out.counter("gossip_publish_failures_total", "Publishes the network refused.", stats["publish_failures"])
        out.counter("gossip_handler_errors_total", "Record handlers that raised (bugs).", stats["handler_errors"])
        bridge = self.node.bridge
        out.counter("gossip_rate_limited_total", "Gossip messages over their publisher's rate, neither delivered nor relayed.",
                    bridge.stats.gossip_rate_limited if bridge else 0)
        out.counter("gossip_publishers_banned_total", "Publishers cut off for a while for flooding far above their rate.",
                    bridge.stats.gossip_publishers_banned if bridge else 0)
        out.counter("gossip_dropped_queue_full_total", "Inbound gossip messages dropped on a full queue.",
                    stats["dropped_queue_full"])

    def _exchange(self, out: Exposition) -> None:
        exchange = self.node.exchange
        if exchange is None:
            return
        stats = exchange.stats
        out.family(
            "exchange_bytes_total", "counter", "Chunk bytes moved by the exchange, by direction.",
            [({"direction": "in"}, stats.bytes_in), ({"direction": "out"}, stats.bytes_out)],
        )
        out.family(
            "exchange_chunks_total", "counter", "Chunks moved by the exchange, by direction.",
            [({"direction": "in"}, stats.chunks_in), ({"direction": "out"}, stats.chunks_out)],
        )
        out.family(
            "exchange_content_bytes_total", "counter",
            "Content bytes moved by the exchange, by direction and kind (chunk, manifest, record).",
            [({"direction": "in", "kind": kind}, count) for kind, count in sorted(stats.bytes_in_by_kind.items())]
            + [({"direction": "out", "kind": kind}, count) for kind, count in sorted(stats.bytes_out_by_kind.items())],
        )
        out.counter("exchange_requests_served_total", "Exchange requests this peer answered.", stats.requests_served)
        out.counter("exchange_bad_requests_total", "Malformed exchange requests from peers.", stats.bad_requests)
        out.counter("exchange_busy_refusals_total", "Streams refused over the per-peer limit.", stats.busy_refusals)
        out.family("exchange_rejected_chunks_total", "counter", "Chunks that failed verification, by serving peer.",
                   _by("peer", stats.rejected_chunks_by_peer))
        out.family("exchange_timeouts_total", "counter", "Exchange requests that timed out, by peer.",
                   _by("peer", stats.timeouts_by_peer))
        fetches = list(exchange.fetches.values())
        out.gauge("fetches_in_flight", "Fetches starting or running.",
                  sum(1 for p in fetches if p.state in LIVE_FETCH_STATES))
        self.fetch_durations.update(fetches)
        out.histogram("fetch_duration_seconds", "Wall time of ended fetches, by outcome.",
                      self.fetch_durations.by_outcome)


def _by(label: str, counts: Mapping[str, int]) -> list[tuple[Labels, float]]:
    return [({label: key}, value) for key, value in sorted(counts.items())]
