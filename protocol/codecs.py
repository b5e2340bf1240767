"""Tensor codecs: how one tensor's values become bytes in an artifact (raw, fp32, bf16, int8).

Every codec is deterministic and little-endian, so equal tensors encode to equal bytes on
every peer. Encoders write into a caller's buffer, working in cache-sized slices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from protocol.errors import Invalid

# Source dtypes a manifest may name. bfloat16 has no numpy dtype: callers hand its values
# to the float codecs as float32 (which holds every bfloat16 exactly).
NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(code)
    for name, code in {
        "float64": "<f8",
        "float32": "<f4",
        "float16": "<f2",
        "int64": "<i8",
        "int32": "<i4",
        "int16": "<i2",
        "int8": "i1",
        "uint8": "u1",
        "bool": "?",
    }.items()
}
FLOAT_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16"})
DTYPES = frozenset(NUMPY_DTYPES) | FLOAT_DTYPES

DEFAULT_INT8_BLOCK = 256
MAX_INT8_BLOCK = 1 << 20
_SLICE = 1 << 16  # elements per encode step: the temporaries stay in L2

# The largest float32 that rounds to a finite bfloat16: 0x7F7F8000 would round up to inf.
_BF16_LIMIT = float(np.array(0x7F7F7FFF, dtype=np.uint32).view(np.float32))
# int8 inputs stay below 2**127 so that 127 * scale cannot overflow float32 when decoding.
_INT8_LIMIT = np.float32(2.0**127)


def _float32(values: np.ndarray) -> np.ndarray:
    return values if values.dtype == np.float32 else values.astype(np.float32)


@dataclass(frozen=True)
class RawCodec:
    """The source dtype's own little-endian bytes: exact, for any dtype numpy has."""

    name = "raw"

    def accepts(self, dtype: str) -> bool:
        return dtype in NUMPY_DTYPES

    def encoded_size(self, numel: int, dtype: str) -> int:
        return numel * NUMPY_DTYPES[dtype].itemsize

    def encode_into(self, array: np.ndarray, dtype: str, out: np.ndarray) -> None:
        out.view(NUMPY_DTYPES[dtype])[:] = array.reshape(-1)

    def decode(self, data: np.ndarray, numel: int, dtype: str) -> np.ndarray:
        """A view over ``data`` with the source dtype (no copy)."""
        return data.view(NUMPY_DTYPES[dtype])

    def to_wire(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class Fp32Codec:
    """IEEE float32. Exact for float32, float16 and bfloat16 sources, NaN and inf included;
    float64 sources round to nearest (beyond float32 range they become inf)."""

    name = "fp32"

    def accepts(self, dtype: str) -> bool:
        return dtype in FLOAT_DTYPES

    def encoded_size(self, numel: int, dtype: str) -> int:
        return numel * 4

    def encode_into(self, array: np.ndarray, dtype: str, out: np.ndarray) -> None:
        out.view("<f4")[:] = array.reshape(-1)

    def decode(self, data: np.ndarray, numel: int, dtype: str) -> np.ndarray:
        """A float32 view over ``data`` (no copy)."""
        return data.view("<f4")

    def to_wire(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class Bf16Codec:
    """bfloat16 bits as uint16, rounded to nearest, ties to even.

    |decoded - x| <= 2**-8 * |x| for normal x (half a unit in the 8-bit significand's last
    place); exact for bfloat16 sources. Encoding raises Invalid("non_finite") for NaN, inf or
    values so large they would round to inf (|x| > 3.3961e38).
    """

    name = "bf16"

    def accepts(self, dtype: str) -> bool:
        return dtype in FLOAT_DTYPES

    def encoded_size(self, numel: int, dtype: str) -> int:
        return numel * 2

    def encode_into(self, array: np.ndarray, dtype: str, out: np.ndarray) -> None:
        flat = array.reshape(-1)
        target = out.view("<u2")
        for start in range(0, flat.size, _SLICE):
            part = _float32(flat[start : start + _SLICE])
            # NaN poisons min/max, so one pair of comparisons rejects NaN, inf and overflow.
            if part.size and not (part.min() >= -_BF16_LIMIT and part.max() <= _BF16_LIMIT):
                raise Invalid("non_finite", "bf16 input has NaN, inf or values beyond bf16 range")
            bits = part.view(np.uint32)
            tie_to_even = (bits >> 16) & 1
            tie_to_even += bits
            tie_to_even += 0x7FFF
            tie_to_even >>= 16
            target[start : start + part.size] = tie_to_even

    def decode(self, data: np.ndarray, numel: int, dtype: str) -> np.ndarray:
        """Float32 values: each bfloat16 widened exactly."""
        wide = data.view("<u2").astype(np.uint32)
        wide <<= 16
        return wide.view(np.float32)

    def to_wire(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class Int8Codec:
    """Blockwise symmetric int8: per block of ``block`` values one float32 scale
    (absmax / 127) then the values as round-half-even(x / scale) in [-127, 127].

    Layout: all scales (float32), then all int8 values; the last block may be short.
    |decoded - x| <= scale / 2 per element, plus float32 rounding of the product; an
    all-zero block has scale 0 and decodes to zeros, as does a block whose absmax is below
    127 * 2**-149 (its scale underflows). Encoding raises Invalid("non_finite") for NaN, inf
    or |x| >= 2**127 (about 1.7e38), where 127 * scale could overflow.
    """

    block: int = DEFAULT_INT8_BLOCK
    name = "int8"

    def __post_init__(self) -> None:
        if not (type(self.block) is int and 1 <= self.block <= MAX_INT8_BLOCK):
            raise Invalid("bad_codec_params", f"int8 block {self.block!r} outside [1, {MAX_INT8_BLOCK}]")

    def accepts(self, dtype: str) -> bool:
        return dtype in FLOAT_DTYPES

    def blocks(self, numel: int) -> int:
        return -(-numel // self.block)

    def encoded_size(self, numel: int, dtype: str) -> int:
        return self.blocks(numel) * 4 + numel

    def encode_into(self, array: np.ndarray, dtype: str, out: np.ndarray) -> None:
        flat = array.reshape(-1)
        n_blocks = self.blocks(flat.size)
        scales = out[: n_blocks * 4].view("<f4")
        values = out[n_blocks * 4 :].view(np.int8)
        # Whole blocks per step, so no step splits a block.
        step = max(_SLICE // self.block, 1) * self.block
        for start in range(0, flat.size, step):
            part = _float32(flat[start : start + step])
            first = start // self.block
            count = self.blocks(part.size)
            self._encode_blocks(part, scales[first : first + count], values[start : start + part.size])

    def _encode_blocks(self, part: np.ndarray, scales: np.ndarray, values: np.ndarray) -> None:
        full = part.size // self.block * self.block
        rows = [part[:full].reshape(-1, self.block)] if full else []
        if full < part.size:
            rows.append(part[full:].reshape(1, -1))
        row_start = 0
        value_start = 0
        for matrix in rows:
            absmax = np.maximum(matrix.max(axis=1), -matrix.min(axis=1))
            if not (absmax < _INT8_LIMIT).all():
                raise Invalid("non_finite", "int8 input has NaN, inf or values beyond 2**127")
            scale = absmax / np.float32(127)
            scales[row_start : row_start + scale.size] = scale
            # A zero scale divides by one instead: its block is all zeros (or underflowed).
            divisor = np.where(scale > 0, scale, np.float32(1))
            quantised = np.rint(matrix / divisor[:, None])
            np.clip(quantised, -127, 127, out=quantised)
            values[value_start : value_start + matrix.size] = quantised.reshape(-1)
            row_start += scale.size
            value_start += matrix.size

    def decode(self, data: np.ndarray, numel: int, dtype: str) -> np.ndarray:
        """Float32 values: each int8 times its block's scale."""
        n_blocks = self.blocks(numel)
        scales = data[: n_blocks * 4].view("<f4")
        values = data[n_blocks * 4 :].view(np.int8)
        result = np.empty(numel, dtype=np.float32)
        full = numel // self.block
        if full:
            np.multiply(
                values[: full * self.block].reshape(full, self.block),
                scales[:full, None],
                out=result[: full * self.block].reshape(full, self.block),
            )
        if full < n_blocks:
            np.multiply(values[full * self.block :], scales[full], out=result[full * self.block :])
        return result

    def to_wire(self) -> dict[str, Any]:
        return {"block": self.block}


Codec = RawCodec | Fp32Codec | Bf16Codec | Int8Codec

RAW = RawCodec()
FP32 = Fp32Codec()
BF16 = Bf16Codec()
INT8 = Int8Codec()
_PLAIN_CODECS: dict[str, Codec] = {"raw": RAW, "fp32": FP32, "bf16": BF16}


def codec_from_wire(name: Any, params: Any) -> Codec:
    """Parse a manifest's codec name and params; raise Invalid for anything unknown."""
    if not isinstance(params, dict):
        raise Invalid("bad_codec_params", "codec params must be a map")
    if name in ("raw", "fp32", "bf16"):
        if params:
            raise Invalid("bad_codec_params", f"{name} takes no params")
        return _PLAIN_CODECS[name]
    if name == "int8":
        if set(params) != {"block"}:
            raise Invalid("bad_codec_params", "int8 takes exactly a block")
        return Int8Codec(params["block"])
    raise Invalid("unknown_codec", f"codec {name!r:.40}")
