"""The ``p2p-node`` command line: start a peer, inspect a running one, make keys and configs.

Only ``start`` and ``check-config`` import torch (through the workload) and only ``start``
imports libp2p (``swarm`` runs its peers as ``start`` processes): every other command starts in a
fraction of a second, so imports stay inside the commands that need them.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from node.config_schema import ConfigError, parse_set_options
from node.keys import KeyFileError

if TYPE_CHECKING:
    from node.config import Config

DESCRIPTION = "Start a p2p-node peer, inspect a running one, make keys and configs."
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader went away

LOCAL_HOST = "127.0.0.1"
DEFAULT_STATUS_PORT = 8470  # status.port's default (node.config.StatusSection)
SWARM_BASE_PORT = 4101  # ``p2p-node swarm``: libp2p port of peer 1; peer N listens on BASE + N - 1
SWARM_STATUS_PORT = 8471  # ``p2p-node swarm``: status port of peer 1; peer N serves on this + N - 1
SWARM_PROBED_PEERS = 8  # how many of a local swarm's status ports a command tries
PROBE_TIMEOUT_S = 2.0
# What talking HTTP to a port can raise: refused or reset (OSError, URLError), not HTTP
# (HTTPException), not JSON (ValueError).
NET_ERRORS = (OSError, ValueError, http.client.HTTPException)

# Flags that are shorthands for --set, because they are what people reach for first.
FLAG_KEYS = {
    "data_dir": "node.data_dir",
    "log_level": "node.log_level",
    "listen": "network.listen",
    "bootstrap": "swarm.bootstrap",
    "swarm": "swarm.name",
    "status_port": "status.port",
}

URL_HELP = (
    "status URL of the peer, e.g. http://127.0.0.1:8470 (default: P2P_NODE_URL, else the first local peer"
    " that answers: status.port of P2P_NODE_CONFIG, then 8470, then the ports p2p-node swarm uses)"
)
WRITE_URL_HELP = "status URL of the peer (default: P2P_NODE_URL, else status.port of P2P_NODE_CONFIG, else 8470)"
PORT_HELP = "status port of a peer on 127.0.0.1 (short for --url http://127.0.0.1:PORT)"


def _add_config_flags(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--config", "-c", default=os.environ.get("P2P_NODE_CONFIG"), metavar="FILE",
        help="TOML config file (default: P2P_NODE_CONFIG)",
    )
    sub.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key (repeatable)"
    )


def _add_target(sub: argparse.ArgumentParser, url_help: str = URL_HELP) -> None:
    where = sub.add_mutually_exclusive_group()
    where.add_argument("--url", metavar="URL", help=url_help)
    where.add_argument("--port", type=int, metavar="PORT", help=PORT_HELP)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2p-node", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    start = commands.add_parser("start", help="run a peer until SIGINT/SIGTERM")
    _add_config_flags(start)
    # Each shorthand names the key it sets (FLAG_KEYS).
    for flag, metavar, text in (
        ("--data-dir", "DIR", "directory for the key, store and state (node.data_dir)"),
        ("--log-level", "LEVEL", "debug, info, warning, error or critical (node.log_level)"),
        ("--listen", "ADDRS", "comma-separated listen multiaddrs (network.listen)"),
        ("--bootstrap", "ADDRS", "comma-separated multiaddrs, each ending in /p2p/<peer id> (swarm.bootstrap)"),
        ("--swarm", "NAME", "swarm name (swarm.name)"),
        ("--status-port", "PORT", "status port; 0 picks a free one (status.port)"),
    ):
        start.add_argument(flag, dest=flag[2:].replace("-", "_"), metavar=metavar, help=text)

    check = commands.add_parser(
        "check-config", help="load a config and its workload; print the config resolved, or the error"
    )
    _add_config_flags(check)

    init = commands.add_parser("init-config", help="write a commented starter config")
    init.add_argument("path", nargs="?", default="-", help="file to write (default: stdout)")

    keygen = commands.add_parser("keygen", help="create (or show) a peer identity key")
    keygen.add_argument(
        "--data-dir", metavar="DIR", help="create DIR/identity.key if missing and print its peer id (default: ./data)"
    )
    keygen.add_argument("--out", metavar="FILE", help="write a new key to this file (refuses to overwrite)")

    status = commands.add_parser("status", help="summarise a running peer's status")
    _add_target(status)
    status.add_argument("--json", action="store_true", help="print the whole /status answer as JSON")

    peers = commands.add_parser("peers", help="print a running peer's peer table as JSON")
    _add_target(peers)

    heads = commands.add_parser("heads", help="list a running peer's recent heads")
    _add_target(heads)
    heads.add_argument("--json", action="store_true", help="print the raw JSON")

    fetch = commands.add_parser("fetch", help="download a head's weights as a .safetensors file")
    fetch.add_argument("head", metavar="HEAD", help="head id (b3:...) or 'canonical'")
    fetch.add_argument("-o", "--output", required=True, metavar="FILE", help="file to write")
    _add_target(fetch)

    watch = commands.add_parser("watch", help="follow a running peer's events live")
    _add_target(watch)
    watch.add_argument("--replay", type=int, default=20, metavar="N", help="past events to show first (default: 20)")
    watch.add_argument("--json", action="store_true", help="print each event as a JSON line")

    rollback = commands.add_parser("rollback", help="roll the swarm back to an earlier head (operators only)")
    rollback.add_argument("head", metavar="HEAD", help="the head id to roll back to")
    rollback.add_argument("--reason", default="", metavar="TEXT", help="why, recorded in the signed rollback")

    patch = commands.add_parser("patch", help="change training settings from a round on (operators only)")
    patch.add_argument(
        "settings", nargs="+", metavar="KEY=VALUE",
        help="inner_lr, inner_steps, outer_lr, outer_momentum, codec, round_deadline_s",
    )
    patch.add_argument("--round", type=int, required=True, metavar="N", help="first round the settings apply to")

    cancel = commands.add_parser("cancel", help="cancel an in-flight fetch on a running peer")
    cancel.add_argument("manifest", metavar="MANIFEST", help="manifest id of the fetch")

    token_help = "status token (default: P2P_NODE_STATUS_TOKEN)"
    for sub in (rollback, patch, cancel):
        _add_target(sub, WRITE_URL_HELP)
        sub.add_argument(
            "--token", default=os.environ.get("P2P_NODE_STATUS_TOKEN", ""), metavar="TOKEN", help=token_help
        )
    for sub in (rollback, patch):
        sub.add_argument("--key", metavar="FILE", help="operator key file: sign here instead of on the peer")
        sub.add_argument("--swarm", metavar="NAME", help="swarm name, needed with --key (default: ask the peer)")

    swarm = commands.add_parser("swarm", help="run a local swarm of N peers on 127.0.0.1")
    swarm.add_argument("--peers", type=int, default=3, metavar="N", help="how many peers (default: 3)")
    swarm.add_argument(
        "--dir", default="./swarm-data", metavar="DIR",
        help="data directories and configs go here (default: ./swarm-data)",
    )
    swarm.add_argument(
        "--base-port", type=int, default=SWARM_BASE_PORT, metavar="PORT",
        help=f"libp2p port of peer 1; peer N listens on PORT + N - 1 (default: {SWARM_BASE_PORT})",
    )
    swarm.add_argument(
        "--status-port", type=int, default=SWARM_STATUS_PORT, metavar="PORT",
        help=f"status port of peer 1; peer N serves on PORT + N - 1 (default: {SWARM_STATUS_PORT})",
    )
    swarm.add_argument(
        "--workload", default="charlm", metavar="NAME", help="built-in workload or module:attr (default: charlm)"
    )
    swarm.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override a config key on every peer (repeatable)",
    )
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    overrides = {}
    for attr, key in FLAG_KEYS.items():
        value = getattr(args, attr, None)
        if value is not None:
            overrides[key] = str(value)
    overrides.update(parse_set_options(args.set))
    return overrides


def _load(args: argparse.Namespace) -> Config:
    from node.config import load_config

    return load_config(args.config, _overrides(args))


def _cmd_start(args: argparse.Namespace) -> int:
    config = _load(args)
    import uvloop

    # Import libp2p (through the daemon) before configuring logging, so its loggers are routed too.
    from node.daemon import Node, run_process
    from node.logs import configure_logging

    configure_logging(config.node.log_level, config.node.log_format)

    return run_process(Node(config), uvloop.run)


def _cmd_check_config(args: argparse.Namespace) -> int:
    from node.config import render_starter_config

    config = _load(args)
    check_startable(config)
    print(render_starter_config(config), end="")
    return 0


def check_startable(config: Config) -> None:
    """What ``start`` would refuse beyond the config's own checks, short of binding ports: a key
    file that does not read, a workload that does not load with its options, a device this machine
    lacks. Raises KeyFileError or WorkloadError; creates nothing."""
    from node.keys import KEY_FILE, read_key
    from workloads.base import resolve_device
    from workloads.registry import load_workload

    key_file = Path(config.node.key_file) if config.node.key_file else Path(config.node.data_dir) / KEY_FILE
    if config.node.key_file or key_file.exists():  # a missing default key is created at start
        read_key(key_file)
    load_workload(config.workload.name, dict(config.workload.options))
    resolve_device(config.workload.device)


def _cmd_init_config(args: argparse.Namespace) -> int:
    from node.config import render_starter_config

    text = render_starter_config()
    if args.path == "-":
        print(text, end="")
    else:
        path = Path(args.path)
        if path.exists():
            print(f"p2p-node: {path} exists; not overwriting", file=sys.stderr)
            return EXIT_FAILED
        path.write_text(text)
        print(f"wrote {path}")
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    from node.keys import KEY_FILE, load_or_create_key, read_key, write_key
    from protocol.identity import SigningKey

    if args.out:
        path = Path(args.out)
        if path.exists():
            print(f"p2p-node: {path} exists; not overwriting (its peer id: {read_key(path).peer_id})", file=sys.stderr)
            return EXIT_FAILED
        key = SigningKey.generate()
        write_key(path, key)
        print(f"p2p-node: wrote a new key to {path}", file=sys.stderr)
    else:
        data_dir = Path(args.data_dir or "./data")
        path = data_dir / KEY_FILE
        existed = path.exists()
        key = load_or_create_key(data_dir)
        said = f"kept the existing key in {path}" if existed else f"wrote a new key to {path}"
        print(f"p2p-node: {said}", file=sys.stderr)
    print(key.peer_id)
    return 0


# ---------------------------------------------------------------- finding a running peer


def fetch_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


def _http_url(host: str, port: int) -> str:
    if host in ("", "0.0.0.0", "::"):
        host = LOCAL_HOST  # bound to every address: loopback is one of them
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def configured_url() -> str:
    """The status URL of the peer that ``p2p-node start`` would run here: status.host and
    status.port of P2P_NODE_CONFIG and the P2P_NODE_* variables, else the defaults."""
    from node.config import load_config

    try:
        status = load_config(os.environ.get("P2P_NODE_CONFIG")).status
    except ConfigError:
        return _http_url(LOCAL_HOST, DEFAULT_STATUS_PORT)
    return _http_url(status.host, status.port or DEFAULT_STATUS_PORT)


def candidate_urls() -> list[str]:
    """Where a command looks for a running peer, in order: the configured status port, the default
    one, then the status ports of a ``p2p-node swarm`` with default ports (peer 1 first)."""
    urls = [configured_url(), _http_url(LOCAL_HOST, DEFAULT_STATUS_PORT)]
    urls += [_http_url(LOCAL_HOST, SWARM_STATUS_PORT + i) for i in range(SWARM_PROBED_PEERS)]
    return list(dict.fromkeys(urls))


def answers(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a p2p-node peer answers ``/status`` at ``url``."""
    try:
        status = fetch_json(url + "/status", timeout)
    except NET_ERRORS:
        return False
    return isinstance(status, dict) and "peer_id" in status


