"""The deterministic merge: outer step arithmetic, robust rules, screening, and byte-identical heads across processes."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from node.artifacts import load_artifact, read_stream, store_artifact
from node.config import ConfigError, load_config
from node.merge import MAX_CLIP_ITERS, NothingMerged, UpdateInput, merge, outer_rule, rule_problem
from node.store import ContentStore
from protocol.cid import content_id
from protocol.codecs import BF16, FP32, INT8
from protocol.heads import AggregationRule, HeadRecord

REPO = Path(__file__).resolve().parents[2]


def rule(name: str = "mean", lr: float = 0.7, momentum: float = 0.9, nesterov: bool = True,
         trim: float = 0.2, outlier: float = 0.0, tau: float = 0.0, iters: int = 3):
    return outer_rule(name, lr, momentum, nesterov, trim, outlier, clip_tau=tau, clip_iters=iters)


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


def scaled(delta: dict[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    return {k: v * factor for k, v in delta.items()}


def honest_deltas(count: int) -> list[dict[str, torch.Tensor]]:
    """Pseudo-gradients that share a direction, as peers training the same model do, plus their own noise."""
    shared = tensors(100, 0.01)
    return [{k: shared[k] + noise[k] for k in shared} for noise in (tensors(s, 0.003) for s in range(1, count + 1))]


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((a[k].double() - b[k].double()).square().sum()) for k in a))


ALL_RULES = ("mean", "trimmed_mean", "median", "centered_clip")


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
    with pytest.raises(NothingMerged) as nothing:
        merge(weights, None, updates(nan, None), rule())
    assert [reason for _, reason in nothing.value.excluded] == sorted(["non_finite", "undecodable"])


@pytest.mark.parametrize("name", ALL_RULES)
def test_a_hundredfold_update_in_a_round_of_one_or_two_is_excluded_against_the_chains_reference_norm(name):
    weights = tensors(0)
    honest, other = honest_deltas(2)
    screened = rule(name, outlier=10.0)
    history = merge(weights, None, updates(honest, other), screened)
    assert history is not None and history.median_norm is not None
    reference = history.median_norm  # what the last heads of the chain record
    pair = updates(honest, scaled(other, 100.0))
    # Two norms give no median to judge by: without the chain's reference the attack is merged.
    unbounded = merge(weights, None, pair, screened)
    assert unbounded is not None and unbounded.excluded == ()
    bounded = merge(weights, None, pair, screened, reference_norm=reference)
    assert bounded is not None
    assert bounded.excluded == ((pair[1].update_id, "norm_outlier"),)
    assert bounded.included == (pair[0].update_id,)
    alone = merge(weights, None, pair[:1], screened, reference_norm=reference)
    assert alone is not None and alone.included == (pair[0].update_id,)
    for name_ in weights:
        assert torch.equal(bounded.weights[name_], alone.weights[name_])
    with pytest.raises(NothingMerged) as nothing:
        merge(weights, None, pair[1:], screened, reference_norm=reference)
    assert nothing.value.excluded == ((pair[1].update_id, "norm_outlier"),)
    # outlier_factor 0 turns every norm bound off, the chain's included.
    assert merge(weights, None, pair, rule(name), reference_norm=reference).excluded == ()  # type: ignore[union-attr]


def test_the_result_lists_each_included_updates_norm_and_their_median():
    weights = tensors(0)
    deltas = [tensors(1, 0.01), tensors(2, 0.03), tensors(3, 0.02)]
    nan = constant(float("nan"), weights)
    inputs = updates(*deltas, nan)
    result = merge(weights, None, list(reversed(inputs)), rule())
    assert result is not None
    assert [update_id for update_id, _ in result.norms] == [u.update_id for u in inputs[:3]]
    expected = [math.sqrt(sum(float(t.double().square().sum()) for t in d.values())) for d in deltas]
    assert [norm for _, norm in result.norms] == pytest.approx(expected, rel=1e-12)
    assert result.median_norm == result.norms[2][1]  # the 0.02-scale update's


# ---- centered clip -------------------------------------------------------------------


def test_only_centered_clip_records_clip_parameters_and_bad_ones_are_refused():
    # The other rules' records are unchanged, so are the ids of heads merged under them.
    assert rule("mean", outlier=10.0) == AggregationRule.of(
        "mean", outer_lr=0.7, momentum=0.9, nesterov=True, trim_fraction=0.2, outlier_factor=10.0
    )
    clip = rule("centered_clip", tau=0.5, iters=4)
    assert clip.get("clip_tau") == 0.5 and clip.get("clip_iters") == 4
    assert rule_problem(clip) is None and rule_problem(rule("median")) is None
    assert rule_problem(AggregationRule.of("krum")) == "unknown_rule"
    weights = tensors(0)
    for bad in (rule("centered_clip", iters=10**9), rule("centered_clip", iters=0), rule("centered_clip", tau=-1.0)):
        assert rule_problem(bad) == "bad_rule_params"
        with pytest.raises(ValueError):
            merge(weights, None, updates(tensors(1, 0.01)), bad)
    # The config refuses what the merge would (it cannot import the bound: no torch there).
    assert load_config(None, {"diloco.rule": "centered_clip", "diloco.clip_iters": str(MAX_CLIP_ITERS)}, {})
    with pytest.raises(ConfigError):
        load_config(None, {"diloco.clip_iters": str(MAX_CLIP_ITERS + 1)}, {})


def test_centered_clip_is_the_mean_when_every_update_is_within_tau():
    weights = tensors(0)
    inputs = updates(*honest_deltas(4), samples=[64, 128, 64, 32])
    mean = merge(weights, tensors(9, 0.001), inputs, rule("mean"))
    clipped = merge(weights, tensors(9, 0.001), inputs, rule("centered_clip", tau=1e6))
    assert mean is not None and clipped is not None
    for name in weights:
        assert torch.equal(clipped.weights[name], mean.weights[name])
        assert torch.equal(clipped.momentum[name], mean.momentum[name])


@pytest.mark.parametrize("factor", [100.0, -1.0])
def test_centered_clip_bounds_the_pull_of_one_hundredfold_or_sign_flipped_update(factor):
    weights = tensors(0)
    honest = honest_deltas(4)
    attacked = updates(*honest, scaled(tensors(7, 0.01), factor) if factor > 0 else scaled(honest[0], factor))
    plain = rule(lr=1.0, momentum=0.0)  # the new weights are the parent less the aggregate
    target = merge(weights, None, updates(*honest), plain)
    assert target is not None
    honest_step = distance(weights, target.weights)
    errors = {}
    for name in ("mean", "centered_clip"):
        result = merge(weights, None, attacked, rule(name, lr=1.0, momentum=0.0))  # no norm screening
        assert result is not None and result.excluded == ()
        errors[name] = distance(result.weights, target.weights)
    assert errors["mean"] > 0.3 * honest_step
    assert errors["centered_clip"] < 0.1 * honest_step


def test_centered_clip_is_byte_identical_across_runs_and_input_orders():
    weights = tensors(0)
    momentum = tensors(9, 0.001)
    inputs = updates(*honest_deltas(5), scaled(tensors(7, 0.01), 50.0), samples=[64, 96, 128, 64, 32, 64])
    clip = rule("centered_clip", iters=5)
    first = merge(weights, momentum, inputs, clip)
    again = merge(weights, momentum, inputs, clip)
    shuffled = list(inputs)
    random.Random(5).shuffle(shuffled)
    reordered = merge(weights, momentum, shuffled, clip)
    assert first is not None and again is not None and reordered is not None
    for other in (again, reordered):
        assert other.included == first.included and other.norms == first.norms
        for name in weights:
            assert torch.equal(other.weights[name], first.weights[name])
            assert torch.equal(other.momentum[name], first.momentum[name])


def test_centered_clip_still_excludes_non_finite_updates():
    weights = tensors(0)
    nan = honest_deltas(1)[0]
    nan["out.weight"][1, 2] = float("nan")
    inputs = updates(*honest_deltas(3), nan)
    result = merge(weights, None, inputs, rule("centered_clip", outlier=10.0))
    assert result is not None
    assert result.excluded == ((inputs[3].update_id, "non_finite"),)
    assert all(bool(torch.isfinite(t).all()) for t in result.weights.values())


# ---- determinism across processes ----------------------------------------------------

RULES = {
    "mean": rule("mean", outlier=4.0),
    "trimmed_mean": rule("trimmed_mean", trim=0.2, outlier=4.0),
    "median": rule("median", outlier=4.0),
    "centered_clip": rule("centered_clip", outlier=4.0),
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
        # Built as Receipt.compute builds a head from a merge.
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
            # Floats written with repr round-trip exactly, so equal JSON is equal bits.
            "norms": [list(n) for n in result.norms], "median_norm": result.median_norm,
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
    assert len(heads) == len(RULES), "two rules gave the same head"
    # Each process wrote its own copy: the same ids name the same bytes on disk in both stores.
    for name, row in outputs[0].items():
        streams = [read_stream(ContentStore(tmp_path / f"process{i}"), row["weights"])[1] for i in (0, 1)]
        assert streams[0].tobytes() == streams[1].tobytes(), name
