"""Artifact manifests: which tensors an artifact holds, how they are encoded and chunked.

An artifact is one byte stream (each tensor's encoded bytes, 64-byte aligned, zero padded)
cut into content-addressed chunks; its id is the content id of the canonical manifest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from protocol import canonical
from protocol.chunking import Chunking, chunking_from_wire, split
from protocol.cid import content_id, is_content_id
from protocol.codecs import DTYPES, RAW, Codec, codec_from_wire
from protocol.errors import Invalid

KIND = "artifact"
VERSION = 1
ALIGN = 64
MAX_NAME_LEN = 512
MAX_NDIM = 16
MAX_NUMEL = 1 << 40
# A 1B-parameter fp32 model at 1 MiB chunks needs ~3,800 chunk entries (~280 KB); these
# limits leave room for 16x that, or for finer content-defined chunks, and nothing more.
MAX_ENTRIES = 1 << 16
MAX_MANIFEST_SIZE = 8 << 20
LIMITS = canonical.Limits(
    max_size=MAX_MANIFEST_SIZE,
    max_str_len=MAX_NAME_LEN,
    max_bin_len=0,
    max_array_len=MAX_ENTRIES,
    max_map_len=16,
)
_FIELDS = {"kind", "version", "size", "chunking", "chunks", "tensors"}
# An update's artifact also names what it was made for (``binding``), so the same bytes cannot
# stand for another peer's update or for a later round; weights and momentum carry none.
_BOUND_FIELDS = _FIELDS | {"binding"}
_TENSOR_FIELDS = {"name", "shape", "dtype", "codec", "params", "offset", "length"}


def _align(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


@dataclass(frozen=True)
class TensorEntry:
    """One tensor in an artifact: its bytes are ``stream[offset : offset + length]``."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    codec: Codec
    offset: int
    length: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def encoded_bytes(self, stream: np.ndarray) -> np.ndarray:
        return stream[self.offset : self.offset + self.length]

    def values(self, stream: np.ndarray) -> np.ndarray:
        """This tensor's values from the artifact stream: float32 for the float codecs, the
        source dtype for raw; fp32 and raw results are views over ``stream`` (no copies)."""
        decoded = self.codec.decode(self.encoded_bytes(stream), self.numel, self.dtype)
        return decoded.reshape(self.shape)

    def to_wire(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "codec": self.codec.name,
            "params": self.codec.to_wire(),
            "offset": self.offset,
            "length": self.length,
        }


