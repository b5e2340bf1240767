"""Prometheus metrics for the status port: the node's counters as a prometheus_client collector."""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from node.http import Request, Response, text_response
from protocol.exchange import FETCH_OUTCOMES

if TYPE_CHECKING:
    from node.daemon import Node
    from node.exchange import FetchProgress

# generate_latest writes the 0.0.4 text format, and prometheus_client's own handlers serve it under this
# type; its CONTENT_TYPE_LATEST names 1.0.0, the format with UTF-8 metric names, which these names do not need.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "p2p_node_"
FETCH_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
RATE_WINDOW_S = 60.0

Rows = Iterable[tuple[Sequence[str], float]]
Family = TypeVar("Family", GaugeMetricFamily, CounterMetricFamily)


# ---------------------------------------------------------------- metric families


def gauge(name: str, help: str, value: float | None = None, labels: Sequence[str] = (), rows: Rows = ()) -> GaugeMetricFamily:
    """A gauge: one unlabelled ``value`` (None, not known yet, gives the family with no sample) or labelled ``rows``."""
    return _family(GaugeMetricFamily, name, help, value, labels, rows)


def counter(name: str, help: str, value: float | None = None, labels: Sequence[str] = (), rows: Rows = ()) -> CounterMetricFamily:
    """A counter as ``gauge``; ``name`` ends in ``_total``, which prometheus_client writes back on every line."""
    return _family(CounterMetricFamily, name, help, value, labels, rows)


def _family(kind: type[Family], name: str, help: str, value: float | None, labels: Sequence[str], rows: Rows) -> Family:
    family = kind(PREFIX + name, help, value=value, labels=labels or None)
    for label_values, sample in rows:
        family.add_metric(label_values, sample)
    return family


def by_key(counts: Mapping[str, float]) -> Rows:
    """Rows of a family with one label, sorted by its value."""
    return [([key], value) for key, value in sorted(counts.items())]


@dataclass
class Histogram:
    """Counts of observations at or under each bound (made cumulative for the exposition)."""

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

    def cumulative(self) -> Sequence[tuple[str, float]]:
        """(le, observations at or under it) pairs ending with +Inf, as HistogramMetricFamily takes them."""
        running = itertools.accumulate(self.counts)
        return [(repr(float(bound)), total) for bound, total in zip(self.buckets, running)] + [("+Inf", self.count)]


def histogram(name: str, help: str, label: str, series: Mapping[str, Histogram]) -> HistogramMetricFamily:
    """A histogram family with one series per value of ``label``."""
    family = HistogramMetricFamily(PREFIX + name, help, labels=[label])
    for key, hist in sorted(series.items()):
        family.add_metric([key], hist.cumulative(), hist.sum)
    return family


# ---------------------------------------------------------------- the node's metrics


class FetchDurations:
    """Durations of ended fetches, taken from the exchange's fetch table (which keeps ended fetches)."""

    def __init__(self) -> None:
        self.by_outcome: dict[str, Histogram] = {outcome.value: Histogram() for outcome in FETCH_OUTCOMES}
        self._seen: set[tuple[str, float]] = set()

    def update(self, fetches: Iterable[FetchProgress]) -> None:
        current = set()
        for progress in fetches:
            key = (progress.manifest_id, progress.started)
            current.add(key)
            if progress.state not in FETCH_OUTCOMES or progress.finished is None or key in self._seen:
                continue
            self._seen.add(key)
            duration = max(0.0, progress.finished - progress.started)
            self.by_outcome[progress.state.value].observe(duration)
        # A fetch replaced in the table (restarted for the same manifest) cannot come back.
        self._seen &= current


