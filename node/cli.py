"""The ``p2p-node`` command line: start a peer, inspect a running one, make keys and configs."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from node.config import Config, load_config, render_starter_config
from node.config_schema import ConfigError, parse_set_options
from node.keys import KeyFileError, load_or_create_key, read_key, write_key
from protocol.identity import SigningKey
from workloads.base import WorkloadError

DEFAULT_URL = "http://127.0.0.1:8470"
EXIT_USAGE = 2

# Flags that are shorthands for --set, because they are what people reach for first.
FLAG_KEYS = {
    "data_dir": "node.data_dir",
    "log_level": "node.log_level",
    "listen": "network.listen",
    "bootstrap": "swarm.bootstrap",
    "swarm": "swarm.name",
    "status_port": "status.port",
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2p-node", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    start = commands.add_parser("start", help="run a peer until SIGINT/SIGTERM")
    start.add_argument("--config", "-c", default=os.environ.get("P2P_NODE_CONFIG"), help="TOML config file")
    start.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key")
    start.add_argument("--data-dir", dest="data_dir")
    start.add_argument("--log-level", dest="log_level")
    start.add_argument("--listen", help="comma-separated listen multiaddrs")
    start.add_argument("--bootstrap", help="comma-separated bootstrap multiaddrs")
    start.add_argument("--swarm", help="swarm name")
    start.add_argument("--status-port", dest="status_port")

    check = commands.add_parser("check-config", help="load a config and print it resolved, or the error")
    check.add_argument("--config", "-c", default=os.environ.get("P2P_NODE_CONFIG"))
    check.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")

    init = commands.add_parser("init-config", help="write a commented starter config")
    init.add_argument("path", nargs="?", default="-", help="file to write (default: stdout)")

    keygen = commands.add_parser("keygen", help="create (or show) a peer identity key")
    keygen.add_argument("--data-dir", help="create <dir>/identity.key if missing and print its peer id")
    keygen.add_argument("--out", help="write a new key to this file (refuses to overwrite)")

    for name, text in (("status", "show a running peer's status"), ("peers", "list a running peer's peer table")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--url", default=os.environ.get("P2P_NODE_URL", DEFAULT_URL))

    heads = commands.add_parser("heads", help="list a running peer's recent heads")
    heads.add_argument("--url", default=os.environ.get("P2P_NODE_URL", DEFAULT_URL))
    heads.add_argument("--json", action="store_true", help="print the raw JSON")

    fetch = commands.add_parser("fetch", help="download a head's weights as a .safetensors file")
    fetch.add_argument("head", help="head id (b3:...) or 'canonical'")
    fetch.add_argument("-o", "--output", required=True, help="file to write")
    fetch.add_argument("--url", default=os.environ.get("P2P_NODE_URL", DEFAULT_URL))

    watch = commands.add_parser("watch", help="follow a running peer's events live")
    watch.add_argument("--url", default=os.environ.get("P2P_NODE_URL", DEFAULT_URL))
    watch.add_argument("--replay", type=int, default=20, help="past events to show first")
    watch.add_argument("--json", action="store_true", help="print each event as a JSON line")

    rollback = commands.add_parser("rollback", help="roll the swarm back to an earlier head (operators only)")
    rollback.add_argument("head", help="the head id to roll back to")
    rollback.add_argument("--reason", default="", help="why, recorded in the signed rollback")

    patch = commands.add_parser("patch", help="change training settings from a round on (operators only)")
    patch.add_argument("settings", nargs="+", metavar="KEY=VALUE", help="inner_lr, inner_steps, outer_lr, outer_momentum, codec, round_deadline_s")
    patch.add_argument("--round", type=int, required=True, help="first round the settings apply to")

    for sub in (rollback, patch):
        sub.add_argument("--url", default=os.environ.get("P2P_NODE_URL", DEFAULT_URL))
        sub.add_argument("--token", default=os.environ.get("P2P_NODE_STATUS_TOKEN", ""), help="status token (or P2P_NODE_STATUS_TOKEN)")
        sub.add_argument("--key", help="operator key file: sign here instead of on the peer")
        sub.add_argument("--swarm", help="swarm name, needed with --key (default: ask the peer)")

    cancel = commands.add_parser("cancel", help="cancel an in-flight fetch on a running peer")
    cancel.add_argument("manifest", help="manifest id of the fetch")
    cancel.add_argument("--url", default=os.environ.get("P2P_NODE_URL", DEFAULT_URL))
    cancel.add_argument("--token", default=os.environ.get("P2P_NODE_STATUS_TOKEN", ""))

    swarm = commands.add_parser("swarm", help="run a local swarm of N peers on 127.0.0.1")
    swarm.add_argument("--peers", type=int, default=3)
    swarm.add_argument("--dir", default="./swarm-data", help="data directories and configs go here")
    swarm.add_argument("--base-port", type=int, default=4101, help="libp2p port of the first peer")
    swarm.add_argument("--status-port", type=int, default=8471, help="status port of the first peer")
    swarm.add_argument("--workload", default="charlm", help="built-in workload or module:attr (default charlm)")
    swarm.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
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
    config = _load(args)
    print(render_starter_config(config), end="")
    return 0


def _cmd_init_config(args: argparse.Namespace) -> int:
    text = render_starter_config()
    if args.path == "-":
        print(text, end="")
    else:
        path = Path(args.path)
        if path.exists():
            print(f"p2p-node: {path} exists; not overwriting", file=sys.stderr)
            return 1
        path.write_text(text)
        print(f"wrote {path}")
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    if args.out:
        path = Path(args.out)
        if path.exists():
            print(f"p2p-node: {path} exists; not overwriting (its peer id: {read_key(path).peer_id})", file=sys.stderr)
            return 1
        key = SigningKey.generate()
        write_key(path, key)
    else:
        key = load_or_create_key(Path(args.data_dir or "./data"))
    print(key.peer_id)
    return 0


def fetch_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


def _cmd_get(args: argparse.Namespace, path: str) -> int:
    url = args.url.rstrip("/") + path
    try:
        print(json.dumps(fetch_json(url), indent=2))
    except (urllib.error.URLError, OSError) as exc:
        print(f"p2p-node: cannot reach {url}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 1
    return 0


def _cmd_heads(args: argparse.Namespace) -> int:
    url = args.url.rstrip("/") + "/heads"
    try:
        listing = fetch_json(url)
    except (urllib.error.URLError, OSError) as exc:
        print(f"p2p-node: cannot reach {url}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 1
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
    from node.download import DownloadError, download_head

    try:
        path = download_head(args.url, args.head, Path(args.output))
    except DownloadError as exc:
        print(f"p2p-node: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


def _cmd_watch(args: argparse.Namespace) -> int:
    url = f"{args.url.rstrip('/')}/events?replay={args.replay}"
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            for line in response:
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
    except (urllib.error.URLError, OSError) as exc:
        print(f"p2p-node: cannot follow {url}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 1
    return 0


def _send(url: str, method: str, token: str, body: Any = None) -> int:
    request = urllib.request.Request(
        url, method=method, data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            print(json.dumps(json.load(response), indent=2))
            return 0
    except urllib.error.HTTPError as exc:
        try:
            reason = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            reason = exc.reason
        print(f"p2p-node: {exc.code} {reason}", file=sys.stderr)
    except (urllib.error.URLError, OSError) as exc:
        print(f"p2p-node: cannot reach {url}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
    return 1


def _signed_body(args: argparse.Namespace, kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """With --key, sign the operator record here so the operator's key never leaves this machine."""
    if not args.key:
        return body
    from node.operator import sign_operator_record

    swarm = args.swarm or fetch_json(args.url.rstrip("/") + "/status")["swarm"]
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

    if args.key:
        body = RollbackRecord(args.head, args.reason, int(time.time() * 1000)).to_wire()
        return _send(args.url.rstrip("/") + "/rollback", "POST", args.token, _signed_body(args, "rollback", body))
    return _send(args.url.rstrip("/") + "/rollback", "POST", args.token, {"head": args.head, "reason": args.reason})