@dataclass(frozen=True)
class ChunkRef:
    cid: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated manifest. Build one with ``build_artifact`` or ``parse_manifest``."""

    tensors: tuple[TensorEntry, ...]
    chunking: Chunking
    chunks: tuple[ChunkRef, ...]
    size: int
    binding: str | None = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "kind": KIND,
            "version": VERSION,
            "size": self.size,
            "chunking": self.chunking.to_wire(),
            "chunks": [[chunk.cid, chunk.size] for chunk in self.chunks],
            "tensors": [tensor.to_wire() for tensor in self.tensors],
        }
        if self.binding is not None:
            wire["binding"] = self.binding
        return wire

    @cached_property
    def encoded(self) -> bytes:
        """The canonical bytes; what peers exchange and what the artifact id hashes."""
        return canonical.encode(self.to_wire())

    @cached_property
    def artifact_id(self) -> str:
        return content_id(self.encoded)

    def chunk_offsets(self) -> list[int]:
        """The stream offset where each chunk starts."""
        offsets = []
        position = 0
        for chunk in self.chunks:
            offsets.append(position)
            position += chunk.size
        return offsets


def parse_manifest(data: bytes | bytearray | memoryview) -> Manifest:
    """Decode and validate manifest bytes; raise Invalid (reason label) on anything malformed."""
    value = canonical.decode(data, LIMITS)
    if not isinstance(value, dict) or set(value) not in (_FIELDS, _BOUND_FIELDS):
        raise Invalid("malformed", "manifest needs exactly " + ", ".join(sorted(_FIELDS)) + " (and binding)")
    if value["kind"] != KIND:
        raise Invalid("wrong_kind", f"kind {value['kind']!r:.40}")
    if type(value["version"]) is not int or value["version"] != VERSION:
        raise Invalid("unknown_version", f"version {value['version']!r:.40}")
    size = value["size"]
    if not _is_count(size):
        raise Invalid("malformed", "size must be a non-negative int")
    chunking = chunking_from_wire(value["chunking"])
    chunks = _parse_chunks(value["chunks"])
    chunking.check_sizes([chunk.size for chunk in chunks], size)
    tensors = _parse_tensors(value["tensors"], size)
    binding = value.get("binding")
    if binding is not None and not is_content_id(binding):
        raise Invalid("malformed", "binding must be a content id")
    manifest = Manifest(tensors, chunking, chunks, size, binding)
    # The artifact id is the hash of these bytes, so they must be exactly what the parsed
    # manifest encodes to (no value that merely compares equal, like true for 1).
    if manifest.encoded != bytes(data):
        raise Invalid("non_canonical", "manifest does not re-encode to its bytes")
    return manifest


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _parse_chunks(value: Any) -> tuple[ChunkRef, ...]:
    if not isinstance(value, list):
        raise Invalid("malformed", "chunks must be a list")
    chunks = []
    for item in value:
        if not (isinstance(item, list) and len(item) == 2 and _is_count(item[1])):
            raise Invalid("malformed", f"chunk entry {item!r:.80}")
        if not is_content_id(item[0]):
            raise Invalid("bad_cid", f"chunk id {item[0]!r:.80}")
        chunks.append(ChunkRef(item[0], item[1]))
    return tuple(chunks)


def _parse_tensors(value: Any, size: int) -> tuple[TensorEntry, ...]:
    if not isinstance(value, list):
        raise Invalid("malformed", "tensors must be a list")
    tensors = []
    names = set()
    end = 0
    for item in value:
        if not isinstance(item, dict) or set(item) != _TENSOR_FIELDS:
            raise Invalid("malformed", "tensor entry needs exactly " + ", ".join(sorted(_TENSOR_FIELDS)))
        name, shape, dtype = item["name"], item["shape"], item["dtype"]
        if not isinstance(name, str) or not name or name in names:
            raise Invalid("bad_name", f"tensor name {name!r:.80} empty, not text or repeated")
        names.add(name)
        if not (isinstance(shape, list) and len(shape) <= MAX_NDIM and all(_is_count(d) for d in shape)):
            raise Invalid("bad_shape", f"{name}: shape {shape!r:.80}")
        if math.prod(shape) > MAX_NUMEL:
            raise Invalid("bad_shape", f"{name}: more than {MAX_NUMEL} elements")
        if dtype not in DTYPES:
            raise Invalid("bad_dtype", f"{name}: dtype {dtype!r:.40}")
        codec = codec_from_wire(item["codec"], item["params"])
        if not codec.accepts(dtype):
            raise Invalid("bad_dtype", f"{name}: codec {codec.name} cannot hold {dtype}")
        offset, length = item["offset"], item["length"]
        # The layout is fully determined by the tensor order, so anything else (overlap, gaps,
        # ranges past the end) is rejected rather than interpreted.
        placed = _is_count(offset) and _is_count(length) and offset == _align(end)
        if not placed or length != codec.encoded_size(math.prod(shape), dtype):
            raise Invalid("tensor_layout", f"{name}: bytes [{offset!r:.20}, +{length!r:.20}) misplaced")
        end = offset + length
        tensors.append(TensorEntry(name, tuple(shape), dtype, codec, offset, length))
    if end != size:
        raise Invalid("size_mismatch", f"tensors end at {end}, artifact has {size} bytes")
    return tuple(tensors)


@dataclass(frozen=True)
class TensorSource:
    """A tensor to put in an artifact. ``dtype`` is the source dtype the manifest records;
    it defaults to the array's own (bfloat16 sources pass float32 values and say so)."""

    name: str
    array: np.ndarray
    codec: Codec = RAW
    dtype: str = ""

    @property
    def source_dtype(self) -> str:
        return self.dtype or self.array.dtype.name


