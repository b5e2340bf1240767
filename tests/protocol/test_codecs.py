import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from protocol.codecs import BF16, FP32, INT8, RAW, Codec, Int8Codec, codec_from_wire
from protocol.errors import Invalid

INT8_RANGE = st.floats(-(2.0**127), 2.0**127, exclude_min=True, exclude_max=True, width=32)
ANY_F32 = st.floats(width=32)
# The largest float32 whose bfloat16 rounding stays finite, and the next one up.
BF16_LARGEST = float(np.array(0x7F7F7FFF, dtype=np.uint32).view(np.float32))
BF16_TOO_LARGE = float(np.array(0x7F7F8000, dtype=np.uint32).view(np.float32))
BF16_SAFE = st.floats(min_value=-BF16_LARGEST, max_value=BF16_LARGEST, width=32)


def round_trip(codec: Codec, values: np.ndarray, dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    out = np.empty(codec.encoded_size(values.size, dtype), dtype=np.uint8)
    codec.encode_into(values, dtype, out)
    return out, codec.decode(out, values.size, dtype).reshape(values.shape)


@given(hnp.arrays(np.float32, st.integers(0, 300), elements=ANY_F32))
def test_fp32_is_bit_exact_including_nan_inf_and_negative_zero(values: np.ndarray) -> None:
    _, decoded = round_trip(FP32, values)
    assert decoded.tobytes() == values.tobytes()


@given(hnp.arrays(np.float16, st.integers(0, 100), elements=st.floats(width=16)))
def test_fp32_holds_float16_sources_exactly(values: np.ndarray) -> None:
    _, decoded = round_trip(FP32, values, "float16")
    assert decoded.astype(np.float16).tobytes() == values.tobytes()


@given(hnp.arrays(np.float32, st.integers(0, 300), elements=BF16_SAFE))
def test_bf16_rounds_like_torch_and_within_its_bound(values: np.ndarray) -> None:
    encoded, decoded = round_trip(BF16, values)
    oracle = torch.from_numpy(values.copy()).to(torch.bfloat16)
    assert encoded.view(np.int16).tobytes() == oracle.view(torch.int16).numpy().tobytes()
    normal = np.abs(values) >= np.finfo(np.float32).tiny
    error = np.abs(decoded.astype(np.float64) - values.astype(np.float64))
    assert (error[normal] <= 2.0**-8 * np.abs(values[normal].astype(np.float64))).all()


def test_bf16_is_exact_for_bfloat16_sources() -> None:
    source = torch.randn(10_000).to(torch.bfloat16)
    encoded, decoded = round_trip(BF16, source.float().numpy(), "bfloat16")
    assert encoded.view(np.int16).tobytes() == source.view(torch.int16).numpy().tobytes()
    assert torch.equal(torch.from_numpy(decoded).to(torch.bfloat16), source)


def test_bf16_tie_rounds_to_even() -> None:
    # 1 + 2**-8 lies halfway between 1 and 1 + 2**-7: the even neighbour is 1.
    values = np.array([1 + 2.0**-8, 1 + 3 * 2.0**-8], dtype=np.float32)
    _, decoded = round_trip(BF16, values)
    assert decoded.tolist() == [1.0, 1 + 2.0**-6]


@pytest.mark.parametrize(
    ("codec", "bad"),
    [(BF16, bad) for bad in (np.nan, np.inf, -np.inf, BF16_TOO_LARGE, -BF16_TOO_LARGE)]
    + [(INT8, bad) for bad in (np.nan, np.inf, -np.inf, 2.0**127, -(2.0**127))],
)
def test_lossy_codecs_reject_values_they_cannot_represent(codec: Codec, bad: float) -> None:
    values = np.ones(1000, dtype=np.float32)
    values[777] = bad
    with pytest.raises(Invalid) as info:
        round_trip(codec, values)
    assert info.value.reason == "non_finite"


def test_bf16_accepts_the_largest_value_that_rounds_finite() -> None:
    _, decoded = round_trip(BF16, np.array([BF16_LARGEST, -BF16_LARGEST], dtype=np.float32))
    assert np.isfinite(decoded).all()


@settings(deadline=None)
@given(
    hnp.arrays(np.float32, st.integers(0, 2000), elements=INT8_RANGE),
    st.sampled_from([1, 3, 64, 256, 1000]),
)
def test_int8_error_is_at_most_half_a_scale(values: np.ndarray, block: int) -> None:
    codec = Int8Codec(block)
    encoded, decoded = round_trip(codec, values)
    scales = encoded[: codec.blocks(values.size) * 4].view("<f4").astype(np.float64)
    per_element = np.repeat(scales, block)[: values.size]
    error = np.abs(decoded.astype(np.float64) - values.astype(np.float64))
    # The product q * scale is rounded to float32 once more: allow one ulp of the result.
    slack = np.abs(values.astype(np.float64)) * 2.0**-23
    tiny_scale = per_element < np.finfo(np.float32).tiny
    assert (error[~tiny_scale] <= per_element[~tiny_scale] / 2 + slack[~tiny_scale]).all()
    assert (np.abs(decoded[tiny_scale]) <= np.abs(values[tiny_scale]) + 1e-37).all()


def test_int8_zero_blocks_tail_and_layout() -> None:
    codec = Int8Codec(4)
    values = np.array([0, 0, 0, 0, 1, -2, 4, 0.5, -8, 3], dtype=np.float32)
    encoded, decoded = round_trip(codec, values)
    assert len(encoded) == 3 * 4 + 10
    assert encoded[:12].view("<f4").tolist() == [0.0, np.float32(4 / 127), np.float32(8 / 127)]
    assert encoded[12:].view(np.int8).tolist() == [0, 0, 0, 0, 32, -64, 127, 16, -127, 48]
    assert decoded[:4].tolist() == [0, 0, 0, 0]
    assert np.abs(decoded - values).max() <= 8 / 127 / 2


def test_int8_spans_several_encode_steps_identically() -> None:
    values = np.random.default_rng(1).standard_normal(300_001).astype(np.float32)
    codec = Int8Codec(100)
    encoded, _ = round_trip(codec, values)
    piecewise = [round_trip(codec, values[i : i + 100])[0] for i in (0, 150_000, 299_900)]
    n_blocks = codec.blocks(values.size)
    scales, quantised = encoded[: n_blocks * 4].view("<f4"), encoded[n_blocks * 4 :].view(np.int8)
    for start, piece in zip((0, 150_000, 299_900), piecewise):
        assert piece[:4].view("<f4")[0] == scales[start // 100]
        assert (piece[4:].view(np.int8) == quantised[start : start + 100]).all()


@pytest.mark.parametrize(
    "values",
    [
        np.arange(-5, 5, dtype=np.int64).reshape(2, 5),
        np.array([True, False, True]),
        np.arange(256, dtype=np.uint8),
        np.array([1.5, -np.inf, np.nan], dtype=np.float64),
        np.zeros((0, 3), dtype=np.int32),
    ],
)
def test_raw_is_exact_and_a_view(values: np.ndarray) -> None:
    dtype = values.dtype.name
    encoded, decoded = round_trip(RAW, values, dtype)
    assert decoded.dtype == values.dtype and decoded.tobytes() == values.tobytes()
    assert decoded.size == 0 or np.shares_memory(decoded, encoded)


@pytest.mark.parametrize("codec", [RAW, FP32, BF16, INT8, Int8Codec(17)])
def test_codec_wire_round_trip(codec: Codec) -> None:
    assert codec_from_wire(codec.name, codec.to_wire()) == codec


@pytest.mark.parametrize(
    ("name", "params", "reason"),
    [
        ("fp8", {}, "unknown_codec"),
        (3, {}, "unknown_codec"),
        ("fp32", {"block": 4}, "bad_codec_params"),
        ("int8", {}, "bad_codec_params"),
        ("int8", {"block": 0}, "bad_codec_params"),
        ("int8", {"block": 1 << 30}, "bad_codec_params"),
        ("int8", {"block": "256"}, "bad_codec_params"),
        ("int8", [256], "bad_codec_params"),
    ],
)
def test_bad_codecs_are_rejected(name: object, params: object, reason: str) -> None:
    with pytest.raises(Invalid) as info:
        codec_from_wire(name, params)
    assert info.value.reason == reason


def test_codecs_accept_only_sensible_dtypes() -> None:
    assert RAW.accepts("int64") and not RAW.accepts("bfloat16")
    assert all(c.accepts("bfloat16") and not c.accepts("int64") for c in (FP32, BF16, INT8))
