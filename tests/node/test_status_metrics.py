"""Prometheus metrics: the text format parses strictly, and a training daemon's numbers are the real ones."""

from __future__ import annotations

import math
import re
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from prometheus_client import generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from node.exchange import FetchProgress
from node.metrics import FetchDurations, Histogram, counter, gauge, histogram
from protocol.exchange import FetchState
from tests.swarm_harness import Swarm, shared_swarm, training_swarm

# ---------------------------------------------------------------- a strict reader of the format

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"'
VALUE = r"[-+]?(?:[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?|Inf|NaN)"
SAMPLE = re.compile(rf"({NAME})(?:\{{((?:{LABEL})(?:,{LABEL})*)?\}})? ({VALUE})")
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


@dataclass
class Family:
    name: str
    type: str = ""
    help: str = ""
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)


def unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), text)


def parse_strictly(text: str) -> dict[str, Family]:
    """Families by name; fails on anything the 0.0.4 text format does not allow or that we never write."""
    assert text.endswith("\n"), "the exposition must end with a newline"
    families: dict[str, Family] = {}
    current: Family | None = None
    for number, line in enumerate(text[:-1].split("\n"), 1):
        where = f"line {number}: {line!r}"
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert re.fullmatch(NAME, name) and name not in families, where
            current = families[name] = Family(name, help=unescape(help_text))
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert current is not None and current.name == name and not current.type, f"TYPE without HELP: {where}"
            assert kind in TYPES, where
            current.type = kind
        else:
            found = SAMPLE.fullmatch(line)
            assert found and current is not None and current.type, f"not a sample of a typed family: {where}"
            name = found.group(1)
            allowed = {current.name}
            if current.type == "histogram":
                allowed = {f"{current.name}_bucket", f"{current.name}_sum", f"{current.name}_count"}
            assert name in allowed, f"sample outside its family {current.name}: {where}"
            labels = {k: unescape(v) for k, v in re.findall(LABEL, found.group(2) or "")}
            value = float(found.group(found.lastindex))  # type: ignore[arg-type]
            current.samples.append((name, labels, value))
    for family in families.values():
        if family.type == "counter":
            assert all(v >= 0 for _, _, v in family.samples), family
        if family.type == "histogram":
            check_histogram(family)
    return families


def check_histogram(family: Family) -> None:
    series: dict[tuple[tuple[str, str], ...], list[tuple[str, dict[str, str], float]]] = {}
    for name, labels, value in family.samples:
        key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        series.setdefault(key, []).append((name, labels, value))
    for key, samples in series.items():
        buckets = [(float(labels["le"]), value) for name, labels, value in samples if name.endswith("_bucket")]
        count = [value for name, _, value in samples if name.endswith("_count")]
        assert buckets and buckets[-1][0] == math.inf, f"{family.name}{key} lacks its +Inf bucket"
        assert [b for b, _ in buckets] == sorted(b for b, _ in buckets), f"{family.name}{key}: buckets out of order"
        assert all(a <= b for (_, a), (_, b) in zip(buckets, buckets[1:])), f"{family.name}{key}: not cumulative"
        assert count == [buckets[-1][1]], f"{family.name}{key}: _count differs from the +Inf bucket"


def values(families: dict[str, Family], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(labels.items())): value for _, labels, value in families[f"p2p_node_{name}"].samples}


# ---------------------------------------------------------------- the families on their own


@dataclass
class Families:
    """A collector of fixed families, to render some on their own."""

    families: tuple[Metric, ...]

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def exposition(*families: Metric) -> str:
    return generate_latest(Families(families)).decode()


def test_labels_and_help_survive_escaping() -> None:
    nasty = 'back\\slash "quoted"\nnew line'
    text = exposition(
        counter("odd_total", "Help with a \\ and a\nnewline.", labels=["reason"], rows=[([nasty], 3), (["x"], 0)]),
        gauge("unknown", "Not measured yet.", None),
        gauge("ratio", "A float.", 0.25),
        gauge("broken", "Not a number.", math.nan),
    )
    families = parse_strictly(text)
    assert families["p2p_node_odd_total"].help == "Help with a \\ and a\nnewline."
    assert values(families, "odd_total") == {(("reason", nasty),): 3.0, (("reason", "x"),): 0.0}
    assert families["p2p_node_unknown"].type == "gauge" and families["p2p_node_unknown"].samples == []
    assert values(families, "ratio") == {(): 0.25}
    assert math.isnan(values(families, "broken")[()])

    # The reference parser reads the same values (it names a counter's family without its _total).
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    assert {s.labels["reason"]: s.value for s in parsed["p2p_node_odd"].samples} == {nasty: 3.0, "x": 0.0}