def _describe_urls(urls: list[str]) -> str:
    """``http://127.0.0.1:8470``, ``8471``, ... as ``127.0.0.1 ports 8470-8478``."""
    hosts: dict[str, list[int]] = {}
    for url in urls:
        host, _, port_text = url.removeprefix("http://").rpartition(":")
        hosts.setdefault(host, []).append(int(port_text))
    parts = []
    for host, ports in hosts.items():
        ranges: list[list[int]] = []
        for port in sorted(set(ports)):
            if ranges and port == ranges[-1][1] + 1:
                ranges[-1][1] = port
            else:
                ranges.append([port, port])
        spans = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)
        parts.append(f"{host} port{'s' if len(ranges) > 1 or ranges[0][0] != ranges[0][1] else ''} {spans}")
    return "; ".join(parts)


def resolve_url(args: argparse.Namespace, probe: bool = True) -> str | None:
    """The status URL a command talks to: --url, --port or P2P_NODE_URL when given; else (``probe``)
    the first of ``candidate_urls`` that answers, named on stderr, or (not ``probe``) the configured
    one. None, with the reason on stderr, when nothing answers."""
    if args.url:
        return str(args.url).rstrip("/")
    if args.port is not None:
        return _http_url(LOCAL_HOST, args.port)
    if os.environ.get("P2P_NODE_URL"):
        return os.environ["P2P_NODE_URL"].rstrip("/")
    if not probe:
        return configured_url()
    urls = candidate_urls()
    for url in urls:
        if answers(url):
            print(f"p2p-node: using {url}, the first local peer that answers (--url or --port picks one)",
                  file=sys.stderr)
            return url
    print(
        f"p2p-node: no peer answers on {_describe_urls(urls)}; start one (p2p-node start, p2p-node swarm)"
        " or name it with --url or --port",
        file=sys.stderr,
    )
    return None


