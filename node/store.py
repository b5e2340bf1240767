"""The on-disk content store: chunks, manifests and records by content id, pins and GC.

Every write is atomic (temp file, fsync, rename, fsync of the directory) and every read is
verified, so a crash or a flipped bit can lose an item but never serve a wrong one.
"""

from __future__ import annotations

import io
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from protocol import canonical
from protocol.cid import PREFIX, content_hasher, content_id, content_id_of, is_content_id
from protocol.errors import Invalid
from protocol.exchange import MAX_ITEM_BYTES
from protocol.manifest import MAX_MANIFEST_SIZE, Manifest, parse_manifest

Buffer = bytes | bytearray | memoryview

CHUNKS, MANIFESTS, RECORDS = "chunks", "manifests", "records"
KINDS = (CHUNKS, MANIFESTS, RECORDS)
_PINS = "pins"
_TEMP_PREFIX = ".tmp-"
MAX_PIN_NAME = 120  # bytes; the pin's file name is their hex, within the usual 255 limit
# fdatasync covers a new file's data and size, which is all a rename needs behind it; the
# directory fsync after the rename makes the name durable. macOS has only fsync.
_sync_data = getattr(os, "fdatasync", os.fsync)
_fadvise = getattr(os, "posix_fadvise", None)  # not on macOS
_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", 4)


@dataclass
class StoreCounters:
    """Running totals since the store was opened; ``ContentStore.counters`` returns a copy."""

    bytes_written: int = 0
    bytes_read: int = 0
    items_written: int = 0
    items_deduplicated: int = 0
    items_verified: int = 0
    corrupt_dropped: int = 0
    gc_removed: int = 0


@dataclass
class CheckReport:
    """What a startup check removed: leftover temp files, stray names, corrupt items by id."""

    temp_files: int = 0
    stray_files: int = 0
    corrupt: list[str] = field(default_factory=list)
    checked: int = 0


@dataclass
class GcReport:
    removed: int = 0
    bytes_freed: int = 0
    kept: int = 0