def test_a_counter_keeps_its_total_name() -> None:
    families = parse_strictly(exposition(counter("events_dropped_total", "Missed.", 4)))
    assert list(families) == ["p2p_node_events_dropped_total"]
    assert families["p2p_node_events_dropped_total"].type == "counter"
    assert families["p2p_node_events_dropped_total"].samples == [("p2p_node_events_dropped_total", {}, 4.0)]


def test_histogram_buckets_are_cumulative_with_sum_and_count() -> None:
    hist = Histogram((0.1, 1.0, 10.0))
    for seconds in (0.05, 0.1, 0.7, 3.0, 500.0):
        hist.observe(seconds)
    families = parse_strictly(exposition(histogram("wait_seconds", "Waits.", "outcome", {"done": hist})))
    samples = {(n, labels.get("le")): v for n, labels, v in families["p2p_node_wait_seconds"].samples}
    assert samples == {
        ("p2p_node_wait_seconds_bucket", "0.1"): 2, ("p2p_node_wait_seconds_bucket", "1.0"): 3,
        ("p2p_node_wait_seconds_bucket", "10.0"): 4, ("p2p_node_wait_seconds_bucket", "+Inf"): 5,
        ("p2p_node_wait_seconds_sum", None): pytest.approx(503.85), ("p2p_node_wait_seconds_count", None): 5,
    }
    assert {labels["outcome"] for _, labels, _ in families["p2p_node_wait_seconds"].samples} == {"done"}


def test_fetch_durations_count_each_ended_fetch_once() -> None:
    durations = FetchDurations()
    done = FetchProgress("b3:" + "a" * 64, state=FetchState.DONE, started=100.0, finished=100.3)
    failed = FetchProgress("b3:" + "b" * 64, state=FetchState.FAILED, started=100.0, finished=107.0)
    running = FetchProgress("b3:" + "c" * 64, state=FetchState.FETCHING, started=100.0)
    for _ in range(3):  # every scrape sees the same table
        durations.update([done, failed, running])
    by_outcome = durations.by_outcome
    assert (by_outcome["done"].count, by_outcome["done"].sum) == (1, pytest.approx(0.3))
    assert (by_outcome["failed"].count, by_outcome["failed"].sum) == (1, pytest.approx(7.0))
    # The same manifest fetched again is a new fetch.
    durations.update([FetchProgress(done.manifest_id, state=FetchState.DONE, started=200.0, finished=200.1), failed])
    assert by_outcome["done"].count == 2


def test_an_ended_fetch_keeps_the_rate_of_its_own_duration() -> None:
    done = FetchProgress("b3:" + "a" * 64, state=FetchState.DONE, started=100.0, finished=102.0, fetched_bytes=8 << 20)
    assert done.view()["rate_bytes_per_s"] == 4 << 20  # not diluted by the time since it ended
    assert done.view()["eta_s"] is None


# ---------------------------------------------------------------- a training daemon


SHARED_SWARMS = ("operator-surfaces",)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    swarm = shared_swarm("operator-surfaces", lambda: training_swarm(tmp_path_factory.mktemp("ops"), 2, 4))
    yield swarm  # stopped by tests/node/conftest.py once no following module shares it


@pytest.mark.slow
def test_metrics_of_a_training_daemon(swarm: Swarm) -> None:
    peer, other = swarm.peers[:2]
    with urllib.request.urlopen(peer.url + "/metrics", timeout=5) as response:
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = response.read().decode()
    status = peer.get("/status")
    families = parse_strictly(text)
    assert all(f.help and f.type for f in families.values())

    info = values(families, "info")
    assert [dict(k)["peer_id"] for k in info] == [peer.peer_id] and list(info.values()) == [1]
    training = status["training"]
    head_round = values(families, "head_round")[()]
    assert 4 <= head_round <= training["head_round"]
    assert values(families, "round")[()] >= head_round
    assert values(families, "samples_total")[()] > 0 and values(families, "samples_per_second")[()] > 0
    loss = values(families, "validation_loss")[()]
    assert math.isfinite(loss) and loss > 0
    assert values(families, "inner_seconds_total")[()] > 0 and 0 < values(families, "utilisation")[()] <= 1

    assert values(families, "peers") == {(("state", "live"),): 1, (("state", "dead"),): 0}
    assert values(families, "peers_connected")[()] == 1
    assert values(families, "peer_head_round")[(("peer", other.peer_id),)] >= 1
    accepted = {dict(k)["kind"]: v for k, v in values(families, "gossip_records_accepted_total").items()}
    assert accepted["heartbeat"] > 0 and accepted["head"] > 0 and accepted["update"] > 0
    assert "p2p_node_gossip_records_rejected_total" in families
    assert "p2p_node_exchange_rejected_chunks_total" in families

    # Peers download each other's pseudo-gradients every round: bytes flow and fetches end.
    moved = {dict(k)["direction"]: v for k, v in values(families, "exchange_bytes_total").items()}
    assert moved["in"] > 0 and moved["out"] > 0
    # By kind: the chunk bytes are the same count; manifests and records come on top.
    by_kind = {(dict(k)["direction"], dict(k)["kind"]): v for k, v in values(families, "exchange_content_bytes_total").items()}
    assert by_kind[("in", "chunk")] == moved["in"] and by_kind[("out", "chunk")] == moved["out"], by_kind
    assert by_kind.get(("in", "manifest"), 0) + by_kind.get(("out", "manifest"), 0) > 0, by_kind
    assert values(families, "fetches_in_flight")[()] >= 0
    counts = {
        labels["outcome"]: value
        for name, labels, value in families["p2p_node_fetch_duration_seconds"].samples
        if name.endswith("_count")
    }
    assert counts["done"] > 0, text