def _unreachable(url: str, exc: BaseException, verb: str = "reach") -> int:
    print(f"p2p-node: cannot {verb} {url}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
    return EXIT_FAILED


# ---------------------------------------------------------------- commands that ask a running peer


def _cmd_status(args: argparse.Namespace) -> int:
    from node.cli_summary import status_summary

    base = resolve_url(args)
    if base is None:
        return EXIT_FAILED
    try:
        status = fetch_json(base + "/status")
    except NET_ERRORS as exc:
        return _unreachable(base + "/status", exc)
    print(json.dumps(status, indent=2) if args.json else status_summary(status))
    return 0


def _cmd_peers(args: argparse.Namespace) -> int:
    base = resolve_url(args)
    if base is None:
        return EXIT_FAILED
    try:
        listing = fetch_json(base + "/peers")
    except NET_ERRORS as exc:
        return _unreachable(base + "/peers", exc)
    print(json.dumps(listing, indent=2))
    return 0


def _cmd_heads(args: argparse.Namespace) -> int:
    base = resolve_url(args)
    if base is None:
        return EXIT_FAILED
    try:
        listing = fetch_json(base + "/heads")
    except NET_ERRORS as exc:
        return _unreachable(base + "/heads", exc)
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    print(f"{'':2}{'round':>6} {'epoch':>5} {'samples':>10} {'updates':>7} {'val loss':>9}  id")
    for head in listing["heads"]:
        loss = f"{head['val_loss']:.4f}" if head.get("val_loss") is not None else "-"
        mark = "* " if head["canonical"] else "  "
        print(f"{mark}{head['round']:>6} {head['epoch']:>5} {head['samples_total']:>10} {head['updates']:>7} {loss:>9}  {head['id']}")
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    from node.download import DownloadError, download_head, partial_path

    base = resolve_url(args)
    if base is None:
        return EXIT_FAILED
    output = Path(args.output)
    # The progress bar redraws its line with \r: only on a terminal, never into a log or a pipe.
    terminal = sys.stderr.isatty()
    with open(os.devnull, "w") as discard:
        progress: IO[str] = sys.stderr if terminal else discard
        try:
            path = download_head(base, args.head, output, out=progress)
        except DownloadError as exc:
            print(f"p2p-node: {exc}", file=sys.stderr)
            return EXIT_FAILED
        except KeyboardInterrupt:
            partial_path(output).unlink(missing_ok=True)
            if terminal:
                sys.stderr.write("\n")
            raise
    print(f"wrote {path}")
    return 0


def _cmd_watch(args: argparse.Namespace) -> int:
    base = resolve_url(args)
    if base is None:
        return EXIT_FAILED
    url = f"{base}/events?replay={args.replay}"
    try:
        response = urllib.request.urlopen(url, timeout=60)
    except NET_ERRORS as exc:
        return _unreachable(url, exc, "follow")
    with response:
        while True:
            try:
                line = response.readline()
            except NET_ERRORS as exc:
                return _unreachable(url, exc, "follow")
            if not line:
                return 0
            text = line.decode("utf-8", "replace").rstrip("\n")
            if not text.startswith("data: "):
                continue
            event = json.loads(text[len("data: "):])
            if args.json:
                print(json.dumps(event), flush=True)
                continue
            stamp = time.strftime("%H:%M:%S", time.localtime(event.pop("at")))
            kind = event.pop("kind")
            event.pop("seq", None)
            details = " ".join(f"{k}={v}" for k, v in event.items())
            print(f"{stamp} {kind:<15} {details}", flush=True)


# ---------------------------------------------------------------- commands that change a running peer


def _send(url: str, method: str, token: str, body: Any = None) -> int:
    request = urllib.request.Request(
        url, method=method, data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as exc:
        try:
            reason = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            reason = exc.reason
        print(f"p2p-node: {exc.code} {reason}", file=sys.stderr)
        return EXIT_FAILED
    except NET_ERRORS as exc:
        return _unreachable(url, exc)
    print(json.dumps(answer, indent=2))
    return 0


def _signed_body(args: argparse.Namespace, base: str, kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """With --key, sign the operator record here so the operator's key never leaves this machine."""
    if not args.key:
        return body
    from node.keys import read_key
    from node.operator import sign_operator_record

    swarm = args.swarm or fetch_json(base + "/status")["swarm"]
    return {"record": sign_operator_record(read_key(Path(args.key)), swarm, kind, body).hex()}


def _parse_setting(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep:
        raise ConfigError(text, "settings are KEY=VALUE")
    for kind in (int, float):
        try:
            return key, kind(raw)
        except ValueError:
            pass
    return key, raw


def _cmd_rollback(args: argparse.Namespace) -> int:
    from protocol.control import RollbackRecord

    base = resolve_url(args, probe=False)
    assert base is not None
    if args.key:
        body = RollbackRecord(args.head, args.reason, int(time.time() * 1000)).to_wire()
        return _send(base + "/rollback", "POST", args.token, _signed_body(args, base, "rollback", body))
    return _send(base + "/rollback", "POST", args.token, {"head": args.head, "reason": args.reason})


def _cmd_patch(args: argparse.Namespace) -> int:
    from protocol.control import PatchRecord
    from protocol.errors import Invalid

    base = resolve_url(args, probe=False)
    assert base is not None
    settings = dict(_parse_setting(item) for item in args.settings)
    if args.key:
        try:
            body = PatchRecord.create(settings, args.round, int(time.time() * 1000)).to_wire()
        except Invalid as exc:
            print(f"p2p-node: {exc}", file=sys.stderr)
            return EXIT_USAGE
        return _send(base + "/patch", "POST", args.token, _signed_body(args, base, "patch", body))
    return _send(base + "/patch", "POST", args.token, {"settings": settings, "round": args.round})


def _cmd_cancel(args: argparse.Namespace) -> int:
    base = resolve_url(args, probe=False)
    assert base is not None
    return _send(f"{base}/fetches/{args.manifest}", "DELETE", args.token)


def _cmd_swarm(args: argparse.Namespace) -> int:
    from node.config import load_config
    from node.local_swarm import run_local_swarm

    overrides = {"workload.name": args.workload, "training.inner_steps": "25", **parse_set_options(args.set)}
    load_config(None, overrides)  # a bad --set fails here, in one line, not in every peer's log
    return run_local_swarm(
        peers=args.peers,
        base_dir=Path(args.dir),
        base_port=args.base_port,
        status_port=args.status_port,
        overrides=overrides,
    )


COMMANDS = {
    "start": _cmd_start,
    "check-config": _cmd_check_config,
    "init-config": _cmd_init_config,
    "keygen": _cmd_keygen,
    "status": _cmd_status,
    "peers": _cmd_peers,
    "heads": _cmd_heads,
    "fetch": _cmd_fetch,
    "watch": _cmd_watch,
    "rollback": _cmd_rollback,
    "patch": _cmd_patch,
    "cancel": _cmd_cancel,
    "swarm": _cmd_swarm,
}


def _is_workload_error(exc: Exception) -> bool:
    # workloads.base imports torch: only a command that loaded a workload can have raised one.
    base = sys.modules.get("workloads.base")
    return base is not None and isinstance(exc, base.WorkloadError)


def _run(argv: list[str] | None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, KeyFileError) as exc:
        print(f"p2p-node: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        if not _is_workload_error(exc):
            raise
        print(f"p2p-node: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush does not fail on the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass  # stdout is not a file descriptor (a test's capture): nothing will flush to the pipe


def main(argv: list[str] | None = None) -> int:
    """Run one command; a closed stdout (``| head``) exits 141 and Ctrl-C 130, both without a word."""
    try:
        try:
            return _run(argv)
        finally:
            sys.stdout.flush()  # a reader that went away shows here, not at the interpreter's exit
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