def _cmd_patch(args: argparse.Namespace) -> int:
    from protocol.control import PatchRecord
    from protocol.errors import Invalid

    settings = dict(_parse_setting(item) for item in args.settings)
    if args.key:
        try:
            body = PatchRecord.create(settings, args.round, int(time.time() * 1000)).to_wire()
        except Invalid as exc:
            print(f"p2p-node: {exc}", file=sys.stderr)
            return EXIT_USAGE
        return _send(args.url.rstrip("/") + "/patch", "POST", args.token, _signed_body(args, "patch", body))
    return _send(args.url.rstrip("/") + "/patch", "POST", args.token, {"settings": settings, "round": args.round})


def _cmd_swarm(args: argparse.Namespace) -> int:
    from node.local_swarm import run_local_swarm

    return run_local_swarm(
        peers=args.peers,
        base_dir=Path(args.dir),
        base_port=args.base_port,
        status_port=args.status_port,
        overrides={"workload.name": args.workload, "training.inner_steps": "25", **parse_set_options(args.set)},
    )


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "start":
            return _cmd_start(args)
        if args.command == "check-config":
            return _cmd_check_config(args)
        if args.command == "init-config":
            return _cmd_init_config(args)
        if args.command == "keygen":
            return _cmd_keygen(args)
        if args.command == "status":
            return _cmd_get(args, "/status")
        if args.command == "peers":
            return _cmd_get(args, "/peers")
        if args.command == "swarm":
            return _cmd_swarm(args)
        if args.command == "rollback":
            return _cmd_rollback(args)
        if args.command == "patch":
            return _cmd_patch(args)
        if args.command == "cancel":
            return _send(f"{args.url.rstrip('/')}/fetches/{args.manifest}", "DELETE", args.token)
        if args.command == "watch":
            return _cmd_watch(args)
        if args.command == "heads":
            return _cmd_heads(args)
        if args.command == "fetch":
            return _cmd_fetch(args)
    except ConfigError as exc:
        print(f"p2p-node: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyFileError as exc:
        print(f"p2p-node: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except WorkloadError as exc:
        print(f"p2p-node: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
