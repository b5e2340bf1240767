import os
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from node.store import ContentStore
from protocol.chunking import FixedChunking
from protocol.cid import content_id
from protocol.codecs import FP32
from protocol.errors import Invalid
from protocol.manifest import Artifact, TensorSource, build_artifact, chunks_by_id


def chunk_path(store: ContentStore, cid: str, kind: str = "chunks") -> Path:
    digest = cid[3:]
    return store.root / kind / digest[:2] / digest


def flip_byte(path: Path, position: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x40
    path.write_bytes(bytes(data))


def small_artifact(seed: int = 0, n: int = 10_000) -> Artifact:
    values = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    return build_artifact([TensorSource("w", values, FP32)], FixedChunking(4096))


def put_artifact(store: ContentStore, artifact: Artifact) -> str:
    chunks = chunks_by_id(artifact)
    store.put_many(chunks.values(), chunks.keys())
    return store.put_manifest(artifact.manifest.encoded)


def all_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_put_get_has_missing(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    cid = store.put(b"hello")
    assert cid == content_id(b"hello")
    assert store.get(cid) == b"hello" and store.has(cid)
    other = content_id(b"other")
    assert store.missing([other, cid, other]) == [other]
    assert store.get(other) is None
    for malformed in ("b3:" + "A" * 64, "../../etc/passwd", "b3:00"):
        with pytest.raises(Invalid):
            store.get(malformed)
    assert store.put(b"hello") == cid
    counters = store.counters()
    assert (counters.items_written, counters.items_deduplicated, counters.bytes_written) == (1, 1, 5)
    assert counters.bytes_read == 5 and counters.items_verified == 1


def test_a_chunk_written_with_drop_cache_reads_back_verified(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    data = os.urandom(3 << 20)
    cid = store.put(data, content_id(data), drop_cache=True)
    assert store.get(cid) == data
    assert store.put_many([b"a", b"b"], drop_cache=True) == [content_id(b"a"), content_id(b"b")]


def test_a_put_that_fails_midway_leaves_no_temp_files(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    first, second = b"first", b"second"
    assert content_id(first)[3:5] != content_id(second)[3:5]
    # A file where the second chunk's fan-out folder belongs: the put fails after the first
    # chunk's temp file is written.
    blocker = chunk_path(store, content_id(second)).parent
    blocker.write_bytes(b"")
    with pytest.raises(OSError):
        store.put_many([first, second], drop_cache=True)
    assert all_files(store.root / "chunks") == [blocker]
    assert not store.has(content_id(first))


def test_huge_stray_files_are_dropped_without_being_read_into_memory(tmp_path: Path) -> None:
    """A file of hundreds of MB (sparse here) under a valid-looking name: the full check hashes
    a chunk a block at a time, and a manifest or record larger than any can be is dropped
    unread. Before, each was read whole into memory."""
    store = ContentStore(tmp_path)
    good = store.put(os.urandom(3 << 20))
    huge = {kind: content_id(kind.encode()) for kind in ("chunks", "manifests", "records")}
    for kind, cid in huge.items():
        path = chunk_path(store, cid, kind)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            handle.truncate(256 << 20)
    tracemalloc.start()
    try:
        report = store.check(full=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sorted(report.corrupt) == sorted(huge.values())
    assert peak < 16 << 20, f"peak {peak / 2**20:.0f} MiB traced during the check"
    assert all(not chunk_path(store, cid, kind).exists() for kind, cid in huge.items())
    assert store.get(good) is not None and store.counters().corrupt_dropped == 3


def test_a_record_larger_than_any_item_is_dropped_unread(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    cid = content_id(b"record")
    path = chunk_path(store, cid, "records")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.truncate(1 << 30)
    tracemalloc.start()
    try:
        assert store.get_record(cid) is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20 and not path.exists()


def test_put_rejects_data_that_does_not_match_its_id(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    with pytest.raises(Invalid):
        store.put(b"hello", content_id(b"other"))
    assert not all_files(tmp_path / "chunks")


def test_a_corrupted_chunk_reads_as_missing_and_is_deleted(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    cid = store.put(os.urandom(5000))
    flip_byte(chunk_path(store, cid), 1234)
    assert store.get(cid) is None
    assert not store.has(cid) and store.missing([cid]) == [cid]
    assert store.counters().corrupt_dropped == 1


def test_read_into_verifies_size_and_hash(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    data = os.urandom(3000)
    cid = store.put(data)
    out = np.zeros(3000, dtype=np.uint8)
    assert store.read_into(cid, out) and out.tobytes() == data
    assert not store.read_into(cid, np.zeros(2999, dtype=np.uint8))
    assert not store.has(cid)
    assert not store.read_into(cid, out)


def test_get_behind_reads_a_verified_chunk_behind_a_head(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    data = os.urandom(70_000)
    cid = store.put(data)
    sizes: list[int] = []

    def head(size: int) -> bytes:
        sizes.append(size)
        return b"HEAD" + size.to_bytes(4, "big")

    frame = store.get_behind(cid, head)
    assert frame == b"HEAD" + len(data).to_bytes(4, "big") + data and sizes == [len(data)]
    assert store.get_behind(content_id(b"absent"), head) is None


@pytest.mark.parametrize("damage", ["flip", "truncate", "extend"])
def test_get_behind_drops_a_damaged_chunk(tmp_path: Path, damage: str) -> None:
    store = ContentStore(tmp_path)
    cid = store.put(os.urandom(9000))
    path = chunk_path(store, cid)
    if damage == "flip":
        flip_byte(path, 4321)
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-1])
    else:
        path.write_bytes(path.read_bytes() + b"x")
    assert store.get_behind(cid, lambda size: b"") is None
    assert not store.has(cid) and store.counters().corrupt_dropped == 1


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ContentStore(tmp_path)

    def crash(*args: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.put_many([b"a", b"b"])
    monkeypatch.undo()
    assert not all_files(tmp_path / "chunks")
    assert store.missing([content_id(b"a")]) == [content_id(b"a")]


def test_startup_check_removes_temp_files_strays_and_wrong_sizes(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    artifact = small_artifact()
    manifest_id = put_artifact(store, artifact)
    first, second = artifact.manifest.chunks[0].cid, artifact.manifest.chunks[1].cid
    record = store.put_record(b"record")
    # What a crash leaves: half-written temp files next to finished ones.
    (chunk_path(store, first).parent / ".tmp-abc123").write_bytes(b"partial")
    (tmp_path / "pins" / ".tmp-x").write_bytes(b"partial")
    (tmp_path / "chunks" / "stray.txt").write_bytes(b"?")
    with open(chunk_path(store, first), "ab") as handle:
        handle.write(b"extra")
    flip_byte(chunk_path(store, second))
    flip_byte(chunk_path(store, record, "records"))

    report = ContentStore(tmp_path).check()
    assert (report.temp_files, report.stray_files) == (2, 1)
    # The cheap check sees the wrong size, not the flipped byte in a chunk of the right size.
    assert sorted(report.corrupt) == sorted([first, record])
    assert store.has(second)

    full = ContentStore(tmp_path).check(full=True)
    assert full.corrupt == [second]
    assert store.get_manifest(manifest_id) == artifact.manifest
    assert store.missing(c.cid for c in artifact.manifest.chunks) == [first, second]


def test_check_drops_a_corrupt_manifest(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    manifest_id = put_artifact(store, small_artifact())
    flip_byte(chunk_path(store, manifest_id, "manifests"), 10)
    assert store.check().corrupt == [manifest_id]
    assert store.get_manifest(manifest_id) is None and not store.has_manifest(manifest_id)


def test_manifests_are_validated_and_verified(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    artifact = small_artifact()
    with pytest.raises(Invalid):
        store.put_manifest(b"\x93\x01\x02\x03")
    with pytest.raises(Invalid):
        store.put_manifest(artifact.manifest.encoded, content_id(b"x"))
    manifest_id = store.put_manifest(artifact.manifest.encoded)
    assert manifest_id == artifact.manifest.artifact_id
    assert store.manifest_ids() == [manifest_id]
    assert store.get_manifest(manifest_id) == artifact.manifest


def test_gc_keeps_pinned_manifests_their_chunks_and_records(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    kept, dropped = small_artifact(1), small_artifact(2)
    kept_id, dropped_id = put_artifact(store, kept), put_artifact(store, dropped)
    head = store.put_record(b"head record")
    loose = store.put(b"loose chunk")
    store.pin(f"head:{head}", [head, kept_id])

    report = ContentStore(tmp_path).gc()  # a reopened store sees the same pins
    assert report.removed == len(chunks_by_id(dropped)) + 2
    assert store.get_manifest(kept_id) == kept.manifest
    assert not store.missing(c.cid for c in kept.manifest.chunks)
    assert store.get_record(head) == b"head record"
    assert not store.has_manifest(dropped_id) and not store.has(loose)

    store.unpin(f"head:{head}")
    assert ContentStore(tmp_path).pins() == {}
    store.gc()
    assert not all_files(tmp_path / "chunks") and not all_files(tmp_path / "records")


def test_gc_keeps_recent_items_when_asked(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    old, fresh = store.put(b"old"), store.put(b"fresh")
    past = time.time() - 3600
    os.utime(chunk_path(store, old), (past, past))
    store.gc(keep_recent_s=600)
    assert not store.has(old) and store.has(fresh)


def test_pins_validate_their_input(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    with pytest.raises(Invalid):
        store.pin("", [])
    with pytest.raises(Invalid):
        store.pin("é" * 61, [])
    store.pin("é" * 60, [])
    assert ContentStore(tmp_path).pins() == {"é" * 60: frozenset()}
    with pytest.raises(Invalid):
        store.pin("head:x", ["not-a-cid"])


def test_concurrent_writers_readers_and_gc(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    blobs = [os.urandom(1000 + i) for i in range(64)]
    ids = [content_id(b) for b in blobs]
    store.pin("all", ids)
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for i in range(200):
                index = (offset * 7 + i) % len(blobs)
                store.put(blobs[index])
                data = store.get(ids[index])
                assert data is None or data == blobs[index]
                if i % 50 == 0:
                    store.gc()
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert store.missing(ids) == []
    assert all(store.get(cid) == blob for cid, blob in zip(ids, blobs))
    assert not [p for p in all_files(tmp_path) if p.name.startswith(".tmp-")]
    assert store.counters().corrupt_dropped == 0


def make_odd(path: Path, odd: str) -> None:
    """Put something other than a regular file at an item's path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if odd == "directory":
        path.mkdir()
    elif odd == "fifo":
        os.mkfifo(path)
    else:  # a directory holding a file: the store must not empty it
        path.mkdir()
        (path / "notes.txt").write_text("an operator's file")


@pytest.mark.parametrize("odd", ["directory", "fifo"])
def test_anything_but_a_regular_file_in_an_items_place_is_no_item(tmp_path: Path, odd: str) -> None:
    # Reading a FIFO used to wait for a writer forever, and a directory made reads, the full
    # check and GC raise; has() said True for both, so a fetch skipped the chunk.
    store = ContentStore(tmp_path / "store")
    data = os.urandom(3000)
    cid = content_id(data)
    path = chunk_path(store, cid)
    make_odd(path, odd)
    assert not store.has(cid) and store.missing([cid]) == [cid]
    assert store.get(cid) is None
    assert not os.path.lexists(path)  # dropped like a corrupt file
    make_odd(path, odd)
    assert store.get_behind(cid, lambda size: b"") is None
    make_odd(path, odd)
    assert not store.read_into(cid, np.empty(3000, dtype=np.uint8))
    make_odd(path, odd)
    assert cid in store.check(full=True).corrupt and not os.path.lexists(path)
    make_odd(path, odd)
    assert cid in store.check(full=False).corrupt and not os.path.lexists(path)
    make_odd(path, odd)
    assert store.put(data) == cid and store.get(cid) == data  # the write takes its place
    manifest_id = content_id(b"no manifest")
    make_odd(chunk_path(store, manifest_id, "manifests"), odd)
    assert not store.has_manifest(manifest_id) and store.get_manifest(manifest_id) is None
    make_odd(chunk_path(store, manifest_id, "manifests"), odd)
    old = time.time() - 3600
    os.utime(chunk_path(store, manifest_id, "manifests"), (old, old))
    assert store.gc().removed >= 1  # GC removes it, and the manifests it reads for pins skip it
    assert not os.path.lexists(chunk_path(store, manifest_id, "manifests"))


def test_a_directory_with_files_in_an_items_place_is_left_alone_and_reported(tmp_path: Path) -> None:
    store = ContentStore(tmp_path / "store")
    data = os.urandom(3000)
    cid = content_id(data)
    path = chunk_path(store, cid)
    make_odd(path, "directory with files")
    assert store.get(cid) is None and not store.has(cid)
    assert (path / "notes.txt").exists()
    with pytest.raises(OSError):
        store.put(data)  # a clear error, not a silent "already stored"
    assert (path / "notes.txt").exists()
