"""Fetch from one provider and from three over bandwidth-limited links, where the fetcher is
not CPU bound: does the fetch use every provider's link?

Each daemon runs in its own Linux network namespace, joined to the others by a veth pair on a
bridge in a hub namespace (as ``scripts/netns_swarm.py`` builds them, on a private test subnet
that exists only inside these namespaces). Every seed's link is limited with ``tc tbf`` to
``--rate`` in the direction it sends; the fetcher's link is not limited. Each fetch runs four
fresh daemons (a fetcher and three seeds): the artifact on one seed; on all three; and on all
three with the fetcher set to draw on every provider at once (``exchange.fan_out = "wide"``)
instead of measuring which width is faster (the default, ``adaptive``). If the exchange
spreads its requests over the providers, three providers move about three times what one
does; on loopback (``bench_exchange``) the machine's cores, not the links, set the rate.

Run from the repository root, as root (namespaces and tc): python -m bench.bench_exchange_links
[--mib 64] [--rate 100mbit] [--repeats 1]. It removes its namespaces and files before it exits.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUBNET = "10.213.9"
P2P_PORT = 4001
STATUS_PORT = 8680
TOKEN = "bench"
QUIET = '[training]\nrole = "consumer"\nevaluate = false\n\n[exchange]\nannounce_interval_s = 1.0\n'


@dataclass
class Daemon:
    name: str
    namespace: str
    address: str
    data_dir: Path
    config: Path
    peer_id: str = ""
    process: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        return f"/ip4/{self.address}/tcp/{P2P_PORT}/p2p/{self.peer_id}"


@dataclass
class LinkSwarm:
    """A fetcher and ``seeds`` seeds, each in its own namespace; seeds' links limited to ``rate``."""

    root: Path
    seeds: int
    rate: str
    fan_out: str = "adaptive"
    tag: str = field(default_factory=lambda: f"p2pbx-{os.getpid()}")
    namespaces: list[str] = field(default_factory=list)
    daemons: list[Daemon] = field(default_factory=list)

    @property
    def hub(self) -> str:
        return f"{self.tag}-hub"

    def build(self) -> None:
        from node.keys import load_or_create_key
        from tests.swarm_harness import netns_script

        netns = netns_script()
        netns._run("ip", "netns", "add", self.hub)
        self.namespaces.append(self.hub)
        netns.make_hub(self.hub)
        names = ["fetcher", *(f"seed{i}" for i in range(1, self.seeds + 1))]
        for index, name in enumerate(names):
            namespace, address = f"{self.tag}-{name}", f"{SUBNET}.{index + 10}"
            netns._run("ip", "netns", "add", namespace)
            self.namespaces.append(namespace)
            netns.plug(self.hub, namespace, f"veth{index}", f"{address}/24")
            if name != "fetcher":  # what a seed sends: its uplink
                netns.shape(namespace, "eth0", self.rate)
            data_dir = self.root / name
            daemon = Daemon(name, namespace, address, data_dir, self.root / f"{name}.toml")
            daemon.peer_id = load_or_create_key(data_dir).peer_id
            self.daemons.append(daemon)
        fetcher, *seeds = self.daemons
        # The fetcher dials every seed; the seeds find each other through the first one.
        bootstrap = {fetcher.name: [s.addr for s in seeds], seeds[0].name: []}
        for daemon in self.daemons:
            boot = bootstrap.get(daemon.name, [seeds[0].addr])
            daemon.config.write_text(
                f'[node]\nname = "{daemon.name}"\ndata_dir = "{daemon.data_dir}"\nlog_format = "json"\n\n'
                f'[swarm]\nname = "bench-links"\nbootstrap = {json.dumps(boot)}\n\n'
                f'[network]\nlisten = ["/ip4/{daemon.address}/tcp/{P2P_PORT}"]\n\n'
                f"[membership]\nheartbeat_interval_s = 1.0\n\n"
                f'[status]\nport = {STATUS_PORT}\ntoken = "{TOKEN}"\n\n{QUIET}fan_out = "{self.fan_out}"\n'
            )

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("P2P_NODE_CONFIG", None)
        for daemon in self.daemons:
            with open(self.root / f"{daemon.name}.log", "ab") as log:
                daemon.process = subprocess.Popen(
                    ["ip", "netns", "exec", daemon.namespace, sys.executable, "-m", "node.cli", "start",
                     "--config", str(daemon.config)],
                    stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True,
                )

    def stop(self) -> None:
        for daemon in self.daemons:
            if daemon.process is not None and daemon.process.poll() is None:
                daemon.process.kill()
                daemon.process.wait(timeout=10)
            daemon.process = None

    def close(self) -> None:
        self.stop()
        for namespace in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)
        self.namespaces.clear()


