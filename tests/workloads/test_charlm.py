"""The character-level language model on the bundled Shakespeare corpus."""

from __future__ import annotations

import pytest
import torch

from protocol.cid import matches
from workloads.base import WorkloadError, schema_of
from workloads.charlm import ALPHABET, CharLM, CharLMConfig, decode, encode

# Small enough that a hundred steps take a couple of seconds on two cores.
SMALL = CharLMConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, batch_size=16, eval_examples=128)


@pytest.fixture(scope="module")
def charlm() -> CharLM:
    return CharLM(SMALL)


def test_default_model_size() -> None:
    assert 500_000 < CharLM().parameter_count() < 2_000_000


def test_alphabet_round_trip() -> None:
    text = "HAMLET:\nTo be, or not to be: that is the question.~"
    assert decode(encode(text.encode("ascii"))) == text
    assert len(ALPHABET) == 96


def test_same_seed_same_weights(charlm: CharLM) -> None:
    a, b = charlm.init_model(3), CharLM(SMALL).init_model(3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert [k for k in a.state_dict()] == [p.name for p in charlm.model_schema()]
    assert schema_of(a) == charlm.model_schema()
    assert not torch.equal(a.wte.weight, charlm.init_model(4).wte.weight)


def test_dataset_is_stable_and_content_addressed(charlm: CharLM) -> None:
    description = charlm.dataset()
    assert description.dataset_id == CharLM(SMALL).dataset().dataset_id
    assert 140 <= len(description.microshards) <= 170  # 8 KiB slices of ~1.1 MB of text
    text = b""
    for index, source in enumerate(description.microshards):
        data = charlm.microshard_bytes(index)
        assert matches(source.data_cid, data)
        x, y = charlm.decode_microshard(data)
        assert x.shape == y.shape == (source.examples, 64)
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert source.tokens == source.examples * 64
        text += data
    # The microshards tile the training split, which the validation split follows.
    corpus = charlm._text
    assert corpus.startswith(text) and len(text) == int(len(corpus) * 0.9)


def test_validation_split_is_held_out(charlm: CharLM) -> None:
    x, _ = charlm.split_examples("val")
    window = decode(x[0]).encode("ascii")
    assert window in charlm._text[charlm._split_at :]
    assert all(window not in charlm.microshard_bytes(i) for i in range(len(charlm.dataset().microshards)))


def test_bytes_outside_the_alphabet_are_rejected(charlm: CharLM) -> None:
    with pytest.raises(WorkloadError, match="0xe2 at offset 4"):
        charlm.decode_microshard("Thou\u2014art".encode())


def test_validation_loss_falls(charlm: CharLM) -> None:
    model = charlm.init_model(0)
    state = charlm.new_inner_state(model)
    initial = charlm.evaluate(model)
    assert initial.examples == 128 and initial.tokens == 128 * 64
    assert initial.loss == pytest.approx(torch.log(torch.tensor(96.0)).item(), abs=0.2)
    shards = [charlm.microshard_bytes(i) for i in range(0, 40, 5)]
    metrics = charlm.train(model, state, shards, 150, seed=0)
    assert metrics.steps == 150 and metrics.tokens == 150 * 16 * 64
    final = charlm.evaluate(model)
    assert final.loss <= 0.9 * initial.loss  # in practice about 0.55x
    assert charlm.evaluate(model).loss == final.loss
    assert len(charlm.sample(model, "ROMEO:\n", 40)) == 40


def test_bad_config_is_rejected() -> None:
    with pytest.raises(WorkloadError, match="multiple of 'n_head'"):
        CharLM(CharLMConfig(n_embd=100, n_head=3))
    with pytest.raises(WorkloadError, match="microshard_chars"):
        CharLM(CharLMConfig(microshard_chars=64, block_size=128))
    with pytest.raises(WorkloadError, match="cannot read corpus"):
        CharLM(CharLMConfig(corpus="/nonexistent/book.txt")).dataset()
