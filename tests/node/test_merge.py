"""The deterministic merge: outer step arithmetic, robust rules, screening, and byte-identical heads across processes."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from node.artifacts import load_artifact, read_stream, store_artifact
from node.merge import UpdateInput, merge, outer_rule
from node.store import ContentStore
from protocol.cid import content_id
from protocol.codecs import BF16, FP32, INT8
from protocol.heads import HeadRecord

REPO = Path(__file__).resolve().parents[2]


def rule(name: str = "mean", lr: float = 0.7, momentum: float = 0.9, nesterov: bool = True,
         trim: float = 0.2, outlier: float = 0.0):
    return outer_rule(name, lr, momentum, nesterov, trim, outlier)


def tensors(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "hidden.weight": torch.randn(64, 33, generator=generator) * scale,
        "hidden.bias": torch.randn(64, generator=generator) * scale,
        "out.weight": torch.randn(5, 64, generator=generator) * scale,
    }


def updates(*deltas: dict[str, torch.Tensor] | None, samples: list[int] | None = None) -> list[UpdateInput]:
    counts = samples or [64] * len(deltas)
    return [UpdateInput(f"b3:{i:064x}", n, d) for i, (d, n) in enumerate(zip(deltas, counts))]


def constant(value: float, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, value) for k, v in like.items()}


# ---- the outer step ------------------------------------------------------------------


def test_lr_one_and_no_momentum_is_the_sample_weighted_average_of_the_trained_models():
    weights = tensors(0)
    deltas = [tensors(s, 0.1) for s in (1, 2, 3)]
    samples = [64, 128, 192]
    result = merge(weights, None, updates(*deltas, samples=samples), rule(lr=1.0, momentum=0.0))
    assert result is not None
    for name, weight in weights.items():
        trained = [weight - d[name] for d in deltas]
        average = sum(t * n for t, n in zip(trained, samples)) / sum(samples)
        torch.testing.assert_close(result.weights[name], average, rtol=0, atol=1e-6)
        torch.testing.assert_close(result.momentum[name], weight - average, rtol=0, atol=1e-6)


@pytest.mark.parametrize("nesterov", [True, False])
def test_momentum_step_matches_a_hand_computation(nesterov):
    weights = {"w": torch.tensor([1.0, -2.0])}
    momentum = {"w": torch.tensor([0.5, 0.25])}
    deltas = [{"w": torch.tensor([0.1, 0.3])}, {"w": torch.tensor([0.3, -0.1])}]
    result = merge(weights, momentum, updates(*deltas), rule(lr=0.7, momentum=0.9, nesterov=nesterov))
    assert result is not None
    grad = [0.2, 0.1]
    buffer = [0.9 * 0.5 + 0.2, 0.9 * 0.25 + 0.1]  # 0.65, 0.325
    step = [g + 0.9 * b for g, b in zip(grad, buffer)] if nesterov else buffer
    expected = [w - 0.7 * s for w, s in zip([1.0, -2.0], step)]  # Nesterov: 0.4505, -2.27775
    assert result.momentum["w"].tolist() == pytest.approx(buffer, abs=1e-6)
    assert result.weights["w"].tolist() == pytest.approx(expected, abs=1e-6)
    assert result.weights["w"].dtype == torch.float32


def test_trimmed_mean_is_not_moved_by_one_extreme_update():
    weights = tensors(0)
    honest = [constant(v, weights) for v in (0.1, 0.2, 0.3, 0.4)]
    trimmed = rule("trimmed_mean", lr=1.0, momentum=0.0, trim=0.2)  # 5 updates: one cut from each end
    small = merge(weights, None, updates(*honest, constant(50.0, weights)), trimmed)
    huge = merge(weights, None, updates(*honest, constant(5e6, weights)), trimmed)
    assert small is not None and huge is not None
    for name, weight in weights.items():
        assert torch.equal(small.weights[name], huge.weights[name])
        torch.testing.assert_close(small.weights[name], weight - 0.3, rtol=0, atol=1e-6)  # mean of .2 .3 .4
    plain = merge(weights, None, updates(*honest, constant(50.0, weights)), rule(lr=1.0, momentum=0.0))
    assert plain is not None
    assert not torch.allclose(plain.weights["out.weight"], small.weights["out.weight"])


def test_median_takes_the_middle_value_or_the_mean_of_the_middle_two():
    weights = {"w": torch.zeros(3)}
    values = [[1.0, 9.0, -4.0], [2.0, -7.0, 0.0], [100.0, 0.5, 3.0]]
    odd = merge(weights, None, updates(*({"w": torch.tensor(v)} for v in values)), rule("median", 1.0, 0.0))
    assert odd is not None
    assert odd.weights["w"].tolist() == [-2.0, -0.5, -0.0]
    values.append([3.0, 1.0, 1.0])
    even = merge(weights, None, updates(*({"w": torch.tensor(v)} for v in values)), rule("median", 1.0, 0.0))
    assert even is not None
    assert even.weights["w"].tolist() == [-2.5, -0.75, -0.5]


# ---- screening -----------------------------------------------------------------------


def test_bad_updates_are_excluded_with_their_reason_in_any_input_order():
    weights = tensors(0)
    good = [tensors(s, 0.01) for s in (1, 2, 3, 4)]
    nan = tensors(5, 0.01)
    nan["hidden.bias"][3] = float("nan")
    inf = tensors(6, 0.01)
    inf["out.weight"][0, 0] = float("inf")
    wrong_shape = {**tensors(7, 0.01), "out.weight": torch.zeros(4, 64)}
    missing = {k: v for k, v in tensors(8, 0.01).items() if k != "hidden.bias"}
    wild = tensors(9, 10.0)  # a thousand times the others' norm
    inputs = updates(*good, nan, inf, wrong_shape, missing, None, wild)
    expected = sorted([
        (inputs[4].update_id, "non_finite"), (inputs[5].update_id, "non_finite"),
        (inputs[6].update_id, "wrong_shapes"), (inputs[7].update_id, "wrong_shapes"),
        (inputs[8].update_id, "undecodable"), (inputs[9].update_id, "norm_outlier"),
    ])
    screened = rule(outlier=5.0)
    first = merge(weights, tensors(10, 0.001), inputs, screened)
    assert first is not None
    assert list(first.excluded) == expected
    assert first.included == tuple(u.update_id for u in inputs[:4])
    only_good = merge(weights, tensors(10, 0.001), inputs[:4], screened)
    assert only_good is not None
    shuffled = list(inputs)
    random.Random(3).shuffle(shuffled)
    second = merge(weights, tensors(10, 0.001), shuffled, screened)
    assert second is not None
    assert second.excluded == first.excluded and second.included == first.included
    for result in (second, only_good):
        for name in weights:
            assert torch.equal(result.weights[name], first.weights[name])
            assert torch.equal(result.momentum[name], first.momentum[name])


def test_a_round_whose_every_update_is_excluded_merges_to_nothing():
    weights = tensors(0)
    nan = constant(float("nan"), weights)
    assert merge(weights, None, updates(nan, None), rule()) is None


# ---- determinism across processes ----------------------------------------------------

RULES = {
    "mean": rule("mean", outlier=4.0),
    "trimmed_mean": rule("trimmed_mean", trim=0.2, outlier=4.0),
    "median": rule("median", outlier=4.0),
}


def _write_inputs(store: ContentStore) -> dict[str, object]:
    """Parent weights and momentum and six pseudo-gradients under three codecs, as stored artifacts."""
    weights = {**tensors(0), "big": torch.randn(300, 257, generator=torch.Generator().manual_seed(42))}
    momentum = {k: v * 0.01 for k, v in {**tensors(11), "big": torch.randn(300, 257)}.items()}
    codecs = [INT8, INT8, BF16, BF16, FP32, INT8]
    artifacts = []
    for seed, codec in enumerate(codecs, start=20):
        delta = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(seed + len(k))) * 0.01
                 for k, v in weights.items()}
        artifacts.append((store_artifact(store, delta, codec), 64 * (seed % 4 + 1)))
    return {
        "weights": store_artifact(store, weights),
        "momentum": store_artifact(store, momentum),
        "updates": [[content_id(f"update-{i}".encode()), artifact, samples]
                    for i, (artifact, samples) in enumerate(artifacts)],
    }


def merge_from_store(store_dir: str, inputs_json: str, out_json: str) -> None:
    """One process's merge of the stored inputs under each rule; writes result ids and hashes."""
    store = ContentStore(store_dir)
    inputs = json.loads(Path(inputs_json).read_text())
    weights = load_artifact(store, inputs["weights"])
    momentum = load_artifact(store, inputs["momentum"])
    # Sorted by artifact id, not update id, so this process offers them in another order.
    offered = sorted(inputs["updates"], key=lambda row: row[1])
    decoded = [UpdateInput(update_id, samples, load_artifact(store, artifact)) for update_id, artifact, samples in offered]
    results = {}
    for name, merge_rule in RULES.items():
        result = merge(weights, momentum, decoded, merge_rule)
        assert result is not None
        weights_id = store_artifact(store, result.weights)
        momentum_id = store_artifact(store, result.momentum)
        # Built as OuterLoop.compute_head builds a head from a merge.
        head = HeadRecord(
            parent=content_id(b"parent head"), round=8, epoch=1, updates=result.included,
            excluded=result.excluded, rule=merge_rule, weights=weights_id, momentum=momentum_id,
            samples_total=10_000, tokens_total=0, samples=0, tokens=0, microshards=(), eval=None,
            workload=content_id(b"workload"), dataset=content_id(b"dataset"), rollback=None,
        )
        _, stream = read_stream(store, weights_id)
        results[name] = {
            "head": head.id, "weights": weights_id, "momentum": momentum_id,
            "weights_bytes": content_id(stream.tobytes()), "excluded": [list(e) for e in result.excluded],
        }
    Path(out_json).write_text(json.dumps(results, sort_keys=True))


def test_two_processes_merge_the_same_stored_inputs_into_byte_identical_heads(tmp_path):
    source = ContentStore(tmp_path / "inputs")
    inputs = _write_inputs(source)
    (tmp_path / "inputs.json").write_text(json.dumps(inputs))
    outputs = []
    for index, threads in enumerate(("1", "2")):
        store_dir = tmp_path / f"process{index}"
        shutil.copytree(tmp_path / "inputs", store_dir)
        out = tmp_path / f"out{index}.json"
        code = ("from tests.node.test_merge import merge_from_store; "
                f"merge_from_store({str(store_dir)!r}, {str(tmp_path / 'inputs.json')!r}, {str(out)!r})")
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, timeout=120)
        outputs.append(json.loads(out.read_text()))
    assert outputs[0] == outputs[1]
    heads = {row["head"] for row in outputs[0].values()}
    assert len(heads) == 3, "the three rules gave the same head"
    # Each process wrote its own copy: the same ids name the same bytes on disk in both stores.
    for name, row in outputs[0].items():
        streams = [read_stream(ContentStore(tmp_path / f"process{i}"), row["weights"])[1] for i in (0, 1)]
        assert streams[0].tobytes() == streams[1].tobytes(), name
