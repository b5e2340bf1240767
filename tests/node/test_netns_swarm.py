"""The docker-compose.yml topology, run for real in Linux network namespaces by scripts/netns_swarm.py.

Five peers (bootstrap, trainer1-3, consumer), each in its own namespace behind a veth pair on a
bridge, started from the compose file's own configs and environment: once with /dns4/<service>
rewritten to namespace addresses and links shaped with tc tbf at 100 mbit/s, once with the
compose multiaddrs unchanged and resolved by a DNS server in the hub namespace. Also two peers
that find each other by mDNS alone. Skipped only where namespaces cannot be created (not root,
no iproute2, not permitted in this container).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.keys import read_key
from tests.swarm_harness import netns_script

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "netns_swarm.py"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


netns_swarm = netns_script()


@pytest.fixture(scope="module", autouse=True)
def namespaces_available() -> None:
    reason = netns_swarm.netns_unavailable()
    if reason:
        pytest.skip(f"network namespaces unavailable: {reason}")


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.split()}


@pytest.mark.parametrize(
    ("dns", "rate"),
    [(False, "100mbit"), (True, None)],
    ids=["ip4-rewritten-100mbit", "dns4-resolved"],
)
def test_compose_topology_converges_in_namespaces_and_is_torn_down(
    tmp_path: Path, dns: bool, rate: str | None
) -> None:
    """ip4-rewritten: /dns4/<service> rewritten to namespace addresses, links shaped at 100 mbit/s.
    dns4-resolved: the compose multiaddrs unchanged, resolved by the script's DNS server in the hub."""
    before = _namespaces()
    out = io.StringIO()
    workdir = tmp_path / "swarm"
    # The tiny workload keeps five peers on two cores quick; the compose configs train charlm.
    result = netns_swarm.run_swarm(
        check=True, timeout=120, rate=rate, dns=dns, workdir=workdir, out=out, min_round=2,
        sets={"workload.name": "tiny", "training.inner_steps": "10"},
    )
    print(out.getvalue())

    assert result.converged, f"{result.problem}\n{out.getvalue()}"
    assert [p.service for p in result.peers] == ["bootstrap", "trainer1", "trainer2", "trainer3", "consumer"]
    ids = [p.peer_id for p in result.peers]
    assert None not in ids and len(set(ids)) == 5
    for report in result.peers:
        assert report.sees_all and report.live >= 4, report
        assert set(ids) - {report.peer_id} <= report.alive_ids, report
        # They trained and converged: every peer, consumers included, holds the same round-2 head.
        assert report.head_round >= 2 and report.chain[2] == result.peers[0].chain[2], report
    # The bootstrap peer runs with the compose demo identity the other configs dial.
    demo = read_key(REPO / "configs" / "compose" / "bootstrap.key").peer_id
    assert result.peers[0].peer_id == demo
    assert "converged" in out.getvalue()

    # Torn down: no namespace of this run remains, and each peer kept its data in its own "volume".
    ours = f"{netns_swarm.NS_PREFIX}{os.getpid()}-"
    assert not {ns for ns in _namespaces() - before if ns.startswith(ours)}
    assert not list(Path("/etc/netns").glob(f"{ours}*"))
    log = (workdir / "trainer1" / "peer.log").read_text()
    # The address the peer announced: the compose one (dns) or the rewritten one.
    assert ("/dns4/trainer1/tcp/4001/p2p/" in log) == dns
    assert ("/ip4/10.213.7.3/tcp/4001/p2p/" in log) != dns
    for name in ("bootstrap", "trainer1", "trainer2", "trainer3", "consumer"):
        assert (workdir / name / "volumes" / f"{name}-data" / "store").is_dir(), name
        assert (workdir / name / "peer.log").stat().st_size > 0
    assert (workdir / "trainer1" / "volumes" / "trainer1-data" / "identity.key").is_file()
    assert not (workdir / "bootstrap" / "volumes" / "bootstrap-data" / "identity.key").exists()


