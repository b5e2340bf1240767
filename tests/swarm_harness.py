"""Real ``p2p-node start`` processes on 127.0.0.1 for multi-process tests."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from node.keys import load_or_create_key

REPO = Path(__file__).resolve().parents[1]


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now, below the kernel's ephemeral range: a port the kernel hands out (bind to
    0) can be taken, before the daemon binds it, as the source port of any outgoing connection,
    and a bench run lost a daemon to "address already in use" that way."""
    low = 1024
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = [p for p in range(max(1024, low - 12000), low) if p not in _HANDED_OUT] if low > 2048 else []
    random.shuffle(candidates)
    for port in candidates[:200]:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            _HANDED_OUT.add(port)  # not again to another peer of this run, which may not have bound it yet
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.2, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last value: {last!r})")


def mount_tmpfs(path: Path, mib: int, remount: bool = False) -> str | None:
    """Mount (or resize) a tmpfs of ``mib`` MiB at ``path`` (a disk that fills up); why not,
    where it cannot be done (not root). The caller unmounts it (``umount``)."""
    options = f"{'remount,' if remount else ''}size={mib}m"
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    except OSError as exc:
        return str(exc)
    return None if done.returncode == 0 else done.stderr.strip() or f"mount exited {done.returncode}"


@dataclass
class Peer:
    name: str
    data_dir: Path
    config_path: Path
    p2p_port: int
    status_port: int
    peer_id: str
    process: subprocess.Popen[bytes] | None = None
    token: str = ""
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.data_dir.parent / f"{self.name}.log"

    @property
    def addr(self) -> str:
        return f"/ip4/127.0.0.1/tcp/{self.p2p_port}/p2p/{self.peer_id}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.status_port}"

    def start(self, extra_env: dict[str, str] | None = None) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        env.pop("P2P_NODE_CONFIG", None)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "node.cli", "start", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=env,
            )

    def get(self, path: str, timeout: float = 3.0) -> Any:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
                return json.load(response)
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def request(self, method: str, path: str, body: Any = None, timeout: float = 5.0) -> tuple[int, Any]:
        """An authenticated request (the peer's status token); returns (HTTP status, JSON body or None)."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as exc:
            try:
                return exc.code, json.load(exc)
            except ValueError:
                return exc.code, None

    def post(self, path: str, body: Any, timeout: float = 5.0) -> tuple[int, Any]:
        return self.request("POST", path, body, timeout)

    def delete(self, path: str, timeout: float = 5.0) -> tuple[int, Any]:
        return self.request("DELETE", path, None, timeout)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        wait_until(lambda: self.get("/healthz"), timeout, what=f"{self.name} /healthz")

    def live_peers(self) -> set[str]:
        peers = self.get("/peers") or {"peers": []}
        return {row["peer_id"] for row in peers["peers"] if row["alive"]}

    def dead_peers(self) -> set[str]:
        peers = self.get("/peers") or {"peers": []}
        return {row["peer_id"] for row in peers["peers"] if not row["alive"]}

    def kill9(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def terminate(self, timeout: float = 10.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Swarm:
    """Peers with their own data dirs and ports; every peer bootstraps from the first."""

    def __init__(self, root: Path, swarm: str = "test") -> None:
        self.root = root
        self.swarm = swarm
        self.peers: list[Peer] = []

    def add(
        self,
        extra_toml: str = "",
        bootstrap: bool = True,
        heartbeat_s: float = 1.0,
        token: str = "",
        status_host: str = "",
        allow_remote: bool = False,
        operators: tuple[str, ...] = (),
    ) -> Peer:
        """A new peer's data dir and config; ``token`` sets ``[status] token`` (mutating routes).

        ``status_host`` and ``allow_remote`` set the same-named ``[status]`` keys (the URL stays 127.0.0.1);
        ``operators`` sets ``[swarm] operators`` (peer ids; ``Swarm.peer_id_of`` names a peer before it exists).
        """
        index = len(self.peers) + 1
        name = f"peer{index}"
        data_dir = self.root / name
        key = load_or_create_key(data_dir)
        p2p_port, status_port = free_port(), free_port()
        boot = [self.peers[0].addr] if bootstrap and self.peers else []
        config_path = self.root / f"{name}.toml"
        config_path.write_text(
            f'[node]\nname = "{name}"\ndata_dir = "{data_dir}"\nlog_level = "info"\nlog_format = "json"\n\n'
            f'[swarm]\nname = "{self.swarm}"\nbootstrap = {json.dumps(boot)}\n'
            + (f"operators = {json.dumps(list(operators))}\n" if operators else "") + "\n"
            + f'[network]\nlisten = ["/ip4/127.0.0.1/tcp/{p2p_port}"]\n\n'
            f"[membership]\nheartbeat_interval_s = {heartbeat_s}\n\n"
            f"[status]\nport = {status_port}\n" + (f"token = {json.dumps(token)}\n" if token else "")
            + (f"host = {json.dumps(status_host)}\n" if status_host else "")
            + ("allow_remote = true\n" if allow_remote else "")
            + f"\n{extra_toml}"
        )
        peer = Peer(name, data_dir, config_path, p2p_port, status_port, key.peer_id, token=token)
        self.peers.append(peer)
        return peer

    def peer_id_of(self, index: int) -> str:
        """The peer id the ``index``-th peer (1-based) has or will have: its key is made on first use."""
        return load_or_create_key(self.root / f"peer{index}").peer_id

    def stop_all(self) -> None:
        for peer in self.peers:
            if peer.process is not None and peer.process.poll() is None:
                peer.process.kill()
                peer.process.wait(timeout=10)

    def logs(self) -> str:
        return "\n".join(f"===== {p.name}\n{p.log()[-4000:]}" for p in self.peers)


# ---------------------------------------------------------------- a swarm several test modules read

TINY_TRAINING = '[workload]\nname = "tiny"\n\n[training]\ninner_steps = 10\nhead_reannounce_s = 1.0\n'
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_shared: dict[str, Swarm] = {}


def training_swarm(root: Path, count: int, min_head_round: int, timeout: float = 120.0) -> Swarm:
    """``count`` peers training the tiny workload, returned once the first one's head reaches ``min_head_round``.

    The first peer binds its status port on 0.0.0.0 with ``allow_remote`` (its URL stays 127.0.0.1).
    """
    swarm = Swarm(root)
    try:
        peers = [swarm.add(TINY_TRAINING, status_host="0.0.0.0", allow_remote=True)]
        peers += [swarm.add(TINY_TRAINING) for _ in range(count - 1)]
        for peer in peers:
            peer.start(extra_env=ONE_THREAD)
        for peer in peers:
            peer.wait_healthy(60)

        def head_round() -> bool:
            training = (peers[0].get("/status") or {}).get("training") or {}
            return training.get("head_round", 0) >= min_head_round

        wait_until(head_round, timeout, what=f"head round {min_head_round}")
    except BaseException:
        print(swarm.logs())
        swarm.stop_all()
        raise
    return swarm


def shared_swarm(name: str, make: Callable[[], Swarm]) -> Swarm:
    """One running swarm per ``name`` for a whole test session, so read-only test modules share its start-up."""
    swarm = _shared.get(name)
    if swarm is None or any(p.process is None or p.process.poll() is not None for p in swarm.peers):
        swarm = _shared[name] = make()
    return swarm


def stop_shared_swarms(keep: tuple[str, ...] = ()) -> None:
    """Stop every shared swarm not named in ``keep``: idle swarms would train on and slow later tests."""
    for name in [n for n in _shared if n not in keep]:
        _shared.pop(name).stop_all()


@contextlib.contextmanager
def logs_on_failure(swarm: Swarm) -> Iterator[None]:
    """On any failure inside the block, print every peer's status and log tail before re-raising."""
    try:
        yield
    except BaseException:
        for peer in swarm.peers:
            print(f"===== {peer.name} ({peer.peer_id}) status: {peer.get('/status')}")
        print(swarm.logs())
        raise


def training(peer: Peer) -> dict[str, Any]:
    """The ``training`` section of a peer's /status (empty while it does not answer)."""
    return (peer.get("/status") or {}).get("training") or {}


def netns_script() -> ModuleType:
    """scripts/netns_swarm.py as a module (it is a script, not a package), loaded once per session."""
    if "netns_swarm" in sys.modules:
        return sys.modules["netns_swarm"]
    spec = importlib.util.spec_from_file_location("netns_swarm", REPO / "scripts" / "netns_swarm.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["netns_swarm"] = module  # dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module