class ContentStore:
    """Content-addressed files under ``root``: ``<kind>/<hex[:2]>/<hex>``, pins in ``pins/``.

    Synchronous and thread-safe: asyncio code calls it through ``asyncio.to_thread``. Renames,
    deletions, pins and counters happen under one lock, so GC never races a finishing write.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        # Reentrant: GC holds it while it reads manifests through the verifying getters.
        self._lock = threading.RLock()
        self._counters = StoreCounters()
        for name in (*KINDS, _PINS):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        self._pins = self._load_pins()

    # -- chunks -----------------------------------------------------------------------------

    def put(self, data: Buffer, cid: str | None = None, *, drop_cache: bool = False) -> str:
        """Store a chunk; return its id. With ``cid``, raise Invalid("bad_chunk") on mismatch.

        ``drop_cache``: let the kernel drop the chunk's pages once it is on disk (see ``_write_temp``)."""
        return self.put_many([data], [cid] if cid else None, drop_cache=drop_cache)[0]

    def put_many(
        self, chunks: Iterable[Buffer], cids: Iterable[str] | None = None, *, drop_cache: bool = False
    ) -> list[str]:
        """Store several chunks with one fsync per directory touched; return their ids."""
        return self._put_items(CHUNKS, list(chunks), None if cids is None else list(cids), drop_cache)

    def get(self, cid: str) -> bytes | None:
        """A chunk's bytes, or None when absent or corrupt (a corrupt file is deleted)."""
        return self._get(CHUNKS, cid)

    def read_into(self, cid: str, out: np.ndarray) -> bool:
        """Read a chunk straight into ``out`` (contiguous, its exact size) and verify it."""
        if not out.flags.c_contiguous:
            raise ValueError("read_into needs a contiguous array")
        path = self._path(CHUNKS, cid)
        target = out.data.cast("B")
        handle = self._open(path)
        if handle is None:
            return False
        with handle:
            inode = os.fstat(handle.fileno())
            intact = inode.st_size == len(target) and handle.readinto(target) == len(target)
        intact = intact and content_id(target) == cid
        self._after_read(path, inode, len(target), intact)
        return intact

    def get_behind(self, cid: str, head: Callable[[int], bytes]) -> bytearray | None:
        """A chunk's bytes, verified, behind ``head(size)`` in one buffer; None when absent or corrupt.

        For a server that sends each chunk inside a frame: the chunk is read from disk straight
        into the frame, which saves two megabyte copies per chunk (BENCHMARKS.md, chunk exchange)."""
        path = self._path(CHUNKS, cid)
        handle = self._open(path)
        if handle is None:
            return None
        with handle:
            inode = os.fstat(handle.fileno())
            prefix = head(inode.st_size)
            buffer = bytearray(len(prefix) + inode.st_size + 1)  # one spare byte: a file that grew
            buffer[: len(prefix)] = prefix
            body = memoryview(buffer)[len(prefix) :]
            got = 0
            while got < len(body) and (step := handle.readinto(body[got:])):
                got += step
        intact = got == inode.st_size and content_id(body[:got]) == cid
        body.release()
        self._after_read(path, inode, got, intact)
        if not intact:
            return None
        del buffer[-1]
        return buffer

    def has(self, cid: str) -> bool:
        return self._path(CHUNKS, cid).is_file()

    def missing(self, cids: Iterable[str]) -> list[str]:
        """The ids among ``cids`` that the store lacks, in first-seen order, once each."""
        return [cid for cid in dict.fromkeys(cids) if not self.has(cid)]

    # -- manifests and records -------------------------------------------------------------

    def put_manifest(self, data: Buffer, manifest_id: str | None = None) -> str:
        """Validate (raises Invalid) and store manifest bytes; return the artifact id."""
        parse_manifest(data)
        return self._put_items(MANIFESTS, [data], [manifest_id] if manifest_id else None)[0]

    def get_manifest(self, manifest_id: str) -> Manifest | None:
        """The parsed manifest, or None when absent or corrupt (then it is deleted)."""
        data = self._get(MANIFESTS, manifest_id)
        if data is None:
            return None
        try:
            return parse_manifest(data)
        except Invalid:
            # Hash-correct but unparsable: written by a build with looser rules. Unusable here.
            self._drop(self._path(MANIFESTS, manifest_id), None)
            return None

    def has_manifest(self, manifest_id: str) -> bool:
        return self._path(MANIFESTS, manifest_id).is_file()

    def manifest_ids(self) -> list[str]:
        return [cid for cid, _ in self._walk(MANIFESTS)]

    def put_record(self, data: Buffer, record_id: str | None = None) -> str:
        """Store a small record's exact bytes (its validation is the caller's); return its id."""
        return self._put_items(RECORDS, [data], [record_id] if record_id else None)[0]

    def get_record(self, record_id: str) -> bytes | None:
        return self._get(RECORDS, record_id)

    def has_record(self, record_id: str) -> bool:
        return self._path(RECORDS, record_id).is_file()

    # -- pins and garbage collection -------------------------------------------------------

    def pin(self, name: str, ids: Iterable[str]) -> None:
        """Set pin ``name`` (e.g. "head:<id>") to ``ids``: records, manifests (with all their
        chunks) or chunks that GC must keep. Replaces the pin's previous ids."""
        if not (isinstance(name, str) and 0 < len(name.encode()) <= MAX_PIN_NAME):
            raise Invalid("bad_pin", f"pin name {name!r:.80}")
        pinned = frozenset(ids)
        if not all(is_content_id(cid) for cid in pinned):
            raise Invalid("bad_cid", f"pin {name} lists a malformed id")
        data = canonical.encode({"name": name, "ids": sorted(pinned)})
        with self._lock:
            if self._pins.get(name) == pinned:
                return  # unchanged: set again every round, and no reason to write it again
            write_atomic(self._pin_path(name), data)
            self._pins[name] = pinned

    def unpin(self, name: str) -> None:
        with self._lock:
            if self._pins.pop(name, None) is not None:
                self._pin_path(name).unlink(missing_ok=True)
                fsync_dir(self.root / _PINS)

    def pins(self) -> dict[str, frozenset[str]]:
        with self._lock:
            return dict(self._pins)

    def gc(self, keep_recent_s: float = 0.0) -> GcReport:
        """Delete every item no pin keeps, except those written in the last ``keep_recent_s``
        seconds (so a fetch that has not pinned yet keeps its chunks)."""
        report = GcReport()
        cutoff = time.time() - keep_recent_s
        with self._lock:
            live = self._live_ids()
            for kind in KINDS:
                for cid, path in self._walk(kind):
                    try:
                        info = path.stat()
                    except FileNotFoundError:
                        continue
                    if cid in live or info.st_mtime > cutoff:
                        report.kept += 1
                        continue
                    if _remove_entry(path):
                        report.removed += 1
                        report.bytes_freed += info.st_size if stat.S_ISREG(info.st_mode) else 0
            self._counters.gc_removed += report.removed
        return report

    def _live_ids(self) -> set[str]:
        live: set[str] = set().union(*self._pins.values())
        for cid in list(live):
            manifest = self.get_manifest(cid)
            if manifest is not None:
                live.update(chunk.cid for chunk in manifest.chunks)
        return live

    # -- startup check and counters --------------------------------------------------------

    def check(self, full: bool = False) -> CheckReport:
        """Drop leftover temp files, stray names and corrupt items; call before serving.

        The cheap check rehashes manifests and records (small) and checks each chunk's size
        against the stored manifests; ``full`` rehashes every chunk too.
        """
        report = CheckReport()
        for directory in (*(self.root / kind for kind in KINDS), self.root / _PINS):
            for path in directory.rglob(_TEMP_PREFIX + "*"):
                path.unlink(missing_ok=True)
                report.temp_files += 1
        for kind in KINDS:
            for path in (self.root / kind).rglob("*"):
                if path.is_file() and _cid_of(path, self.root / kind) is None:
                    path.unlink(missing_ok=True)
                    report.stray_files += 1
        chunk_sizes: dict[str, int] = {}
        for cid, _ in self._walk(MANIFESTS):
            report.checked += 1
            manifest = self.get_manifest(cid)
            if manifest is None:
                report.corrupt.append(cid)
            else:
                chunk_sizes.update((chunk.cid, chunk.size) for chunk in manifest.chunks)
        for cid, _ in self._walk(RECORDS):
            report.checked += 1
            if self._get(RECORDS, cid) is None:
                report.corrupt.append(cid)
        for cid, path in self._walk(CHUNKS):
            report.checked += 1
            if full:
                intact = self._verify(CHUNKS, cid)
            else:
                info = path.stat()
                intact = stat.S_ISREG(info.st_mode) and chunk_sizes.get(cid, info.st_size) == info.st_size
                if not intact:
                    self._drop(path, None)
            if not intact:
                report.corrupt.append(cid)
        return report

    def counters(self) -> StoreCounters:
        with self._lock:
            return replace(self._counters)

    # -- internals -------------------------------------------------------------------------

    def _path(self, kind: str, cid: str) -> Path:
        """Where an item lives; a malformed id raises Invalid("bad_cid") before touching disk."""
        if not is_content_id(cid):
            raise Invalid("bad_cid", f"{cid!r:.80}")
        digest = cid[len(PREFIX) :]
        return self.root / kind / digest[:2] / digest

    def _pin_path(self, name: str) -> Path:
        return self.root / _PINS / name.encode().hex()

    def _put_items(
        self, kind: str, items: list[Buffer], cids: list[str] | None, drop_cache: bool = False
    ) -> list[str]:
        ids = [content_id(item) for item in items]
        if cids is not None and cids != ids:
            raise Invalid("bad_chunk" if kind == CHUNKS else "bad_cid", "data does not match its id")
        written: list[tuple[Path, Path]] = []
        new_directories = set()
        try:
            for cid, item in zip(ids, items):
                path = self._path(kind, cid)
                if _touch(path):
                    self._count(items_deduplicated=1)
                    continue
                if not path.parent.is_dir():
                    path.parent.mkdir(exist_ok=True)
                    new_directories.add(path.parent.parent)
                written.append((_write_temp(path.parent, item, drop_cache), path))
                self._count(bytes_written=memoryview(item).nbytes, items_written=1)
            with self._lock:
                for temp, path in written:
                    try:
                        os.replace(temp, path)
                    except IsADirectoryError:
                        # A directory where the item belongs is no item: an empty one goes, and
                        # one with files in it is left to the operator (the put fails).
                        if not _remove_entry(path):
                            raise
                        os.replace(temp, path)
        finally:
            for temp, _ in written:
                temp.unlink(missing_ok=True)
        # A fan-out directory created just now needs its own entry made durable as well.
        for directory in {path.parent for _, path in written} | new_directories:
            fsync_dir(directory)
        return ids

    def _get(self, kind: str, cid: str) -> bytes | None:
        path = self._path(kind, cid)
        handle = self._open(path)
        if handle is None:
            return None
        with handle:
            inode = os.fstat(handle.fileno())
            if inode.st_size > _LARGEST.get(kind, inode.st_size):
                # Larger than any item of its kind can be: not read into memory at all.
                self._drop(path, inode)
                return None
            data = handle.read()
        intact = content_id(data) == cid
        self._after_read(path, inode, len(data), intact)
        return data if intact else None

    def _verify(self, kind: str, cid: str) -> bool:
        """Whether an item is on disk and hashes to its id, read a block at a time (a file of
        any size costs one block of memory); a corrupt one is dropped."""
        path = self._path(kind, cid)
        handle = self._open(path)
        if handle is None:
            return False
        hasher = content_hasher()
        block = memoryview(bytearray(_VERIFY_BLOCK))
        size = 0
        with handle:
            inode = os.fstat(handle.fileno())
            while step := handle.readinto(block):
                hasher.update(block[:step])
                size += step
        intact = size == inode.st_size and content_id_of(hasher) == cid
        self._after_read(path, inode, size, intact)
        return intact

    def _open(self, path: Path) -> io.FileIO | None:
        """An item's file opened for reading; None when there is none. Anything but a regular
        file in its place (a directory, a FIFO, a socket) is no item: it is dropped like a
        corrupt file. O_NONBLOCK: opening a FIFO must not wait for a writer (a regular file
        ignores the flag)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                return io.FileIO(fd, "rb", closefd=True)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        self._drop(path, None)
        return None

    def _after_read(self, path: Path, inode: os.stat_result, size: int, intact: bool) -> None:
        if intact:
            self._count(bytes_read=size, items_verified=1)
        else:
            self._drop(path, inode)

    def _drop(self, path: Path, inode: os.stat_result | None) -> None:
        """Delete a corrupt file, unless a good copy was renamed over it since it was read."""
        with self._lock:
            try:
                current = path.stat()
            except FileNotFoundError:
                return
            if inode is None or (current.st_ino, current.st_dev) == (inode.st_ino, inode.st_dev):
                if _remove_entry(path):
                    self._counters.corrupt_dropped += 1

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self._counters, name, getattr(self._counters, name) + delta)

    def _walk(self, kind: str) -> list[tuple[str, Path]]:
        directory = self.root / kind
        found = []
        for path in directory.glob("??/*"):
            cid = _cid_of(path, directory)
            if cid is not None:
                found.append((cid, path))
        return found

    def _load_pins(self) -> dict[str, frozenset[str]]:
        """Pins from disk. An unreadable pin file raises: silently dropping it could let GC
        delete the head it protects."""
        pins = {}
        limits = canonical.Limits(max_size=64 << 20, max_array_len=1 << 20)
        for path in (self.root / _PINS).iterdir():
            if not path.name.startswith(_TEMP_PREFIX):
                value = canonical.decode(path.read_bytes(), limits)
                pins[value["name"]] = frozenset(value["ids"])
        return pins


# The largest a manifest or record file can be; a larger file is dropped without being read.
# Chunks have no such bound here: a workload's microshards are stored as chunks too.
_LARGEST = {MANIFESTS: MAX_MANIFEST_SIZE, RECORDS: MAX_ITEM_BYTES}
_VERIFY_BLOCK = 1 << 20


def _cid_of(path: Path, directory: Path) -> str | None:
    """The content id a file in ``directory`` stands for, or None for anything out of place."""
    cid = PREFIX + path.name
    if not is_content_id(cid) or path.parent.parent != directory or path.parent.name != path.name[:2]:
        return None
    return cid


def _touch(path: Path) -> bool:
    """Refresh an existing item's mtime (GC's keep-recent window counts from a re-put too);
    False when there is no such item, or something other than a regular file is in its place."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(info.st_mode):
        return False
    os.utime(path)
    return True


