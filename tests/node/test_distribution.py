"""Model distribution on real daemons: a consumer's export follows the canonical head fetching only
the chunks that changed, and a bf16 variant of each head is announced and served as safetensors.

The swarm trains tiny with a large frozen first layer (4 MiB of fp32: four whole 1 MiB chunks
that never change) and a small trainable output layer, so a new head differs from the last in
one chunk of its weights.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.swarm_harness import ONE_THREAD, Peer, Swarm, logs_on_failure, shared_swarm, training, wait_until

pytestmark = pytest.mark.slow

FEATURES = HIDDEN = 1024
FROZEN_BYTES = FEATURES * HIDDEN * 4  # hidden.weight, fp32
WORKLOAD = f"""
[workload]
name = "tiny"

[workload.options]
features = {FEATURES}
hidden = {HIDDEN}
freeze = ["hidden"]
microshards = 16
examples_per_microshard = 32
val_examples = 128

[training]
inner_steps = 10
head_reannounce_s = 1.0
{{training}}
"""
# Trainer 1 also publishes a bf16 variant of every head it adopts.
TRAINERS = (WORKLOAD.format(training='publish_variants = ["bf16"]'), WORKLOAD.format(training=""))
HEARTBEAT_S = 0.5


def make_swarm(root: Path) -> Swarm:
    """Two trainers of the frozen-layer workload, returned once their head reaches round 2."""
    swarm = Swarm(root)
    try:
        peers = [swarm.add(toml, heartbeat_s=HEARTBEAT_S) for toml in TRAINERS]
        for peer in peers:
            peer.start(extra_env=ONE_THREAD)
        for peer in peers:
            peer.wait_healthy(60)
        wait_until(lambda: all(training(p).get("head_round", 0) >= 2 for p in peers), 90, what="round 2")
    except BaseException:
        print(swarm.logs())
        swarm.stop_all()
        raise
    return swarm


def distribution_swarm(tmp_path_factory: pytest.TempPathFactory) -> Swarm:
    """One such swarm per test session, shared with test_convergence (each module adds its own consumer)."""
    return shared_swarm("distribution", lambda: make_swarm(tmp_path_factory.mktemp("distribution")))


def consumer_toml(**training: Any) -> str:
    lines = ['role = "consumer"', 'verify = "trust"']
    lines += [f"{key} = {json.dumps(value)}" for key, value in training.items()]
    return WORKLOAD.format(training="\n".join(lines))




def download(peer: Peer, path: str, target: Path) -> int:
    """GET ``path`` into ``target``; the HTTP status (the body is kept only on 200)."""
    try:
        with urllib.request.urlopen(peer.url + path, timeout=60) as response:
            target.write_bytes(response.read())
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


SHARED_SWARMS = ("distribution",)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    swarm = distribution_swarm(tmp_path_factory)
    yield swarm  # stopped by tests/node/conftest.py once no following module shares it


def test_consumer_export_follows_new_heads_and_fetches_only_changed_chunks(swarm: Swarm, tmp_path: Path) -> None:
    trainer = swarm.peers[0]
    export = tmp_path / "export"
    consumer = swarm.add(consumer_toml(export_dir=str(export)), heartbeat_s=HEARTBEAT_S)
    consumer.start(extra_env=ONE_THREAD)
    with logs_on_failure(swarm):
        consumer.wait_healthy(60)

        def exported() -> dict[str, Any] | None:
            try:
                info = json.loads((export / "head.json").read_text())
            except (OSError, ValueError):
                return None
            return info if info["round"] >= 1 else None

        first = wait_until(exported, 60, what="the consumer's first export")
        second = wait_until(lambda: (info := exported()) and info["round"] > first["round"] and info, 60,
                            what="the export moves to a newer head")

        # The export file is the newer head's weights, exactly as the trainers hold them.
        def consistent_export() -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
            info = exported()
            with safe_open(str(export / "model.safetensors"), "pt") as handle:
                artifact = (handle.metadata() or {}).get("artifact")
            tensors = load_file(str(export / "model.safetensors"))
            return (info, tensors) if info and artifact == info["manifest"] else None

        info, tensors = wait_until(consistent_export, 20, what="model.safetensors and head.json agree")
        assert info["round"] >= second["round"] and info["variant"] == "fp32"
        head = trainer.get(f"/heads/{info['head']}")
        assert head is not None and head["record"]["weights"] == info["manifest"]
        fp32 = tmp_path / "trainer.safetensors"
        assert download(trainer, f"/heads/{info['head']}/weights", fp32) == 200
        reference = load_file(str(fp32))
        assert sorted(tensors) == sorted(reference) == ["hidden.bias", "hidden.weight", "out.bias", "out.weight"]
        for name in reference:
            assert torch.equal(tensors[name], reference[name]), name

        # What the consumer downloaded for the newer head's weights: the changed chunk, not the model.
        fetches = {row["manifest_id"]: row for row in consumer.get("/fetches")["fetches"]}
        row = fetches.get(second["manifest"])
        assert row is not None and row["state"] == "done", f"no fetch of {second['manifest']}: {sorted(fetches)}"
        assert row["total_bytes"] > FROZEN_BYTES and row["total_chunks"] >= 5
        assert row["have_bytes"] == row["total_bytes"]
        assert 0 < row["fetched_bytes"] <= row["total_bytes"] // 8, row
        print(f"second head: fetched {row['fetched_bytes']} of {row['total_bytes']} weight bytes")
        # Over every head it followed (weights and momentum), the consumer fetched less than one
        # copy of the model in all: it derived the frozen chunks from genesis like every peer.
        followed = [r for r in fetches.values() if r["state"] == "done"]
        bytes_in = consumer.get("/exchange")["bytes_in"]
        assert len(followed) >= 4 and bytes_in < row["total_bytes"], (bytes_in, len(followed))


def test_bf16_variant_is_announced_and_served_as_rounded_weights(swarm: Swarm, tmp_path: Path) -> None:
    publisher, other = swarm.peers[0], swarm.peers[1]
    with logs_on_failure(swarm):

        def announced() -> tuple[str, str] | None:
            head = training(publisher).get("head")
            body = other.get(f"/heads/{head}/variants") if head else None
            bf16 = (body or {}).get("variants", {}).get("bf16", {})
            for manifest, peers in bf16.items():
                if publisher.peer_id in peers:
                    return head, manifest
            return None

        head, manifest = wait_until(announced, 30, what="a bf16 variant announced to the other trainer")
        variants = other.get(f"/heads/{head}/variants")["variants"]
        assert variants["fp32"] == {other.get(f"/heads/{head}")["record"]["weights"]: ["(canonical)"]}

        fp32_file, bf16_file, fetched_file = (tmp_path / f"{n}.safetensors" for n in ("fp32", "bf16", "fetched"))
        assert download(publisher, f"/heads/{head}/weights", fp32_file) == 200
        assert download(publisher, f"/heads/{head}/weights?variant=bf16", bf16_file) == 200
        # The other trainer never derived a bf16 copy: it fetches the announced one from the publisher.
        assert download(other, f"/heads/{head}/weights?variant=bf16", fetched_file) == 200
        fp32, bf16, fetched = (load_file(str(f)) for f in (fp32_file, bf16_file, fetched_file))
        with safe_open(str(bf16_file), "pt") as handle:
            assert (handle.metadata() or {}).get("artifact") == manifest
        assert sorted(bf16) == sorted(fp32) == sorted(fetched)
        for name, weights in fp32.items():
            assert weights.dtype == torch.float32
            assert bf16[name].dtype == torch.bfloat16, (name, bf16[name].dtype)
            assert torch.equal(bf16[name], weights.to(torch.bfloat16)), name
            assert torch.equal(fetched[name], bf16[name]), name
            assert torch.allclose(bf16[name].float(), weights, rtol=2**-8, atol=0), name
        assert bf16_file.stat().st_size < 0.6 * fp32_file.stat().st_size

        # Asking for what does not exist.
        assert download(publisher, f"/heads/{head}/weights?variant=int8", tmp_path / "x") == 404
        assert download(publisher, f"/heads/{head}/weights?variant=fp16", tmp_path / "x") == 400
        assert download(publisher, "/heads/b3:" + "0" * 64 + "/weights?variant=bf16", tmp_path / "x") == 404
