"""Chunk exchange throughput, side by side in one run, every transfer between two processes:

1. a daemon fetching an artifact from one daemon (``POST /fetches`` until ``done``, chunks
   verified and fsynced into the store);
2. the same bytes over one bare py-libp2p stream (noise + yamux), raw trio, no bridge: once
   with py-libp2p as it ships and once with the daemon's changes to its transport
   (``node.libp2p.patches.apply``);
3. the same bytes over one libp2p stream through ``Libp2pBridge`` frames (the daemon's path);
4. the same bytes over plain asyncio + uvloop TCP on loopback;
5. a daemon fetching the artifact from three daemons at once;
6. a daemon fetching it from one of three daemons (the other two in the swarm, without it):
   the same four daemons on the machine as in 5, so that comparing 5 with 6 changes only how
   many peers provide the artifact, not how many daemons share the cores.

Each daemon fetch (1, 5, 6) is the first fetch of fresh daemons, and is followed by a second
fetch of another artifact of the same size from the same daemons (the rows ending "next"), as a
running daemon fetches: a head's weights and then its momentum, the same providers for both.

Each transfer also reports the CPU time its receiving and sending processes spent on it
(user + system, every thread; in 6 the two daemons without the artifact count among the
senders), so a run shows whether the machine's cores, rather than the
protocol, set the pace: the fetch does more work per byte than a bare stream (verifying and
durably storing every chunk) and, with both processes on a small machine, pays for it in rate.

Run from the repository root: python -m bench.bench_exchange [--mib 256] [--repeats 1]
With several repeats it prints the best of each transfer, and the target ratios taken within each
attempt (their median), which the machine's drift between attempts disturbs less.
``--frame-sweep 65536,131072,...`` instead runs only the tuned bare stream at each yamux frame size.
``--pace-sweep 0,300,100`` instead runs only the bridge stream, its reader held to each rate in
MiB/s (0: as fast as it can), to show how the cost per byte of each end grows as the rate falls.
``--paired 12`` instead runs twelve pairs of daemon fetches in one swarm of three seeds, a
fresh fetcher for each fetch: one of an artifact only one seed holds, one of an artifact all
three hold (``paired_fetches``), and prints their ratio's median with a 95% interval for it.
It starts its own processes on 127.0.0.1 and stops them before it exits. Linux only (the CPU
times come from /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20
BLOCK = MIB
ACK = b"ok"
ANNOUNCE_INTERVAL_S = 5.0  # exchange.announce_interval_s, default
_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a live process (all its threads) has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


@dataclass
class Transfer:
    """One transfer: its wall time and the CPU seconds each side spent during it."""

    seconds: float
    receiver_cpu_s: float
    sender_cpu_s: float


# ---- bare transports: a server process that reads N bytes and answers "ok" ---------------


async def receive_all(read, total: int) -> bool:
    """Read blocks with ``read(n)`` (trio or asyncio) until ``total`` bytes came; False if the sender stopped."""
    got = 0
    while got < total:
        data = await read(BLOCK)
        if not data:
            return False
        got += len(data)
    return True


def _raw_libp2p_host(seed: bytes, tuned: bool):
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.crypto.x25519 import create_new_key_pair as x25519_pair
    from libp2p.custom_types import TProtocol
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE
    from libp2p.security.noise.transport import Transport as NoiseTransport
    from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX
    from libp2p.stream_muxer.yamux.yamux import Yamux

    from node.libp2p import patches

    if tuned:
        patches.apply()
        frame = os.environ.get(FRAME_SWEEP_ENV)
        if frame:  # --frame-sweep: this run's yamux frame size instead of the daemon's
            from libp2p.stream_muxer.yamux import yamux as yamux_module

            yamux_module.MAX_MESSAGE_SIZE = int(frame)
    else:
        for name in patches.YAMUX_TUNING:
            os.environ.pop(name, None)
    key_pair = create_new_key_pair(seed)
    # The daemon's transport choices (see node/libp2p/bridge.py): noise only, yamux only; with
    # ``tuned``, its changes to py-libp2p's transport as well, else py-libp2p as it ships.
    return new_host(
        key_pair=key_pair,
        sec_opt={TProtocol(NOISE): NoiseTransport(key_pair, noise_privkey=x25519_pair().private_key)},
        muxer_opt={TProtocol(YAMUX): Yamux},
    )


BENCH_PROTOCOL = "/p2p-node/bench/1.0.0"
FRAME_SWEEP_ENV = "P2P_BENCH_YAMUX_FRAME_BYTES"
PACE_SWEEP_ENV = "P2P_BENCH_READ_MIB_PER_S"


def serve_raw_libp2p(total: int, tuned: bool = False) -> None:
    import multiaddr
    import trio

    async def main() -> None:
        host = _raw_libp2p_host(b"s" * 32, tuned)
        listen = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")

        async def handler(stream) -> None:
            if not await receive_all(stream.read, total):
                return
            await stream.write(ACK)
            await stream.close()

        async with host.run(listen_addrs=[listen]):
            host.set_stream_handler(BENCH_PROTOCOL, handler)
            print(json.dumps({"addr": f"{host.get_addrs()[0]}"}), flush=True)
            await trio.sleep_forever()

    trio.run(main)


def client_raw_libp2p(addr: str, total: int, tuned: bool = False) -> tuple[float, float]:
    import multiaddr
    import trio
    from libp2p.peer.peerinfo import info_from_p2p_addr

    result: list[float] = []

    async def main() -> None:
        host = _raw_libp2p_host(b"c" * 32, tuned)
        info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            await host.connect(info)
            block = bytes(BLOCK)
            started, cpu = time.perf_counter(), time.process_time()
            stream = await host.new_stream(info.peer_id, [BENCH_PROTOCOL])
            for _ in range(total // BLOCK):
                await stream.write(block)
            ack = await stream.read(len(ACK))
            result.extend((time.perf_counter() - started, time.process_time() - cpu))
            assert ack == ACK, ack
            await stream.close()

    trio.run(main)
    return result[0], result[1]


def serve_bridge(total: int) -> None:
    import uvloop

    from node.libp2p import FramedStream, Libp2pBridge

    async def main() -> None:
        bridge = Libp2pBridge(b"s" * 32, ["/ip4/127.0.0.1/tcp/0"], kademlia=False)
        await bridge.start()

        # --pace-sweep: read no faster than this (MiB/s), as a fetcher with more to do per byte does.
        pace = float(os.environ.get(PACE_SWEEP_ENV, "0")) * MIB

        async def handler(stream: FramedStream) -> None:
            got, started = 0, time.perf_counter()
            while got < total:
                got += len(await stream.read_frame(BLOCK + 64, timeout=60))
                if pace and (ahead := got / pace - (time.perf_counter() - started)) > 0:
                    await asyncio.sleep(ahead)
            await stream.write_frame(ACK, timeout=10)

        await bridge.set_stream_handler(BENCH_PROTOCOL, handler)
        print(json.dumps({"addr": bridge.listen_addrs()[0]}), flush=True)
        await asyncio.Event().wait()

    uvloop.run(main())


def client_bridge(addr: str, total: int) -> tuple[float, float]:
    import uvloop

    from node.libp2p import Libp2pBridge

    async def main() -> tuple[float, float]:
        bridge = Libp2pBridge(b"c" * 32, ["/ip4/127.0.0.1/tcp/0"], kademlia=False)
        await bridge.start()
        try:
            peer = await bridge.connect(addr, timeout=10)
            block = bytes(BLOCK)
            started, cpu = time.perf_counter(), time.process_time()
            stream = await bridge.open_stream(peer, BENCH_PROTOCOL, timeout=10)
            for _ in range(total // BLOCK):
                await stream.write_frame(block, timeout=30)
            ack = await stream.read_frame(16, timeout=60)
            took = time.perf_counter() - started, time.process_time() - cpu
            assert ack == ACK, ack
            await stream.close()
            return took
        finally:
            await bridge.stop()

    return uvloop.run(main())


def serve_tcp(total: int) -> None:
    import uvloop

    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if not await receive_all(reader.read, total):
                return
            writer.write(ACK)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        print(json.dumps({"addr": f"127.0.0.1:{port}"}), flush=True)
        await asyncio.Event().wait()

    uvloop.run(main())


def client_tcp(addr: str, total: int) -> tuple[float, float]:
    import uvloop

    async def main() -> tuple[float, float]:
        host, port = addr.split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        block = bytes(BLOCK)
        started, cpu = time.perf_counter(), time.process_time()
        for _ in range(total // BLOCK):
            writer.write(block)
            await writer.drain()
        ack = await reader.readexactly(len(ACK))
        took = time.perf_counter() - started, time.process_time() - cpu
        assert ack == ACK
        writer.close()
        return took

    return uvloop.run(main())


SERVERS = {
    "raw-libp2p": serve_raw_libp2p,
    "raw-libp2p-tuned": functools.partial(serve_raw_libp2p, tuned=True),
    "bridge": serve_bridge,
    "tcp": serve_tcp,
}
CLIENTS = {
    "raw-libp2p": client_raw_libp2p,
    "raw-libp2p-tuned": functools.partial(client_raw_libp2p, tuned=True),
    "bridge": client_bridge,
    "tcp": client_tcp,
}


def bare_transfer(kind: str, total: int, env: dict[str, str] | None = None) -> Transfer:
    """Move ``total`` bytes from a client process to a server process over ``kind``
    (``env``: extra environment for both processes)."""
    env = {**os.environ, **(env or {})}
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.bench_exchange", "--serve", kind, "--bytes", str(total)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        addr = json.loads(server.stdout.readline())["addr"]
        idle_cpu = cpu_seconds(server.pid)
        client = subprocess.run(
            [sys.executable, "-m", "bench.bench_exchange", "--client", kind, "--addr", addr, "--bytes", str(total)],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
            env=env,
        )
        # The server has read everything and answered by now; it was idle while the client started.
        receiver_cpu = cpu_seconds(server.pid) - idle_cpu
        result = json.loads(client.stdout.strip().splitlines()[-1])
        return Transfer(float(result["seconds"]), receiver_cpu, float(result["cpu_seconds"]))
    finally:
        server.kill()
        server.wait()


def frame_sweep(total: int, sizes: list[int], repeats: int) -> None:
    """The tuned bare stream with each yamux frame size (both ends), best of ``repeats`` each."""
    gib = total / (1 << 30)
    print(f"{'frame bytes':>12} {'MiB/s':>8} {'receiver CPU s/GiB':>19} {'sender CPU s/GiB':>17}")
    for size in sizes:
        runs = [bare_transfer("raw-libp2p-tuned", total, {FRAME_SWEEP_ENV: str(size)}) for _ in range(repeats)]
        best = min(runs, key=lambda t: t.seconds)
        print(f"{size:>12} {total / MIB / best.seconds:8.1f} {best.receiver_cpu_s / gib:19.2f}"
              f" {best.sender_cpu_s / gib:17.2f}", flush=True)


def pace_sweep(total: int, rates: list[float], repeats: int) -> None:
    """The bridge stream with its receiver reading no faster than each rate (0: unpaced), runs
    interleaved, median of ``repeats`` each: what the same bytes cost each end at a lower rate."""
    gib = total / (1 << 30)
    runs: dict[float, list[Transfer]] = {rate: [] for rate in rates}
    for _ in range(repeats):
        for rate in rates:
            runs[rate].append(bare_transfer("bridge", total, {PACE_SWEEP_ENV: str(rate)}))
    print(f"{'read limit MiB/s':>16} {'MiB/s':>8} {'receiver CPU s/GiB':>19} {'sender CPU s/GiB':>17}  (medians)")
    for rate, transfers in runs.items():
        print(f"{rate or 'none':>16} {statistics.median(total / MIB / t.seconds for t in transfers):8.1f}"
              f" {statistics.median(t.receiver_cpu_s for t in transfers) / gib:19.2f}"
              f" {statistics.median(t.sender_cpu_s for t in transfers) / gib:17.2f}", flush=True)


# ---- daemons -------------------------------------------------------------------------


def seed_artifact(data_dirs: list[Path], mib: int, seed: int = 0) -> str:
    """The bench's artifact (``mib`` MiB of float32 in 4 MiB tensors, from ``seed``) stored in
    the store of each daemon data directory in ``data_dirs``; its manifest id."""
    import torch

    from node.artifacts import store_artifact
    from node.store import ContentStore

    generator = torch.Generator().manual_seed(seed)
    tensors = {f"t{i}": torch.randn(1024, 1024, generator=generator) for i in range(mib // 4)}
    manifest_id = ""
    for data_dir in data_dirs:
        manifest_id = store_artifact(ContentStore(data_dir / "store"), tensors)  # the same id each time
    return manifest_id


def daemon_fetch(
    root: Path, mib: int, providers: int, others: int = 0, fan_out: str = "adaptive"
) -> tuple[Transfer, Transfer]:
    """``POST /fetches`` until ``done`` for a daemon fetching from ``providers`` seeds, with
    ``others`` more daemons in the swarm that do not hold the artifact; ``fan_out`` is the
    fetcher's ``exchange.fan_out``. Two artifacts, one fetch after the other: the first fetch
    of fresh daemons, then the next one, as a running daemon fetches (a head's weights, then
    its momentum)."""
    from tests.swarm_harness import Swarm

    swarm = Swarm(root / f"swarm{providers}-{others}-{fan_out}")
    seeds = [swarm.add(_quiet(fan_out)) for _ in range(providers + others)]
    fetcher = swarm.add(_quiet(fan_out), token="bench")
    manifest_ids = [seed_artifact([seed.data_dir for seed in seeds[:providers]], mib, n) for n in range(2)]
    try:
        for peer in [*seeds, fetcher]:
            peer.start()
        for peer in seeds:
            peer.wait_healthy(90)
        return _fetch_twice(fetcher, seeds, manifest_ids)
    finally:
        swarm.stop_all()


def _quiet(fan_out: str = "adaptive") -> str:
    # Every other setting at its default, as a swarm would run: announcements every 5 s among them.
    return f'[training]\nrole = "consumer"\nevaluate = false\n\n[exchange]\nfan_out = "{fan_out}"\n'


def _fetch_twice(fetcher, seeds: list, manifest_ids: list[str]) -> tuple[Transfer, Transfer]:
    """Start-to-done times of ``fetcher`` (started) fetching each of two artifacts in turn, once
    it sees and knows every seed, with the CPU each process spent meanwhile."""
    from tests.swarm_harness import wait_until

    peers = [*seeds, fetcher]
    fetcher.wait_healthy(90)
    wanted = {seed.peer_id for seed in seeds}
    wait_until(lambda: wanted <= fetcher.live_peers(), 60, what="the fetcher to see every seed")
    wait_until(
        lambda: ((fetcher.get("/status") or {}).get("peers") or {}).get("connected", 0) >= len(seeds),
        60,
        what="the fetcher to connect to every seed",
    )
    # One round of announcements after the mesh formed: the fetcher knows every seed.
    time.sleep(ANNOUNCE_INTERVAL_S + 1.0)
    transfers = []
    for manifest_id in manifest_ids:
        cpu = {peer.peer_id: cpu_seconds(peer.process.pid) for peer in peers}
        status, body = fetcher.post("/fetches", {"manifest": manifest_id})
        assert status == 202, body

        def done(manifest_id: str = manifest_id) -> dict | None:
            rows = (fetcher.get("/fetches") or {}).get("fetches", [])
            ended = ("done", "failed")
            return next((r for r in rows if r["manifest_id"] == manifest_id and r["state"] in ended), None)

        # The fetch's own clock (POST to done, inside the fetcher) times it, so the status
        # polls can be sparse: at 50 Hz they took a noticeable part of the fetcher's event loop.
        view = wait_until(done, 300, interval=0.1, what="the fetch")
        spent = {peer.peer_id: cpu_seconds(peer.process.pid) - cpu[peer.peer_id] for peer in peers}
        assert view["state"] == "done", view
        if len(view["providers"]) > 1:
            print(f"    providers: {len(view['providers'])}, fan-out: {view['fan_out']}", flush=True)
        seeds_cpu = sum(spent[seed.peer_id] for seed in seeds)
        transfers.append(Transfer(view["elapsed_s"], spent[fetcher.peer_id], seeds_cpu))
    return transfers[0], transfers[1]


def paired_fetches(root: Path, mib: int, pairs: int) -> list[dict[str, Transfer]]:
    """Fetch from one seed against fetch from three, in one swarm of three seeds that runs for
    the whole bench: of its four artifacts, two are held by the first seed alone and two by all
    three. Each fetch is made by a fresh fetcher daemon (nothing learnt, nothing held), which
    fetches both artifacts of one kind (first and next) and leaves. The two fetchers of a pair
    take turns going first. Only what a fetch is offered differs between the two: the same
    daemons share the cores, seconds apart, where separate swarms a minute apart differ by this
    VM's drift."""
    from tests.swarm_harness import Swarm

    swarm = Swarm(root / "paired")
    seeds = [swarm.add(_quiet()) for _ in range(3)]
    one = [seed_artifact([seeds[0].data_dir], mib, n) for n in (10, 11)]
    three = [seed_artifact([seed.data_dir for seed in seeds], mib, n) for n in (20, 21)]
    results: list[dict[str, Transfer]] = []
    try:
        for seed in seeds:
            seed.start()
        for seed in seeds:
            seed.wait_healthy(90)
        for pair in range(pairs):
            print(f"pair {pair + 1}/{pairs}: {mib} MiB", flush=True)
            results.append({})
            for kind, manifest_ids in [("1", one), ("3", three)][:: 1 if pair % 2 == 0 else -1]:
                fetcher = swarm.add(_quiet(), token="bench")
                fetcher.start()
                try:
                    first, then = _fetch_twice(fetcher, seeds, manifest_ids)
                finally:
                    fetcher.terminate(30)
                    shutil.rmtree(fetcher.data_dir, ignore_errors=True)
                for name, transfer in ((f"fetch, {kind} of 3 seeds", first), (f"fetch, {kind} of 3 seeds, next", then)):
                    results[-1][name] = transfer
                    print(f"  {name:<30} {transfer.seconds:6.2f} s  {mib / transfer.seconds:7.1f} MiB/s"
                          f"   CPU s: receiver {transfer.receiver_cpu_s:5.2f}, seeds {transfer.sender_cpu_s:5.2f}",
                          flush=True)
    finally:
        swarm.stop_all()
    return results


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median of ``values``: the order statistics between
    which the median lies with at least ``confidence`` (the sign test's binomial). With fewer
    than six values no such pair exists, and it spans them all."""
    ordered, n = sorted(values), len(values)
    k, below = 0, 0.0  # below: P(Binomial(n, 1/2) <= k - 1)
    while k < n // 2:
        nxt = below + math.comb(n, k) / 2**n
        if 2 * nxt > 1 - confidence:
            break
        below, k = nxt, k + 1
    if k == 0:
        return ordered[0], ordered[-1]
    return ordered[k - 1], ordered[n - k]


def print_pairs(results: list[dict[str, Transfer]], mib: int) -> None:
    print("\nfetch(3 of 3 seeds) / fetch(1 of 3 seeds), the same swarm, pair by pair "
          "(median, 95% interval for the median, then each pair in order):")
    for label, suffix in (("first fetch", ""), ("next fetch", ", next")):
        ratios = [r[f"fetch, 1 of 3 seeds{suffix}"].seconds / r[f"fetch, 3 of 3 seeds{suffix}"].seconds for r in results]
        low, high = median_interval(ratios)
        each = ", ".join(f"{ratio:.2f}" for ratio in ratios)
        print(f"  {label:<12}: {statistics.median(ratios):5.2f}  [{low:.2f}, {high:.2f}]  ({each})  (target >= 1.00)")
    for suffix in ("", ", next"):
        for kind in ("1", "3"):
            name = f"fetch, {kind} of 3 seeds{suffix}"
            rates = [mib / r[name].seconds for r in results]
            cpu = statistics.median(r[name].receiver_cpu_s for r in results) * 1024 / mib
            print(f"  {name:<30} median {statistics.median(rates):6.1f} MiB/s, receiver {cpu:4.2f} CPU s/GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256, help="artifact / transfer size in MiB (multiple of 4)")
    parser.add_argument("--repeats", type=int, default=1, help="best of N for each measurement")
    parser.add_argument("--frame-sweep", metavar="BYTES,BYTES,...",
                        help="instead: the tuned bare stream at each of these yamux frame sizes")
    parser.add_argument("--pace-sweep", metavar="MIB/S,MIB/S,...",
                        help="instead: the bridge stream with its reader limited to each rate (0: no limit)")
    parser.add_argument("--paired", type=int, metavar="N",
                        help="instead: N pairs of fetches, from one seed and from three, in one swarm")
    parser.add_argument("--fetches-only", action="store_true",
                        help="only the daemon fetches (the second target's rows), not the bare transports")
    parser.add_argument("--serve", choices=sorted(SERVERS), help=argparse.SUPPRESS)
    parser.add_argument("--client", choices=sorted(CLIENTS), help=argparse.SUPPRESS)
    parser.add_argument("--addr", help=argparse.SUPPRESS)
    parser.add_argument("--bytes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        SERVERS[args.serve](args.bytes)
        return
    if args.client:
        seconds, cpu = CLIENTS[args.client](args.addr, args.bytes)
        print(json.dumps({"seconds": seconds, "cpu_seconds": cpu}), flush=True)
        return

    total = args.mib * MIB
    if args.frame_sweep:
        frame_sweep(total, [int(size) for size in args.frame_sweep.split(",")], args.repeats)
        return
    if args.pace_sweep:
        pace_sweep(total, [float(rate) for rate in args.pace_sweep.split(",")], args.repeats)
        return
    if args.paired:
        root = Path(tempfile.mkdtemp(prefix="bench-exchange-"))
        try:
            print_pairs(paired_fetches(root, args.mib, args.paired), args.mib)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        return
    best: dict[str, Transfer] = {}
    runs: list[dict[str, Transfer]] = []  # each attempt's transfers, for ratios within one attempt

    def record(name: str, transfer: Transfer) -> None:
        runs[-1][name] = transfer
        if name not in best or transfer.seconds < best[name].seconds:
            best[name] = transfer
        print(f"  {name:<37} {transfer.seconds:7.2f} s  {total / MIB / transfer.seconds:8.1f} MiB/s"
              f"   CPU s: receiver {transfer.receiver_cpu_s:5.2f}, sender(s) {transfer.sender_cpu_s:5.2f}", flush=True)

    root = Path(tempfile.mkdtemp(prefix="bench-exchange-"))
    try:
        for attempt in range(args.repeats):
            print(f"run {attempt + 1}/{args.repeats}: {args.mib} MiB", flush=True)
            runs.append({})
            first, then = daemon_fetch(root / f"r{attempt}", args.mib, 1)
            record("fetch, 1 provider", first)
            record("fetch, 1 provider, next", then)
            if not args.fetches_only:
                record("bare libp2p stream, stock", bare_transfer("raw-libp2p", total))
                record("bare libp2p stream, tuned", bare_transfer("raw-libp2p-tuned", total))
                record("libp2p stream via bridge", bare_transfer("bridge", total))
                record("asyncio+uvloop TCP", bare_transfer("tcp", total))
            # The two fetches from three providers take turns going first: a fetch can be slowed by
            # the one before it (its files, its daemons' exit), and that must not favour either.
            for fan_out in ("adaptive", "wide")[:: 1 if attempt % 2 == 0 else -1]:
                name = "fetch, 3 providers" + (", all at once" if fan_out == "wide" else "")
                first, then = daemon_fetch(root / f"r{attempt}", args.mib, 3, fan_out=fan_out)
                record(name, first)
                record(name + ", next", then)
            first, then = daemon_fetch(root / f"r{attempt}", args.mib, 1, others=2)
            record("fetch, 1 provider of 3 daemons", first)
            record("fetch, 1 provider of 3 daemons, next", then)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    cores = os.cpu_count() or 1
    gib = total / (1 << 30)
    print(f"\nbest of each; CPU seconds per GiB moved; the rate {cores} cores could sustain at that CPU cost:")
    print(f"  {'':<37} {'MiB/s':>8} {'receiver':>9} {'sender(s)':>9} {'both':>7} {'CPU-bound MiB/s':>16}")
    rates: dict[str, float] = {}
    for name, transfer in best.items():
        rates[name] = total / MIB / transfer.seconds
        both = transfer.receiver_cpu_s + transfer.sender_cpu_s
        print(f"  {name:<37} {rates[name]:8.1f} {transfer.receiver_cpu_s / gib:9.2f} "
              f"{transfer.sender_cpu_s / gib:9.2f} {both / gib:7.2f} {cores * total / MIB / both:16.1f}")

    def cpu_per_byte(name: str) -> float:
        return (best[name].receiver_cpu_s + best[name].sender_cpu_s) / total

    # (label, numerator row, denominator row, target): a ratio of rates, printed where both rows ran.
    ratios = [
        ("fetch(1) / bare stream, stock py-libp2p", "fetch, 1 provider", "bare libp2p stream, stock", ">= 0.80"),
        ("fetch(1) / bare stream, daemon's tuning", "fetch, 1 provider", "bare libp2p stream, tuned", ""),
        ("fetch(1) / bridge stream", "fetch, 1 provider", "libp2p stream via bridge", ""),
        ("bare stream, tuned / stock", "bare libp2p stream, tuned", "bare libp2p stream, stock", ""),
        ("bare stream, stock / uvloop TCP", "bare libp2p stream, stock", "asyncio+uvloop TCP", ""),
        ("fetch(3) / fetch(1)", "fetch, 3 providers", "fetch, 1 provider", ">= 1.00"),
        ("fetch(3) / fetch(1), both in 4 daemons", "fetch, 3 providers", "fetch, 1 provider of 3 daemons", ""),
        ("fetch(1), 4 daemons / 2 daemons", "fetch, 1 provider of 3 daemons", "fetch, 1 provider", ""),
        ("fetch(3) all at once / fetch(1)", "fetch, 3 providers, all at once", "fetch, 1 provider", ""),
        ("fetch(3) / fetch(3) all at once", "fetch, 3 providers", "fetch, 3 providers, all at once", ""),
        ("next fetch: fetch(3) / fetch(1)", "fetch, 3 providers, next", "fetch, 1 provider, next", ">= 1.00"),
        ("next fetch: fetch(3) / fetch(1), 4 daemons", "fetch, 3 providers, next",
         "fetch, 1 provider of 3 daemons, next", ""),
        ("next fetch: fetch(3) all at once / fetch(1)", "fetch, 3 providers, all at once, next",
         "fetch, 1 provider, next", ""),
    ]
    ratios = [r for r in ratios if r[1] in rates and r[2] in rates]
    print()
    for label, top, bottom, target in ratios:
        print(f"{label:<44} : {rates[top] / rates[bottom]:6.2f}" + (f"  (target {target})" if target else ""))
    for name in ("bare libp2p stream, stock", "bare libp2p stream, tuned"):
        if name in best:
            print(f"CPU per byte, fetch(1) / {name[19:]:<16} : "
                  f"{cpu_per_byte('fetch, 1 provider') / cpu_per_byte(name):6.2f}")
    if len(runs) > 1:
        # This VM's speed drifts between attempts by more than the gaps measured here; a ratio
        # of two transfers from the same attempt (a minute apart) is less exposed to the drift.
        print("\nthe same ratios within each attempt (median, then each attempt in order):")
        for label, top, bottom, _ in ratios:
            within = [run[bottom].seconds / run[top].seconds for run in runs]
            each = ", ".join(f"{ratio:.2f}" for ratio in within)
            print(f"{label:<44} : {statistics.median(within):6.2f}  ({each})")


if __name__ == "__main__":
    main()
