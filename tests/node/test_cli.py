"""The p2p-node command line against a stand-in peer: finding a local peer, the status summary,
closed pipes and Ctrl-C, config errors in one line, lazy imports, keygen, help texts, progress."""

from __future__ import annotations

import argparse
import json
import os
import pty
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import node.cli as cli
from node.cli import main
from node.config import Config

REPO = Path(__file__).resolve().parents[2]
PEER_ID = "12D3KooWJPEt7cqYKaYTjSepqn9YPRaxrQokYfhooqh5dy1pN3hF"
HEAD = "b3:" + "ab" * 32
STATUS = {
    "peer_id": PEER_ID,
    "name": "peer1",
    "swarm": "local",
    "addrs": ["/ip4/127.0.0.1/tcp/4101"],
    "uptime_s": 312.4,
    "peers": {"live": 2, "dead": 1, "connected": 2},
    "training": {
        "role": "trainer", "workload": "charlm", "round": 12, "phase": "training", "head": HEAD,
        "head_round": 11, "val_loss": 2.345678, "utilisation": 0.875, "last_error": "disk full\n  twice",
    },
}
WEIGHTS = bytes(range(256)) * 8192  # 2 MiB: two of node.download's 1 MiB blocks


def _head(n: int) -> dict[str, Any]:
    return {"id": f"b3:{n:064x}", "round": n, "epoch": 0, "samples_total": n * 10, "updates": 3,
            "val_loss": 2.0, "canonical": n == 0}