def drive(seeds: list[str], manifest: str, timeout: float) -> None:
    """Inside the fetcher's namespace: wait until it is connected to every seed, fetch, print the result."""
    base = f"http://127.0.0.1:{STATUS_PORT}"

    def get(path: str) -> dict | None:
        try:
            with urllib.request.urlopen(base + path, timeout=3) as answer:
                return json.load(answer)
        except (OSError, urllib.error.URLError, ValueError):
            return None

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        peers = (get("/peers") or {}).get("peers", [])
        live = {p.get("peer_id") for p in peers if p.get("alive")}
        connected = ((get("/status") or {}).get("peers") or {}).get("connected", 0)
        if set(seeds) <= live and connected >= len(seeds):
            break
        time.sleep(0.5)
    else:
        raise SystemExit("the fetcher never saw every seed")
    time.sleep(2.0)  # a couple of announcements: the fetcher knows every provider
    request = urllib.request.Request(
        base + "/fetches", data=json.dumps({"manifest": manifest}).encode(), method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
    )
    with urllib.request.urlopen(request, timeout=5) as answer:
        assert answer.status == 202, answer.status
    while time.monotonic() < deadline:
        rows = (get("/fetches") or {}).get("fetches", [])
        row = next((r for r in rows if r.get("state") in ("done", "failed")), None)
        if row is not None:
            print(json.dumps(row), flush=True)
            return
        time.sleep(0.2)
    raise SystemExit("the fetch did not finish in time")


def fetch(root: Path, mib: int, rate: str, holders: int, fan_out: str = "adaptive") -> dict:
    """One swarm (a fetcher, three seeds), the artifact on ``holders`` seeds, the fetcher's
    ``exchange.fan_out`` as given; the fetch's view."""
    from bench.bench_exchange import seed_artifact

    swarm = LinkSwarm(root / f"holders{holders}-{fan_out}", 3, rate, fan_out)
    try:
        swarm.build()
        fetcher, *seeds = swarm.daemons
        manifest = seed_artifact([seed.data_dir for seed in seeds[:holders]], mib)
        swarm.start()
        result = subprocess.run(
            ["ip", "netns", "exec", fetcher.namespace, sys.executable, "-m", "bench.bench_exchange_links",
             "--drive", manifest, "--seed-ids", ",".join(s.peer_id for s in seeds)],
            capture_output=True, text=True, cwd=REPO, timeout=600,
        )
        if result.returncode != 0:
            logs = "\n".join((swarm.root / f"{d.name}.log").read_text(errors="replace")[-2000:] for d in swarm.daemons)
            raise RuntimeError(f"the fetch failed: {result.stderr.strip()[-2000:]}\n{logs}")
        view = json.loads(result.stdout.strip().splitlines()[-1])
        if view["state"] != "done":
            raise RuntimeError(f"the fetch failed: {view}")
        return view
    finally:
        swarm.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=64, help="artifact size in MiB (multiple of 4)")
    parser.add_argument("--rate", default="100mbit", help="each seed's uplink, as tc reads it")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--drive", help=argparse.SUPPRESS)
    parser.add_argument("--seed-ids", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        drive(args.seed_ids.split(","), args.drive, timeout=300)
        return
    if os.geteuid() != 0:
        raise SystemExit("needs root: it creates network namespaces and tc qdiscs")
    root = Path(tempfile.mkdtemp(prefix="bench-links-"))
    ratios, wide_ratios = [], []
    try:
        for attempt in range(args.repeats):
            rates = {}
            for holders, fan_out in ((1, "adaptive"), (3, "adaptive"), (3, "wide")):
                view = fetch(root / f"r{attempt}", args.mib, args.rate, holders, fan_out)
                name = f"{holders} provider{'s' if holders > 1 else ''}" + (", all at once" if fan_out == "wide" else "")
                rates[name] = args.mib / view["elapsed_s"]
                print(f"  fetch, {name} on {args.rate} links {view['elapsed_s']:7.2f} s {rates[name]:8.1f} MiB/s"
                      f"  (providers used: {len(view.get('providers', []))})", flush=True)
                if holders > 1 and fan_out == "adaptive":
                    print(f"    fan-out: {view.get('fan_out')}", flush=True)
            ratios.append(rates["3 providers"] / rates["1 provider"])
            wide_ratios.append(rates["3 providers, all at once"] / rates["1 provider"])
            shutil.rmtree(root / f"r{attempt}", ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for label, values in (("fetch(3) / fetch(1)", ratios), ("fetch(3) all at once / fetch(1)", wide_ratios)):
        print(f"{label} on {args.rate} links: {statistics.median(values):.2f}"
              f"  ({', '.join(f'{r:.2f}' for r in values)})")


if __name__ == "__main__":
    main()