def _remove_entry(path: Path) -> bool:
    """Delete what is at ``path``: a file of any type, or an empty directory. False when a
    directory with something in it stays: reads and GC do not empty directories (the startup
    check removes files that are out of place, as it always has)."""
    try:
        path.unlink(missing_ok=True)
        return True
    except OSError:
        if not path.is_dir():
            raise
    try:
        path.rmdir()
    except OSError:
        return False
    return True


def _write_temp(directory: Path, data: Buffer, drop_cache: bool = False) -> Path:
    """Write ``data`` to a new, synced temp file in ``directory``; the caller renames it.

    ``drop_cache``: once the data is on disk, tell the kernel its pages need not stay cached.
    Fetched chunks arrive by the hundreds of MiB per head and most are read again rarely, if
    ever; left cached they push out what is read often, and every fetch takes fresh pages
    (which on a VM can cost a host fault per page; BENCHMARKS.md, chunk exchange).
    """
    path = directory / f"{_TEMP_PREFIX}{secrets.token_hex(8)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with open(fd, "wb", buffering=0) as handle:
            view = memoryview(data).cast("B")
            while view:
                view = view[handle.write(view) :]
            _sync_data(handle.fileno())
            if drop_cache and _fadvise is not None:
                _fadvise(handle.fileno(), 0, 0, _DONTNEED)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def write_atomic(path: Path, data: Buffer) -> None:
    """Replace ``path`` with ``data`` atomically: temp file in the same folder, fsync, rename, fsync the folder."""
    temp = _write_temp(path.parent, data)
    os.replace(temp, path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