class Peer:
    """A stand-in for a peer's status port on 127.0.0.1, serving canned answers."""

    def __init__(self, heads: int = 3, hang: str = "", stall_weights: bool = False) -> None:
        self.heads = heads
        self.hang = hang  # a path answered never (the request is recorded, then the handler waits)
        self.stall_weights = stall_weights  # send half the weights, then wait
        self.requests: list[str] = []
        self.release = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _json(self, value: Any) -> None:
                body = json.dumps(value).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - the http.server name
                path = self.path.partition("?")[0]
                peer.requests.append(path)
                if path == peer.hang:
                    peer.release.wait(30)
                    return
                if path == "/status":
                    self._json(STATUS)
                elif path == "/peers":
                    self._json({"peers": []})
                elif path == "/heads":
                    self._json({"canonical": _head(0)["id"], "heads": [_head(n) for n in range(peer.heads)]})
                elif path.endswith("/weights"):
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(WEIGHTS)))
                    self.end_headers()
                    if peer.stall_weights:
                        self.wfile.write(WEIGHTS[: len(WEIGHTS) // 2])
                        self.wfile.flush()
                        peer.requests.append("stalled")
                        peer.release.wait(30)
                        return
                    self.wfile.write(WEIGHTS)
                elif path == "/events":
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()
                    for seq in range(300):
                        event = {"kind": "round_closed", "at": time.time(), "seq": seq, "round": seq}
                        try:
                            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                            self.wfile.flush()
                        except OSError:
                            return
                        if peer.release.wait(0.1):
                            return
                else:
                    self.send_error(404)

        return Handler


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer()
    yield p
    p.close()


@pytest.fixture
def no_target(monkeypatch: pytest.MonkeyPatch) -> None:
    """No P2P_NODE_URL or config in the environment: the command has to find its peer."""
    for name in [n for n in os.environ if n.startswith("P2P_NODE_")]:
        monkeypatch.delenv(name)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _probe_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, swarm_port: int, swarm_peers: int = 8) -> list[int]:
    """Move every port a command tries off the real ones (8470, 8471, ...), which a peer running on
    this machine may hold: the configured and default ports to free ones, a swarm's to ``swarm_port``."""
    closed = [_free_port(), _free_port()]
    while closed[1] == closed[0]:
        closed[1] = _free_port()
    config = tmp_path / "probe.toml"
    config.write_text(f"[status]\nport = {closed[0]}\n")
    monkeypatch.setenv("P2P_NODE_CONFIG", str(config))
    monkeypatch.setattr(cli, "DEFAULT_STATUS_PORT", closed[1])
    monkeypatch.setattr(cli, "SWARM_STATUS_PORT", swarm_port)
    monkeypatch.setattr(cli, "SWARM_PROBED_PEERS", swarm_peers)
    return closed


def _cli(*args: str, env: dict[str, str] | None = None, **kwargs: Any) -> subprocess.Popen[bytes]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("P2P_NODE_")}
    return subprocess.Popen(
        [sys.executable, "-m", "node.cli", *args], cwd=REPO, env={**environ, **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs,
    )


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# ---------------------------------------------------------------- finding a local peer


def test_without_flags_the_default_port_comes_first_then_the_local_swarm_ports(no_target: None) -> None:
    swarm = cli._build_parser()._subparsers._group_actions[0].choices["swarm"]  # type: ignore[union-attr]
    swarm_status_port = swarm.parse_args([]).status_port
    urls = cli.candidate_urls()
    assert cli.DEFAULT_STATUS_PORT == Config().status.port == 8470
    assert urls[0] == "http://127.0.0.1:8470"  # status.port's default, what `p2p-node start` serves
    assert urls[1:4] == [f"http://127.0.0.1:{swarm_status_port + i}" for i in range(3)]  # swarm peers 1-3


def test_the_configured_status_port_is_tried_first(no_target: None, monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text("[status]\nport = 9123\n")
    monkeypatch.setenv("P2P_NODE_CONFIG", str(config))
    assert cli.candidate_urls()[:2] == ["http://127.0.0.1:9123", "http://127.0.0.1:8470"]


@pytest.mark.parametrize("command", [["status"], ["heads"], ["peers"], ["watch", "--replay", "0"]])
def test_read_only_commands_find_the_first_local_peer_that_answers(
    peer: Peer, no_target: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    command: list[str], tmp_path: Path,
) -> None:
    # Nothing on the configured or default port; the stand-in serves where a swarm's first peer would.
    _probe_only(monkeypatch, tmp_path, peer.port)
    if command[0] == "watch":
        peer.release.set()  # the event stream ends at once
    assert main(command) == 0
    err = capsys.readouterr().err
    assert f"using {peer.url}" in err and len(err.splitlines()) == 1


def test_an_explicit_port_or_url_wins_over_discovery(
    peer: Peer, no_target: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    _probe_only(monkeypatch, tmp_path, peer.port)
    closed = _free_port()
    assert main(["status", "--port", str(closed)]) == 1
    assert f"cannot reach http://127.0.0.1:{closed}/status" in capsys.readouterr().err
    assert main(["status", "--url", peer.url + "/"]) == 0
    assert "using" not in capsys.readouterr().err
    monkeypatch.setenv("P2P_NODE_URL", f"http://127.0.0.1:{closed}")
    assert main(["status"]) == 1


def test_no_local_peer_is_one_line_naming_the_ports_tried(
    no_target: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    configured, default = _probe_only(monkeypatch, tmp_path, _free_port(), swarm_peers=0)
    assert main(["heads"]) == 1
    err = capsys.readouterr().err
    ports = ", ".join(str(p) for p in sorted({configured, default}))
    assert err.startswith(f"p2p-node: no peer answers on 127.0.0.1 ports {ports};"), err
    assert len(err.splitlines()) == 1


# ---------------------------------------------------------------- status


def test_status_prints_a_summary_and_the_json_with_a_flag(peer: Peer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--url", peer.url]) == 0
    lines = {line[:12].strip(): line[12:] for line in capsys.readouterr().out.splitlines()}
    assert lines["peer"] == f"peer1 {PEER_ID}"
    assert lines["role"] == "trainer, workload charlm"
    assert lines["round"] == "12, training"
    assert lines["head"] == f"b3:{'ab' * 6} (round 11)"
    assert lines["val loss"] == "2.3457"
    assert lines["peers live"] == "3 (this one and 2 others), 1 dead, 2 connected"
    assert lines["utilisation"] == "87.5%"
    assert lines["last error"] == "disk full twice"

    assert main(["status", "--url", peer.url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == STATUS


def test_the_summary_of_a_peer_still_starting_has_no_training_lines() -> None:
    from node.cli_summary import status_summary

    text = status_summary({"peer_id": PEER_ID, "peers": {"live": 1}})
    assert "training    not running yet" in text and "round" not in text and "last error" not in text
    assert "2 (this one and 1 other)," in text


# ---------------------------------------------------------------- closed pipes and Ctrl-C


def test_a_closed_pipe_ends_the_command_quietly_with_141(peer: Peer) -> None:
    peer.heads = 5000  # far more than a pipe holds
    for command in (["heads", "--url", peer.url], ["watch", "--url", peer.url, "--json"]):
        process = _cli(*command)
        assert process.stdout is not None and process.stderr is not None
        assert process.stdout.readline()  # `| head -1`: read a line, then go away
        process.stdout.close()
        _, err = process.communicate(timeout=60)
        assert process.returncode == cli.EXIT_BROKEN_PIPE, err.decode()
        assert err == b"", err.decode()


def test_ctrl_c_while_waiting_for_a_peer_exits_130_quietly() -> None:
    peer = Peer(hang="/status")
    try:
        process = _cli("status", "--url", peer.url)
        _wait_for(lambda: "/status" in peer.requests, "the status request")
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        peer.close()
    assert process.returncode == cli.EXIT_INTERRUPTED and err == b"", err.decode()


def test_ctrl_c_during_a_fetch_exits_130_and_leaves_no_partial_file(tmp_path: Path) -> None:
    peer = Peer(stall_weights=True)
    output = tmp_path / "model.safetensors"
    try:
        process = _cli("fetch", HEAD, "-o", str(output), "--url", peer.url)
        _wait_for(lambda: "stalled" in peer.requests, "half the weights")
        time.sleep(0.3)  # the client has the first block
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        peer.close()
    assert process.returncode == cli.EXIT_INTERRUPTED and err == b"", err.decode()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("network.listen=/ip4/127.0.0.1/tcp/notaport",
         'network.listen: "/ip4/127.0.0.1/tcp/notaport" is not a valid multiaddr'),
        ("network.announce=/ip4/1.2.3/tcp/4001", 'network.announce: "/ip4/1.2.3/tcp/4001" is not a valid multiaddr'),
        ("swarm.bootstrap=/ip4/127.0.0.1/tcp/4101", "swarm.bootstrap: \"/ip4/127.0.0.1/tcp/4101\" must end in /p2p/"),
        (f"swarm.bootstrap=/ip4/127.0.0.1/tcp/x/p2p/{PEER_ID}", "swarm.bootstrap: \"/ip4/127.0.0.1/tcp/x/p2p/"),
        (f"swarm.bootstrap=/dns4/a.example/tcp/4101/p2p/{PEER_ID}/x", "must end in /p2p/<peer id>"),
    ],
)
@pytest.mark.parametrize("command", ["check-config", "start"])
def test_a_bad_multiaddr_is_one_line_and_exit_2(
    no_target: None, capsys: pytest.CaptureFixture[str], command: str, setting: str, expected: str
) -> None:
    assert main([command, "--set", setting]) == cli.EXIT_USAGE
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and expected in err, err


def test_good_multiaddrs_pass(no_target: None, capsys: pytest.CaptureFixture[str]) -> None:
    sets = ["network.listen=/ip4/0.0.0.0/tcp/4001,/ip6/::/tcp/4001", "network.announce=/dns4/a.example/tcp/4001",
            f"swarm.bootstrap=/ip4/10.0.0.1/tcp/4101/p2p/{PEER_ID},/dns4/a.example/tcp/1/p2p/{PEER_ID}"]
    assert main(["check-config", *[a for s in sets for a in ("--set", s)]]) == 0, capsys.readouterr().err


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("workload.name=charlmm", "workload 'charlmm': not a built-in"),
        ("workload.options.no_such_option=1", "unknown option 'no_such_option'"),
        ("workload.device=gpu", "unknown device 'gpu'"),
        ("node.key_file=/nonexistent/identity.key", "/nonexistent/identity.key: cannot read key file"),
    ],
)
def test_check_config_rejects_what_start_would_in_one_line(
    no_target: None, capsys: pytest.CaptureFixture[str], setting: str, expected: str
) -> None:
    assert main(["check-config", "--set", "workload.name=tiny", "--set", setting]) == cli.EXIT_USAGE
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and expected in err, err


def test_check_config_rejects_a_corrupt_key_in_the_data_dir(
    no_target: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "identity.key").write_text("not a key\n")
    assert main(["check-config", "--set", "workload.name=tiny", "--set", f"node.data_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "identity.key: not a p2p-node key file" in err, err


def test_swarm_rejects_a_bad_override_before_starting_a_peer(
    no_target: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["swarm", "--dir", str(tmp_path / "swarm"), "--set", "gossip.degree=0"]) == cli.EXIT_USAGE
    assert len(capsys.readouterr().err.splitlines()) == 1
    assert not (tmp_path / "swarm").exists()


# ---------------------------------------------------------------- imports


def test_help_and_the_status_commands_import_neither_torch_nor_libp2p(peer: Peer, tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'[status]\nport = {peer.port}\n[network]\nlisten = ["/ip4/127.0.0.1/tcp/4001"]\n')
    script = (
        "import contextlib, io, json, sys\n"
        "from node.cli import main\n"
        "codes = []\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "    for argv in (['--help'], ['status', '--help'], ['heads', '--help'], ['fetch', '--help'],\n"
        "                 ['status'], ['status', '--json'], ['heads'], ['peers']):\n"
        "        try:\n"
        "            codes.append(main(argv))\n"
        "        except SystemExit as exc:\n"
        "            codes.append(exc.code)\n"
        "heavy = ('torch', 'libp2p', 'trio', 'numpy', 'workloads', 'node.daemon')\n"
        "print(json.dumps([codes, sorted(m for m in heavy if m in sys.modules)]))\n"
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("P2P_NODE_")}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**environ, "P2P_NODE_CONFIG": str(config)})
    assert result.returncode == 0, result.stderr
    codes, heavy = json.loads(result.stdout)
    assert codes == [0] * 8
    assert heavy == []


# ---------------------------------------------------------------- keygen


def test_keygen_says_where_the_key_is(no_target: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["keygen"]) == 0
    out, err = capsys.readouterr()
    key_file = Path("data") / "identity.key"
    assert err == f"p2p-node: wrote a new key to {key_file}\n"
    assert out.strip().startswith("12D3KooW") and len(out.splitlines()) == 1
    assert main(["keygen"]) == 0
    again, err = capsys.readouterr()
    assert again == out and err == f"p2p-node: kept the existing key in {key_file}\n"
    assert main(["keygen", "--out", "other.key"]) == 0
    assert capsys.readouterr().err == "p2p-node: wrote a new key to other.key\n"


# ---------------------------------------------------------------- help


def _parsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_flag_has_help_and_no_help_shows_rest_markup() -> None:
    missing = []
    for prog, parser in _parsers(cli._build_parser()):
        assert "``" not in parser.format_help(), prog
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if isinstance(action, argparse._SubParsersAction):
                helps = [(choice.dest, choice.help) for choice in action._choices_actions]
            else:
                helps = [("/".join(action.option_strings) or action.dest, action.help)]
            missing += [f"{prog} {name}" for name, text in helps if not text or "``" in text]
    assert not missing, "flags without help (or with reST markup): " + ", ".join(missing)


# ---------------------------------------------------------------- fetch progress


def test_fetch_draws_progress_only_on_a_terminal(peer: Peer, tmp_path: Path) -> None:
    output = tmp_path / "model.safetensors"
    process = _cli("fetch", HEAD, "-o", str(output), "--url", peer.url)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err.decode()
    assert b"\r" not in err and err == b""
    assert out.decode() == f"wrote {output}\n" and output.read_bytes() == WEIGHTS

    output.unlink()
    terminal, other_end = pty.openpty()
    try:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("P2P_NODE_")}
        process = subprocess.Popen([sys.executable, "-m", "node.cli", "fetch", HEAD, "-o", str(output),
                                    "--url", peer.url], cwd=REPO, env=environ, stdout=subprocess.PIPE,
                                   stderr=other_end)
        os.close(other_end)
        drawn = b""
        while True:
            try:
                chunk = os.read(terminal, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            drawn += chunk
        assert process.wait(timeout=60) == 0
    finally:
        os.close(terminal)
    assert b"\r[" in drawn and output.read_bytes() == WEIGHTS

