"""Weight downloads leave at most a few exports on disk, however many heads are asked for."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

from safetensors.torch import load

from node.exports import EXPORTS_KEPT, ExportCache
from tests.swarm_harness import logs_on_failure, training_swarm


def test_every_head_downloads_whole_and_only_the_newest_exports_stay(tmp_path: Path) -> None:
    swarm = training_swarm(tmp_path, 1, min_head_round=EXPORTS_KEPT + 2)
    peer = swarm.peers[0]
    try:
        with logs_on_failure(swarm):
            heads = [row["id"] for row in peer.get("/heads")["heads"]][: EXPORTS_KEPT + 3]
            assert len(heads) > EXPORTS_KEPT + 1
            for head in heads + heads[-1:]:
                with urllib.request.urlopen(f"{peer.url}/heads/{head}/weights", timeout=60) as response:
                    tensors = load(response.read())
                assert tensors and all(t.numel() for t in tensors.values())
            exports = sorted(p.name for p in (peer.data_dir / "exports").iterdir())
            assert len(exports) == EXPORTS_KEPT, exports
    finally:
        swarm.stop_all()


def test_the_cache_keeps_its_bounds_and_an_evicted_export_still_streams(tmp_path: Path) -> None:
    cache = ExportCache(tmp_path, keep=2, max_bytes=250)

    async def main() -> tuple[list[str], bytes, list[str]]:
        def writer(size: int):  # type: ignore[no-untyped-def]
            async def write(path: Path) -> None:
                path.write_bytes(bytes([size % 256]) * size)
            return write

        first, _ = await cache.open("a", writer(100))
        await asyncio.sleep(0.01)
        for name in ("b", "c"):
            file, _ = await cache.open(name, writer(100))
            file.close()
            await asyncio.sleep(0.01)
        names = sorted(p.name for p in tmp_path.iterdir())
        evicted = first.read()
        first.close()
        big, size = await cache.open("d", writer(300))  # alone beyond the byte bound: kept, the rest go
        big.close()
        return names, evicted, sorted(p.name for p in tmp_path.iterdir())

    names, evicted, after_big = asyncio.run(main())
    assert names == ["b.safetensors", "c.safetensors"]
    assert evicted == bytes([100]) * 100
    assert after_big == ["d.safetensors"]