def test_ctrl_c_tears_everything_down() -> None:
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "up", "--timeout", "60", "--set", "workload.name=tiny"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        # A shell starts background jobs with SIGINT ignored, and children inherit that (Python then
        # installs no KeyboardInterrupt handler): give the script the disposition a terminal gives it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    prefix = f"{netns_swarm.NS_PREFIX}{process.pid}-"
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert first.startswith("started 5 peers"), first
        ours = {ns for ns in _namespaces() if ns.startswith(prefix)}
        assert len(ours) == 6  # five services and the hub
        # The five peers (and, at times, a status query the script runs inside a namespace).
        pids = {p for ns in ours for p in subprocess.run(
            ["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()}
        assert len(pids) >= 5
        process.send_signal(signal.SIGINT)
        try:
            rest, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            rest, _ = process.communicate()
            pytest.fail(f"the script did not exit within 30 s of Ctrl-C; it printed:\n{first}{rest}")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.returncode != 1:
            subprocess.run([sys.executable, str(SCRIPT), "down"], capture_output=True)
    assert process.returncode == 1, rest
    assert "interrupted; tearing down" in rest
    assert not {ns for ns in _namespaces() if ns.startswith(prefix)}
    time.sleep(0.2)
    assert not [p for p in pids if Path(f"/proc/{p}").exists()], "a peer outlived the teardown"


# Run inside a namespace: print the daemon's /peers (default status port), or exit 1.
PEERS_QUERY = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8470/peers', timeout=3).read().decode())"


def test_two_peers_find_each_other_by_mdns_alone(tmp_path: Path) -> None:
    """`network.mdns = true`, no bootstrap, no Kademlia: two daemons on one link (namespaces
    on a bridge, so the multicast never leaves this machine) meet and see each other alive."""
    hub = f"{netns_swarm.NS_PREFIX}{os.getpid()}-mdns-hub"
    spaces = [f"{netns_swarm.NS_PREFIX}{os.getpid()}-mdns-{i}" for i in (1, 2)]
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for ns in (hub, *spaces):
            subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
        netns_swarm.make_hub(hub)
        for i, ns in enumerate(spaces, start=1):
            netns_swarm.plug(hub, ns, f"vm{i}", f"10.213.9.{i}/24")
            config = tmp_path / f"peer{i}.toml"
            config.write_text(
                f'[node]\nname = "peer{i}"\ndata_dir = "{tmp_path / f"peer{i}"}"\nlog_format = "json"\n\n'
                '[swarm]\nname = "mdns-test"\n\n'
                f'[network]\nlisten = ["/ip4/10.213.9.{i}/tcp/4001"]\nkademlia = false\nmdns = true\n\n'
                '[training]\nrole = "consumer"\n'
            )
            with open(tmp_path / f"peer{i}.log", "wb") as log:
                processes.append(subprocess.Popen(
                    ["ip", "netns", "exec", ns, sys.executable, "-m", "node.cli", "start", "--config", str(config)],
                    cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                ))

        def peers_of(ns: str) -> set[str]:
            done = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", PEERS_QUERY],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                return set()
            return {row["peer_id"] for row in json.loads(done.stdout)["peers"] if row["alive"]}

        keys = [tmp_path / f"peer{i}" / "identity.key" for i in (1, 2)]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ids = [read_key(key).peer_id if key.exists() else None for key in keys]
            if None not in ids and peers_of(spaces[0]) == {ids[1]} and peers_of(spaces[1]) == {ids[0]}:
                break
            time.sleep(1.0)
        else:
            logs = "\n".join((tmp_path / f"peer{i}.log").read_text(errors="replace")[-3000:] for i in (1, 2))
            pytest.fail(f"the two peers did not meet by mDNS within 60 s\n{logs}")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        for ns in (*spaces, hub):
            netns_swarm._kill_namespace_pids(ns)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