@dataclass(frozen=True)
class Artifact:
    """A built artifact: the manifest, its stream, and the chunks as views over the stream."""

    manifest: Manifest
    stream: np.ndarray
    chunks: tuple[memoryview, ...]


def build_artifact(tensors: Sequence[TensorSource], chunking: Chunking, binding: str | None = None) -> Artifact:
    """Encode ``tensors`` in order into one stream, chunk and hash it, bound to ``binding`` if
    given. Raises Invalid for a codec that cannot hold a tensor's dtype, repeated names, or
    values a codec rejects."""
    entries = _layout(tensors)
    size = entries[-1].offset + entries[-1].length if entries else 0
    stream = np.empty(size, dtype=np.uint8)
    gap_start = 0
    for source, entry in zip(tensors, entries):
        stream[gap_start : entry.offset] = 0
        gap_start = entry.offset + entry.length
        source.codec.encode_into(source.array, entry.dtype, stream[entry.offset : gap_start])
    chunks = tuple(split(chunking, stream))
    refs = tuple(ChunkRef(content_id(chunk), len(chunk)) for chunk in chunks)
    manifest = Manifest(tuple(entries), chunking, refs, size, binding)
    # What peers will accept is defined by the parser alone; a build it would reject (too
    # many chunks, an overlong name, too many dimensions) fails here, not on every receiver.
    parse_manifest(manifest.encoded)
    return Artifact(manifest, stream, chunks)


def _layout(tensors: Sequence[TensorSource]) -> list[TensorEntry]:
    entries = []
    end = 0
    for source in tensors:
        dtype, codec, array = source.source_dtype, source.codec, source.array
        if dtype not in DTYPES or not codec.accepts(dtype):
            raise Invalid("bad_dtype", f"{source.name}: codec {codec.name} cannot hold {dtype}")
        if (array.dtype.name != dtype) if codec is RAW else (array.dtype.kind != "f"):
            raise Invalid("bad_dtype", f"{source.name}: a {array.dtype} array cannot be {dtype}")
        offset = _align(end)
        end = offset + codec.encoded_size(array.size, dtype)
        entries.append(TensorEntry(source.name, tuple(array.shape), dtype, codec, offset, end - offset))
    if len({entry.name for entry in entries}) != len(entries):
        raise Invalid("bad_name", "tensor names repeat")
    return entries


def join_chunks(
    manifest: Manifest, chunks: Sequence[bytes | bytearray | memoryview], verify: bool = True
) -> np.ndarray:
    """The artifact stream from its chunks in manifest order; raise Invalid on a wrong size
    or (with ``verify``) a chunk whose hash does not match its id."""
    if len(chunks) != len(manifest.chunks):
        raise Invalid("chunk_layout", f"{len(chunks)} chunks for a manifest of {len(manifest.chunks)}")
    stream = np.empty(manifest.size, dtype=np.uint8)
    position = 0
    for index, (ref, chunk) in enumerate(zip(manifest.chunks, chunks)):
        view = np.frombuffer(chunk, dtype=np.uint8)
        if view.size != ref.size or (verify and content_id(chunk) != ref.cid):
            raise Invalid("bad_chunk", f"chunk {index} does not match {ref.cid}")
        stream[position : position + ref.size] = view
        position += ref.size
    return stream


def decode_tensors(manifest: Manifest, stream: np.ndarray) -> dict[str, np.ndarray]:
    """Each tensor's values (see ``TensorEntry.values``), in manifest order."""
    if stream.size != manifest.size:
        raise Invalid("size_mismatch", f"stream has {stream.size} bytes, manifest {manifest.size}")
    return {entry.name: entry.values(stream) for entry in manifest.tensors}


def chunks_by_id(artifact: Artifact) -> Mapping[str, memoryview]:
    """The artifact's distinct chunks by id, as handed to a store or a peer."""
    return {ref.cid: chunk for ref, chunk in zip(artifact.manifest.chunks, artifact.chunks)}