# Every family /metrics exposes, as its TYPE line names it, with its type and label names ("le" aside).
FAMILIES = {
    "info": ("gauge", {"peer_id", "name", "swarm", "role", "workload"}),
    "uptime_seconds": ("gauge", set()),
    "round": ("gauge", set()),
    "head_round": ("gauge", set()),
    "epoch": ("gauge", set()),
    "validation_loss": ("gauge", set()),
    "validation_loss_round": ("gauge", set()),
    "samples_total": ("counter", set()),
    "samples_per_second": ("gauge", set()),
    "inner_seconds_total": ("counter", set()),
    "utilisation": ("gauge", set()),
    "round_failures_total": ("counter", set()),
    "rounds_without_head_total": ("counter", set()),
    "update_rejections_total": ("counter", {"reason"}),
    "head_rejections_total": ("counter", {"reason"}),
    "heads_known": ("gauge", set()),
    "peers": ("gauge", {"state"}),
    "peers_connected": ("gauge", set()),
    "libp2p_stream_faults_total": ("counter", {"reason"}),
    "peer_head_round": ("gauge", {"peer"}),
    "gossip_records_accepted_total": ("counter", {"kind"}),
    "gossip_records_published_total": ("counter", {"kind"}),
    "gossip_records_rejected_total": ("counter", {"reason"}),
    "gossip_publish_failures_total": ("counter", set()),
    "gossip_handler_errors_total": ("counter", set()),
    "gossip_rate_limited_total": ("counter", set()),
    "gossip_publishers_banned_total": ("counter", set()),
    "gossip_dropped_queue_full_total": ("counter", set()),
    "exchange_bytes_total": ("counter", {"direction"}),
    "exchange_chunks_total": ("counter", {"direction"}),
    "exchange_content_bytes_total": ("counter", {"direction", "kind"}),
    "exchange_requests_served_total": ("counter", set()),
    "exchange_bad_requests_total": ("counter", set()),
    "exchange_busy_refusals_total": ("counter", set()),
    "exchange_rejected_chunks_total": ("counter", {"peer"}),
    "exchange_timeouts_total": ("counter", {"peer"}),
    "fetches_in_flight": ("gauge", set()),
    "fetch_duration_seconds": ("histogram", {"outcome"}),
    "events_dropped_total": ("counter", set()),
}


@pytest.mark.slow
def test_every_family_keeps_its_name_type_and_labels(swarm: Swarm) -> None:
    with urllib.request.urlopen(swarm.peers[0].url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    exposed = {name.removeprefix("p2p_node_"): family for name, family in parse_strictly(text).items()}
    assert {name: family.type for name, family in exposed.items()} == {name: kind for name, (kind, _) in FAMILIES.items()}
    for name, (_, labels) in FAMILIES.items():
        for sample, sample_labels, _ in exposed[name].samples:
            assert set(sample_labels) - {"le"} == labels, (name, sample, sample_labels)
    # Counter samples keep the family's _total name (prometheus_client adds it to a name given without one).
    for name, family in exposed.items():
        if family.type == "counter":
            assert {sample for sample, _, _ in family.samples} <= {f"p2p_node_{name}"}, name

    # The reference parser reads the same families; it names a counter's family without its _total.
    parsed = {family.name: family for family in text_string_to_metric_families(text)}
    assert len(parsed) == len(FAMILIES)
    for name, (kind, _) in FAMILIES.items():
        reference = parsed[f"p2p_node_{name.removesuffix('_total') if kind == 'counter' else name}"]
        assert reference.type == kind, name
        assert [(s.name, s.labels) for s in reference.samples] == [(n, labels) for n, labels, _ in exposed[name].samples]
