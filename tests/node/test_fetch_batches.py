"""How a fetch cuts its work into requests (``_FetchRun.pick``), on a real artifact in a real
store: no request takes more than ``batch_bytes``, nor more than an even share of what is left
among the fetch's streams, so near the end every provider gets some of the rest instead of one
of them holding a whole batch while the others idle (``bench/bench_exchange_links.py``)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from node.artifacts import store_artifact
from node.exchange import Exchange, ExchangeSettings, FetchProgress, _FetchRun
from node.fanout import NARROW, WIDE, FanOut, Verdict
from node.libp2p import Libp2pBridge
from node.store import ContentStore

MIB = 1 << 20


def fetch_run(
    tmp_path: Path, mib: int, batch_bytes: int, providers: list[str], streams: int, width: str = WIDE
) -> _FetchRun:
    generator = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(1024, 1024, generator=generator) for i in range(mib // 4)}
    store = ContentStore(tmp_path / "store")
    manifest = store.get_manifest(store_artifact(store, tensors))
    assert manifest is not None
    # The bridge is only asked for its peer id (not started): pick ranks chunks by it.
    bridge = Libp2pBridge(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"], kademlia=False)
    settings = ExchangeSettings(batch_bytes=batch_bytes)
    exchange = Exchange(bridge, store, availability=None, settings=settings)  # type: ignore[arg-type]
    run = _FetchRun(exchange, manifest, FetchProgress(manifest.artifact_id), FanOut(start=width, adaptive=False))
    run.pending = set(run.sizes)
    for peer in providers:
        run.has[peer] = None  # a seed: it holds every chunk
        run.workers[peer] = streams
    return run


def test_a_lone_stream_takes_whole_batches(tmp_path: Path) -> None:
    run = fetch_run(tmp_path, 32, 16 * MIB, ["seed"], streams=1)
    assert [len(run.pick("seed")) for _ in range(3)] == [16, 16, 0]


def test_streams_take_at_most_an_even_share_of_what_is_left(tmp_path: Path) -> None:
    seeds = ["a", "b", "c"]
    run = fetch_run(tmp_path, 64, 16 * MIB, seeds, streams=2)
    sizes = []
    while True:
        batches = [run.pick(seed) for seed in seeds for _ in range(2)]
        if not any(batches):
            break
        sizes.append([len(batch) for batch in batches])
    # 64 chunks over six streams: at most ceil(64 / 6) = 11 each at first, never 16.
    assert max(sizes[0]) <= 11
    assert sum(map(sum, sizes)) == 64
    # Every stream got work, so every seed's link carries part of the artifact.
    assert all(size > 0 for size in sizes[0])
    # Each pick left something for the other streams: no stream took more than its share.
    taken = 0
    for round_sizes in sizes:
        for size in round_sizes:
            left = 64 - taken
            assert size <= -(-left // 6) or size == 1
            taken += size


def test_a_dropped_provider_does_not_count_among_the_streams(tmp_path: Path) -> None:
    run = fetch_run(tmp_path, 32, 16 * MIB, ["a", "b"], streams=2)
    run.dropped.add("b")
    assert len(run.pick("a")) == 16  # two live streams: an even share is 16 of 32


def test_a_narrow_fetch_draws_on_one_provider_until_it_drops_out(tmp_path: Path) -> None:
    seeds = ["a", "b", "c"]
    run = fetch_run(tmp_path, 32, 4 * MIB, seeds, streams=2, width=NARROW)
    admitted = [seed for seed in seeds if run.available(seed)]
    assert len(admitted) == 1
    focus = admitted[0]
    assert all(run.pick(seed) == [] for seed in seeds if seed != focus)
    assert len(run.pick(focus)) == 4
    # The focus goes (timed out, banned): the next provider takes over, and only that one.
    run.dropped.add(focus)
    admitted = [seed for seed in seeds if run.available(seed)]
    assert len(admitted) == 1 and admitted[0] != focus
    assert len(run.pick(admitted[0])) == 4


def test_a_narrow_fetch_draws_on_the_provider_that_sent_the_most(tmp_path: Path) -> None:
    seeds = ["a", "b", "c"]
    run = fetch_run(tmp_path, 32, 4 * MIB, seeds, streams=2, width=NARROW)
    # While wide, "c" delivered the most: its link or its CPU is the fastest of the three.
    for peer, chunks in (("a", 2), ("b", 3), ("c", 6)):
        for _ in range(chunks):
            run.answered(peer, MIB, data=True)
    assert [seed for seed in seeds if run.available(seed)] == ["c"]


def test_a_narrow_fetch_prefers_a_seed_to_a_partial_holder(tmp_path: Path) -> None:
    run = fetch_run(tmp_path, 16, 4 * MIB, ["seed"], streams=1, width=NARROW)
    run.has["partial"] = set(list(run.sizes)[:8])
    assert run.available("seed") and not run.available("partial")


def test_a_narrow_fetch_prefers_a_seed_it_is_connected_to(tmp_path: Path, monkeypatch) -> None:
    seeds = ["a", "b", "c"]
    # Of three seeds, one is connected (the others were learnt from the DHT, and may be gone):
    # whichever it is, the fetch draws on it.
    for connected in seeds:
        run = fetch_run(tmp_path / connected, 16, 4 * MIB, seeds, streams=1, width=NARROW)
        monkeypatch.setattr(run.exchange.bridge, "connected_peers", lambda c=connected: [c])
        assert [seed for seed in seeds if run.available(seed)] == [connected]
        run.dropped.add(connected)  # it leaves: the fetch moves on to one of the others
        assert sum(1 for seed in seeds if run.available(seed)) == 1 and not run.available(connected)


def test_a_wide_fetch_draws_on_every_provider(tmp_path: Path) -> None:
    seeds = ["a", "b", "c"]
    run = fetch_run(tmp_path, 32, 4 * MIB, seeds, streams=2, width=WIDE)
    assert all(run.available(seed) and run.pick(seed) for seed in seeds)


def test_an_adaptive_fetch_starts_with_the_last_answer_while_it_is_fresh(tmp_path: Path) -> None:
    run = fetch_run(tmp_path, 4, 4 * MIB, ["a"], streams=1)
    exchange = run.exchange
    seeds = frozenset({"a", "b", "c"})
    assert exchange._fan_out(seeds).width == NARROW  # nothing learnt yet: one provider first
    due = Verdict(WIDE, 0.0, 10.0)  # its check is due: the next fetch compares again
    exchange._fan_out_learnt = (due, seeds, time.monotonic())
    fan_out = exchange._fan_out(seeds)
    assert fan_out.width == WIDE and fan_out.chosen is None
    # A minute on, with no fetch long enough to compare again, it starts on one provider again.
    exchange._fan_out_learnt = (due, seeds, time.monotonic() - 61.0)
    assert exchange._fan_out(seeds).width == NARROW
    assert exchange._fan_out(seeds).load is not None  # the receiver's load is measured


def test_a_fetch_from_the_same_providers_keeps_a_standing_answer(tmp_path: Path) -> None:
    run = fetch_run(tmp_path, 4, 4 * MIB, ["a"], streams=1)
    exchange = run.exchange
    seeds = frozenset({"a", "b", "c"})
    standing = Verdict(NARROW, time.monotonic() + 20.0, 20.0)
    exchange._fan_out_learnt = (standing, seeds, time.monotonic())
    kept = exchange._fan_out(seeds)
    assert kept.width == NARROW and kept.chosen == NARROW
    # It draws narrow with no comparison windows while the answer stands.
    now = time.monotonic()
    for i in range(64):
        assert not kept.received(now + i * 0.01, MIB, in_flight=8 * MIB)
    assert kept.comparisons == 0 and kept.standing() == standing
    # Other providers (a new seed among them) were never measured: the fetch compares.
    other = exchange._fan_out(seeds | {"d"})
    assert other.width == NARROW and other.chosen is None
    # An answer measured as due for a check is not kept either.
    exchange._fan_out_learnt = (Verdict(NARROW, 0.0, 10.0), seeds, time.monotonic())
    assert exchange._fan_out(seeds).chosen is None