class NodeCollector(Collector):
    """The node's counters, read afresh at each scrape."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.fetch_durations = FetchDurations()

    def collect(self) -> Iterator[Metric]:
        yield from self._identity()
        yield from self._training()
        yield from self._peers()
        yield from self._gossip()
        yield from self._exchange()
        yield counter("events_dropped_total", "Events a slow event-stream subscriber missed.", self.node.events.dropped)

    def _identity(self) -> Iterator[Metric]:
        node, cfg = self.node, self.node.config
        peer_id = node.key.peer_id if node.key else ""
        info = {
            "peer_id": peer_id, "name": cfg.node.name or peer_id[-8:], "swarm": cfg.swarm.name,
            "role": cfg.training.role, "workload": cfg.workload.name,
        }
        # prometheus_client appends "_info" and writes it as a gauge of 1: p2p_node_info.
        yield InfoMetricFamily(PREFIX.rstrip("_"), "This peer: its id, name, swarm, role and workload (always 1).", info)
        yield gauge("uptime_seconds", "Seconds since the daemon started.", round(time.time() - node.started_at, 3))

    def _training(self) -> Iterator[Metric]:
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
        yield gauge("round", "The round this peer is working on.", outer.view.round if outer else None)
        yield gauge("head_round", "Round of the canonical head.", head.round if head else None)
        yield gauge("epoch", "Epoch of the canonical head.", head.epoch if head else None)
        yield gauge(
            "validation_loss",
            "Validation loss of the newest evaluated head of the canonical chain (mean over the peers that evaluated it).",
            sum(losses) / len(losses) if losses else None,
        )
        yield gauge("validation_loss_round", "Round of the head validation_loss was measured on.", evaluated_round)
        yield counter("samples_total", "Samples merged into the canonical chain.", head.samples_total if head else None)
        yield gauge(
            "samples_per_second", f"Samples merged per second over the last {RATE_WINDOW_S:.0f} s of adopted heads.",
            self._samples_rate() if head else None,
        )
        if outer is None or heads is None:
            return
        yield counter("inner_seconds_total", "Seconds spent in inner-loop training.", round(outer.trainer.inner_seconds, 3))
        yield gauge("utilisation", "Share of wall time spent training (0..1).", round(outer.utilisation(), 4))
        yield counter("round_failures_total", "Rounds this peer gave up on.", outer.round_failures)
        yield counter("rounds_without_head_total", "Closed rounds whose every update the merge left out.",
                      outer.rounds_without_head)
        yield counter("update_rejections_total", "Pseudo-gradient updates rejected, by reason.",
                      labels=["reason"], rows=by_key(outer.update_rejections))
        yield counter("head_rejections_total", "Head records rejected, by reason.",
                      labels=["reason"], rows=by_key(heads.rejected))
        yield gauge("heads_known", "Heads in this peer's index.", len(heads.index))

    def _samples_rate(self) -> float:
        now = time.time()
        adopted = [e for e in self.node.events.recent() if e.kind == "head_adopted" and now - e.at <= RATE_WINDOW_S]
        if len(adopted) < 2:
            return 0.0
        first, last = adopted[0], adopted[-1]
        gained = float(last.data.get("samples_total", 0)) - float(first.data.get("samples_total", 0))
        return round(max(gained, 0) / max(now - first.at, 1e-3), 3)

    def _peers(self) -> Iterator[Metric]:
        membership, bridge = self.node.membership, self.node.bridge
        rows = membership.peers_view() if membership is not None else []
        live = sum(1 for row in rows if row["alive"])
        yield gauge("peers", "Peers in the membership table, by liveness.",
                    labels=["state"], rows=[(["live"], live), (["dead"], len(rows) - live)])
        yield gauge("peers_connected", "Peers with an open libp2p connection.",
                    len(bridge.connected_peers()) if bridge else 0)
        yield counter(
            "libp2p_stream_faults_total",
            "Inbound streams and messages whose bytes raised in libp2p, reset and dropped, by protocol:error.",
            labels=["reason"], rows=by_key(bridge.stats.stream_faults if bridge else {}),
        )
        yield gauge(
            "peer_head_round", "Round of the head each peer last reported holding.", labels=["peer"],
            rows=[([row["peer_id"]], row["round"]) for row in rows if isinstance(row.get("round"), int)],
        )

    def _gossip(self) -> Iterator[Metric]:
        gossip = self.node.gossip
        if gossip is None:
            return
        stats = gossip.stats()
        yield counter("gossip_records_accepted_total", "Valid gossip records received, by kind.",
                      labels=["kind"], rows=by_key(stats["accepted"]))
        yield counter("gossip_records_published_total", "Gossip records this peer published, by kind.",
                      labels=["kind"], rows=by_key(stats["published"]))
        yield counter("gossip_records_rejected_total", "Gossip records dropped, by reason.",
                      labels=["reason"], rows=by_key(stats["rejected"]))
        yield counter("gossip_publish_failures_total", "Publishes the network refused.", stats["publish_failures"])
        yield counter("gossip_handler_errors_total", "Record handlers that raised (bugs).", stats["handler_errors"])
        bridge = self.node.bridge
        yield counter("gossip_rate_limited_total", "Gossip messages over their publisher's rate, neither delivered nor relayed.",
                      bridge.stats.gossip_rate_limited if bridge else 0)
        yield counter("gossip_publishers_banned_total", "Publishers cut off for a while for flooding far above their rate.",
                      bridge.stats.gossip_publishers_banned if bridge else 0)
        yield counter("gossip_dropped_queue_full_total", "Inbound gossip messages dropped on a full queue.",
                      stats["dropped_queue_full"])

    def _exchange(self) -> Iterator[Metric]:
        exchange = self.node.exchange
        if exchange is None:
            return
        stats = exchange.stats
        yield counter("exchange_bytes_total", "Chunk bytes moved by the exchange, by direction.",
                      labels=["direction"], rows=[(["in"], stats.bytes_in), (["out"], stats.bytes_out)])
        yield counter("exchange_chunks_total", "Chunks moved by the exchange, by direction.",
                      labels=["direction"], rows=[(["in"], stats.chunks_in), (["out"], stats.chunks_out)])
        yield counter(
            "exchange_content_bytes_total",
            "Content bytes moved by the exchange, by direction and kind (chunk, manifest, record).",
            labels=["direction", "kind"],
            rows=[(["in", kind], count) for kind, count in sorted(stats.bytes_in_by_kind.items())]
            + [(["out", kind], count) for kind, count in sorted(stats.bytes_out_by_kind.items())],
        )
        yield counter("exchange_requests_served_total", "Exchange requests this peer answered.", stats.requests_served)
        yield counter("exchange_bad_requests_total", "Malformed exchange requests from peers.", stats.bad_requests)
        yield counter("exchange_busy_refusals_total", "Streams refused over the per-peer limit.", stats.busy_refusals)
        yield counter("exchange_rejected_chunks_total", "Chunks that failed verification, by serving peer.",
                      labels=["peer"], rows=by_key(stats.rejected_chunks_by_peer))
        yield counter("exchange_timeouts_total", "Exchange requests that timed out, by peer.",
                      labels=["peer"], rows=by_key(stats.timeouts_by_peer))
        fetches = list(exchange.fetches.values())
        yield gauge("fetches_in_flight", "Fetches starting or running.",
                    sum(1 for p in fetches if not p.state.ended))
        self.fetch_durations.update(fetches)
        yield histogram("fetch_duration_seconds", "Wall time of ended fetches, by outcome.", "outcome",
                        self.fetch_durations.by_outcome)


class NodeMetrics:
    """The ``GET /metrics`` handler: the node's collector on a registry of its own."""

    def __init__(self, node: Node) -> None:
        self.collector = NodeCollector(node)
        # Not the default registry: libp2p registers its own metrics there, and this page is the node's.
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)

    async def handle(self, request: Request) -> Response:
        return text_response(self.render(), content_type=CONTENT_TYPE)

    def render(self) -> str:
        return generate_latest(self.registry).decode()
