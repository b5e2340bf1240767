"""``p2p-node swarm``: start N peers on 127.0.0.1 as child processes and report on them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from node.keys import load_or_create_key

REPORT_EVERY_S = 5.0
# A peer stops within 5 s of SIGTERM (``p2p-node start``); twice that before SIGKILL.
PEER_STOP_GRACE_S = 10.0


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def write_peer_configs(
    peers: int, base_dir: Path, base_port: int, status_port: int, swarm: str = "local"
) -> list[Path]:
    """Create each peer's data dir, key and config; every peer bootstraps from peer 1."""
    base_dir.mkdir(parents=True, exist_ok=True)
    first_key = load_or_create_key(base_dir / "peer1")
    bootstrap = f"/ip4/127.0.0.1/tcp/{base_port}/p2p/{first_key.peer_id}"
    paths = []
    for index in range(1, peers + 1):
        data_dir = (base_dir / f"peer{index}").resolve()
        load_or_create_key(data_dir)
        path = base_dir / f"peer{index}.toml"
        path.write_text(
            "# Written by `p2p-node swarm`; edit freely, it is rewritten on the next run.\n"
            f'[node]\nname = "peer{index}"\ndata_dir = {json.dumps(str(data_dir))}\n'
            f'log_format = "json"\n\n'
            f'[swarm]\nname = "{swarm}"\n'
            f"bootstrap = {_toml_list([] if index == 1 else [bootstrap])}\n\n"
            f'[network]\nlisten = ["/ip4/127.0.0.1/tcp/{base_port + index - 1}"]\n\n'
            f'[status]\nport = {status_port + index - 1}\n'
        )
        paths.append(path)
    return paths


def _get(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.load(response)
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _report(status_ports: list[int]) -> str:
    lines = []
    for index, port in enumerate(status_ports, start=1):
        status = _get(f"http://127.0.0.1:{port}/status")
        lines.append(_peer_line(index, status) if status is not None else f"  peer{index}: not answering on :{port}")
    return "\n".join(lines)


def _peer_line(index: int, status: Mapping[str, Any]) -> str:
    """One peer's line: its round (the one it works on) and its canonical head's validation loss,
    named by the head's round, which is the round before while the peer trains the next."""
    live = status.get("peers", {}).get("live", 0)
    parts = [f"peer{index} {status.get('peer_id', '?')[-8:]}", f"live peers {live}"]
    training = status.get("training") or {}
    if training:
        parts.append(f"round {training.get('round')}")
        if training.get("val_loss") is not None:
            parts.append(f"val loss {training['val_loss']:.4f} (head of round {training.get('head_round')})")
    return "  " + ", ".join(parts)


class _StopSignal(Exception):
    """A stop signal (SIGTERM, SIGHUP) arrived: the swarm stops as on Ctrl-C."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _raise_stop(signum: int, frame: object) -> None:
    raise _StopSignal(signal.Signals(signum).name)


def run_local_swarm(
    peers: int, base_dir: Path, base_port: int, status_port: int, overrides: Mapping[str, str]
) -> int:
    """Run the swarm in the foreground until Ctrl-C, SIGTERM or SIGHUP (exit 0) or until a peer exits
    (exit 1); either way every peer is stopped (``stop_peers``) before this returns."""
    configs = write_peer_configs(peers, base_dir, base_port, status_port)
    status_ports = [status_port + i for i in range(peers)]
    children: list[subprocess.Popen[bytes]] = []
    extra = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    # N peers share this machine's cores: one torch thread each avoids oversubscription.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    # A launcher in the background, under ``timeout``, a supervisor or ``docker stop`` is told to
    # stop with SIGTERM (or SIGHUP when its terminal goes): dying of it would orphan the peers.
    previous = {sig: signal.signal(sig, _raise_stop) for sig in STOP_SIGNALS}
    try:
        for index, config in enumerate(configs, start=1):
            log_path = base_dir / f"peer{index}.log"
            with open(log_path, "ab") as log_file:
                children.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "node.cli", "start", "--config", str(config), *extra],
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        env=env,
                    )
                )
            print(f"peer{index}: status http://127.0.0.1:{status_ports[index - 1]}/status, log {log_path}")
        print("Ctrl-C stops the swarm.")
        while True:
            time.sleep(REPORT_EVERY_S)
            for index, child in enumerate(children, start=1):
                if child.poll() is not None:
                    print(f"peer{index} exited with status {child.returncode}; see its log")
                    return 1
            print(time.strftime("%H:%M:%S"))
            print(_report(status_ports), flush=True)
    except (KeyboardInterrupt, _StopSignal) as stop:
        print(f"stopping the swarm ({stop or 'SIGINT'})", flush=True)
        return 0
    finally:
        # The stop is bounded (``stop_peers``); a second signal meanwhile must not cut it short.
        for sig in (signal.SIGINT, *STOP_SIGNALS):
            signal.signal(sig, signal.SIG_IGN)
        try:
            stop_peers(children)
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def stop_peers(children: list[subprocess.Popen[bytes]], grace_s: float = PEER_STOP_GRACE_S) -> list[int]:
    """SIGTERM every running child, wait up to ``grace_s`` for all of them together, then SIGKILL
    the rest; return the pids that had to be killed."""
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    killed = []
    for child in children:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            killed.append(child.pid)
            print(f"peer (pid {child.pid}) did not stop within {grace_s:.0f} s; killed", flush=True)
    return killed
