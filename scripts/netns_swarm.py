#!/usr/bin/env python3
"""Run the docker-compose.yml swarm without Docker: one Linux network namespace per service.

    sudo python scripts/netns_swarm.py up --check     # start, wait until every peer sees all
                                                      # others live, print a summary, tear down;
                                                      # exit status 0 (converged) or 1
    sudo python scripts/netns_swarm.py up             # the same, then stay up until Ctrl-C
    sudo python scripts/netns_swarm.py up --rate 100mbit   # shape every link with tc tbf
    sudo python scripts/netns_swarm.py up --check --dns    # keep the /dns4/<service> addresses and
                                                      # answer them from a DNS server in the hub
    sudo python scripts/netns_swarm.py plan           # print what `up` would run; needs no root
    sudo python scripts/netns_swarm.py down           # remove what a killed run left behind

What it builds, from docker-compose.yml (the single source of the topology):

* a hub namespace ``p2pns-<pid>-hub`` holding a bridge, and for every compose service a
  namespace ``p2pns-<pid>-<service>`` whose ``eth0`` is one end of a veth pair; the other end
  sits on the hub's bridge. Each service gets an address in a private test subnet
  (``--subnet``, default 10.213.7.0/24) that exists only inside these namespaces: the hub has
  no uplink, so no packet leaves them.
* in each service namespace, ``python -m node.cli start`` with the service's command line,
  its config file from configs/compose/ and its ``environment`` entries, exactly as compose
  passes them. What a container would see differently is translated with ``--set`` overrides:
  paths under a bind mount become the host path (``/etc/p2p-node/compose`` -> configs/compose),
  paths under a named volume become a fresh directory per service under ``--workdir``, and
  ``/dns4/<service>/...`` multiaddrs become ``/ip4/<that service's address>/...`` (compose
  resolves service names with Docker's DNS; these namespaces have none). With ``--dns`` they
  are left alone instead: the hub's bridge gets the subnet's first address, a minimal DNS
  server there answers A queries for the service names, and each namespace's resolv.conf
  (``/etc/netns/<namespace>/resolv.conf``, which ``ip netns exec`` mounts) points at it, so
  the peers dial exactly the multiaddrs a container would.
* it polls every peer's status port (``ip netns exec NS`` + urllib on the namespace's
  127.0.0.1) until every peer reports every other peer alive in ``GET /peers``.

Everything (processes, namespaces, veths, /etc/netns/<namespace>/, the work directory unless
``--keep`` or ``--workdir``) is torn down on
exit, on failure, on Ctrl-C and on SIGTERM. A run killed with SIGKILL leaves namespaces
behind; ``down`` removes those whose run is gone.

Needs root (or CAP_SYS_ADMIN + CAP_NET_ADMIN) and iproute2's ``ip`` (``tc`` for ``--rate``):
    apt-get install -y iproute2
docker-compose.yml is read with a small reader for a plain subset of YAML (block mappings and
sequences, one-line flow sequences, quoted and plain scalars, comments); anything else (anchors,
aliases, tags, multi-line strings) is refused with the line number, not guessed at.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
NS_PREFIX = "p2pns-"
DEFAULT_SUBNET = "10.213.7.0/24"
ENV_PREFIX = "P2P_NODE_"
STOP_GRACE_S = 10.0


class ComposeError(ValueError):
    """docker-compose.yml uses something this script cannot reproduce; the message says what."""


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be created here (not root, no ip, not permitted)."""


# ---------------------------------------------------------------- a reader for plain YAML

_PLAIN_SPECIAL = ("&", "*", "!", "|", ">", "%", "@", "`", "{")


def _strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment`` (a ``#`` at the start or after a blank, unquoted)."""
    quote, i = "", 0
    while i < len(line):
        ch = line[i]
        if quote:
            if ch == "\\" and quote == '"':
                i += 1  # the escaped character cannot close the string
            elif ch == quote:
                quote = ""
        elif ch in "\"'" and (i == 0 or line[i - 1] in " \t[,:-"):
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip()
        i += 1
    return line.rstrip()


def _scalar(text: str, lineno: int) -> Any:
    text = text.strip()
    if text.startswith('"'):
        if not text.endswith('"') or len(text) < 2:
            raise ComposeError(f"line {lineno}: unterminated double-quoted string")
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ComposeError(f"line {lineno}: unsupported escape in {text} ({exc.msg})") from None
    if text.startswith("'"):
        if not text.endswith("'") or len(text) < 2:
            raise ComposeError(f"line {lineno}: unterminated single-quoted string")
        return text[1:-1].replace("''", "'")
    if text == "[]":
        return []
    if text == "{}":
        return {}
    if text.startswith("["):
        return _flow_sequence(text, lineno)
    if text.startswith(_PLAIN_SPECIAL):
        raise ComposeError(f"line {lineno}: {text!r} is outside the plain YAML subset this reader accepts")
    if text in ("", "~", "null", "Null", "NULL"):
        return None
    if text in ("true", "True", "TRUE"):
        return True
    if text in ("false", "False", "FALSE"):
        return False
    if re.fullmatch(r"[-+]?[0-9]+", text):
        return int(text)
    if re.fullmatch(r"[-+]?([0-9]+\.[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?", text):
        return float(text)
    if ": " in text or text.endswith(":"):
        raise ComposeError(f"line {lineno}: a mapping where a scalar was expected: {text!r}")
    return text


def _flow_sequence(text: str, lineno: int) -> list[Any]:
    if not text.endswith("]"):
        raise ComposeError(f"line {lineno}: a flow sequence must close on the same line")
    items: list[Any] = []
    inner = text[1:-1].strip()
    if not inner:
        return items
    current, quote, i = "", "", 0
    while i < len(inner):
        ch = inner[i]
        if quote:
            current += ch
            if ch == "\\" and quote == '"' and i + 1 < len(inner):
                current += inner[i + 1]
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
            current += ch
        elif ch in "[]{}":
            raise ComposeError(f"line {lineno}: nested flow collections are not supported")
        elif ch == ",":
            items.append(_scalar(current, lineno))
            current = ""
        else:
            current += ch
        i += 1
    if quote:
        raise ComposeError(f"line {lineno}: unterminated string in flow sequence")
    if current.strip():
        items.append(_scalar(current, lineno))
    return items


def _split_key(content: str, lineno: int) -> tuple[str, str] | None:
    """``key: rest`` -> (key, rest); None when ``content`` is not a mapping entry."""
    if content[0] in "\"'":
        end = content.find(content[0], 1)
        if end < 0:
            raise ComposeError(f"line {lineno}: unterminated quoted key")
        key, after = _scalar(content[: end + 1], lineno), content[end + 1 :]
        if not (after == ":" or after.startswith(": ")):
            return None
        return str(key), after[1:].strip()
    match = re.match(r"([^\s:#'\"\[\]{},][^:#]*?)\s*:(?:\s+|$)(.*)$", content)
    if match is None:
        return None
    return match.group(1), match.group(2).strip()


def parse_yaml_subset(text: str) -> Any:
    """Parse the plain block-style YAML that docker-compose.yml keeps to (see the module doc)."""
    lines: list[tuple[int, int, str]] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise ComposeError(f"line {lineno}: tabs are not allowed in indentation")
        content = _strip_comment(raw)
        if not content.strip():
            continue
        if content.strip() in ("---", "...") and not content.startswith(" "):
            raise ComposeError(f"line {lineno}: YAML document markers are not supported")
        indent = len(content) - len(content.lstrip(" "))
        lines.append((lineno, indent, content.strip()))
    if not lines:
        return None
    value, pos = _parse_block(lines, 0, lines[0][1])
    if pos != len(lines):
        lineno = lines[pos][0]
        raise ComposeError(f"line {lineno}: unexpected indentation")
    return value


def _parse_block(lines: list[tuple[int, int, str]], pos: int, indent: int) -> tuple[Any, int]:
    lineno, _, content = lines[pos]
    if content == "-" or content.startswith("- "):
        return _parse_sequence(lines, pos, indent)
    if _split_key(content, lineno) is None:
        raise ComposeError(f"line {lineno}: expected `key: value` or `- item`, got {content!r}")
    return _parse_mapping(lines, pos, indent)


def _parse_sequence(lines: list[tuple[int, int, str]], pos: int, indent: int) -> tuple[list[Any], int]:
    items: list[Any] = []
    while pos < len(lines):
        lineno, ind, content = lines[pos]
        if ind < indent:
            break
        if ind > indent:
            raise ComposeError(f"line {lineno}: unexpected indentation")
        if not (content == "-" or content.startswith("- ")):
            break
        item = content[1:].strip()
        if not item:
            raise ComposeError(f"line {lineno}: nested blocks under `-` are not supported")
        if item[0] not in "\"'[" and _split_key(item, lineno) is not None:
            raise ComposeError(f"line {lineno}: mappings inside sequences are not supported: {item!r}")
        items.append(_scalar(item, lineno))
        pos += 1
    return items, pos


def _parse_mapping(lines: list[tuple[int, int, str]], pos: int, indent: int) -> tuple[dict[str, Any], int]:
    mapping: dict[str, Any] = {}
    while pos < len(lines):
        lineno, ind, content = lines[pos]
        if ind < indent:
            break
        if ind > indent:
            raise ComposeError(f"line {lineno}: unexpected indentation")
        if content.startswith("- "):
            break
        split = _split_key(content, lineno)
        if split is None:
            raise ComposeError(f"line {lineno}: expected `key: value`, got {content!r}")
        key, rest = split
        if key in mapping:
            raise ComposeError(f"line {lineno}: duplicate key {key!r}")
        pos += 1
        if rest:
            mapping[key] = _scalar(rest, lineno)
            continue
        # A nested block: more indented, or a sequence at the same indentation ("key:\n- a").
        if pos < len(lines) and (
            lines[pos][1] > indent or (lines[pos][1] == indent and lines[pos][2].startswith("- "))
        ):
            mapping[key], pos = _parse_block(lines, pos, lines[pos][1])
        else:
            mapping[key] = None
    return mapping, pos


# ---------------------------------------------------------------- the compose services


@dataclass(frozen=True)
class Mount:
    target: str  # path inside the container
    source: str  # a host path (bind) or a volume name
    bind: bool
    read_only: bool


@dataclass(frozen=True)
class Service:
    """One compose service, as far as running it outside Docker needs."""

    name: str
    command: tuple[str, ...]  # the arguments after the `p2p-node` entrypoint
    config_target: str  # the --config path inside the container
    config_file: Path  # the same file on this machine
    environment: Mapping[str, str]
    mounts: tuple[Mount, ...]
    ports: tuple[tuple[str, int, int], ...]  # (host ip, host port, container port)
    depends_on: tuple[str, ...]

    @property
    def volumes(self) -> tuple[str, ...]:
        return tuple(m.source for m in self.mounts if not m.bind)

    def host_path(self, container_path: str) -> Path | None:
        """The host path of a bind-mounted ``container_path``; None when no bind mount covers it."""
        for mount in sorted(self.mounts, key=lambda m: -len(m.target)):
            if mount.bind and _under(container_path, mount.target):
                return Path(mount.source) / os.path.relpath(container_path, mount.target)
        return None


def _under(path: str, prefix: str) -> bool:
    prefix = prefix.rstrip("/") or "/"
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def load_compose(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    data = parse_yaml_subset(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("services"), dict):
        raise ComposeError(f"{path}: no `services:` mapping")
    return data


def _environment(name: str, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, list):  # the list form: ["KEY=value", ...]
        pairs = {}
        for item in value:
            key, sep, text = str(item).partition("=")
            if not sep:
                raise ComposeError(f"service {name}: environment entry {item!r} has no '=' (host passthrough)")
            pairs[key] = text
        value = pairs
    if not isinstance(value, dict):
        raise ComposeError(f"service {name}: environment must be a mapping or a list")
    env = {}
    for key, text in value.items():
        if text is None:
            raise ComposeError(f"service {name}: environment {key} has no value (host passthrough)")
        text = "true" if text is True else "false" if text is False else str(text)
        if "$" in text:
            raise ComposeError(f"service {name}: environment {key} uses interpolation ({text!r})")
        env[str(key)] = text
    return env


def _mounts(name: str, value: Any, compose_dir: Path, volumes: Mapping[str, Any]) -> tuple[Mount, ...]:
    mounts = []
    for item in value or []:
        if not isinstance(item, str):
            raise ComposeError(f"service {name}: volumes entries must be short-syntax strings")
        parts = item.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
            raise ComposeError(f"service {name}: volume {item!r} is not SOURCE:TARGET[:ro|rw]")
        source, target = parts[0], parts[1]
        read_only = len(parts) == 3 and parts[2] == "ro"
        if source.startswith((".", "/", "~")):
            host = (compose_dir / source).resolve() if not source.startswith("~") else Path(source).expanduser()
            mounts.append(Mount(target, str(host), True, read_only))
        else:
            if source not in volumes:
                raise ComposeError(f"service {name}: volume {source!r} is not declared under top-level volumes")
            mounts.append(Mount(target, source, False, read_only))
    return tuple(mounts)


def _ports(name: str, value: Any) -> tuple[tuple[str, int, int], ...]:
    ports = []
    for item in value or []:
        parts = str(item).split(":")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            raise ComposeError(f"service {name}: port {item!r} is not HOST_IP:HOST_PORT:CONTAINER_PORT")
        ports.append((parts[0], int(parts[1]), int(parts[2])))
    return tuple(ports)


def compose_services(path: Path = COMPOSE_FILE) -> list[Service]:
    """Every service of ``path``, in file order, with host paths for its config and bind mounts."""
    data = load_compose(path)
    volumes = data.get("volumes") or {}
    services = []
    for name, spec in data["services"].items():
        if not re.fullmatch(r"[a-z][a-z0-9-]{0,30}", name):
            raise ComposeError(f"service name {name!r}: use 1-31 of a-z, 0-9 and '-'")
        if not isinstance(spec, dict):
            raise ComposeError(f"service {name}: expected a mapping")
        command = spec.get("command")
        if not isinstance(command, list) or not command or command[0] != "start":
            raise ComposeError(f"service {name}: command must be an exec-form list starting with \"start\"")
        command = [str(c) for c in command]
        flags = [i for i, c in enumerate(command) if c in ("--config", "-c")]
        if len(flags) != 1 or flags[0] + 1 >= len(command):
            raise ComposeError(f"service {name}: command must name exactly one --config FILE")
        config_target = command[flags[0] + 1]
        mounts = _mounts(name, spec.get("volumes"), path.parent, volumes)
        service = Service(
            name=name,
            command=tuple(command),
            config_target=config_target,
            config_file=Path("/nonexistent"),
            environment=_environment(name, spec.get("environment")),
            mounts=mounts,
            ports=_ports(name, spec.get("ports")),
            depends_on=tuple(spec.get("depends_on") or ()),
        )
        config_file = service.host_path(config_target)
        if config_file is None:
            raise ComposeError(f"service {name}: its config {config_target} is not under a bind mount")
        services.append(dataclasses.replace(service, config_file=config_file))
    return services


# ---------------------------------------------------------------- translating a service


def service_addresses(services: Sequence[Service], subnet: str = DEFAULT_SUBNET) -> dict[str, str]:
    """Service name -> its address: hosts of ``subnet`` from .2 on, in compose file order."""
    net = ipaddress.ip_network(subnet)
    if not net.is_private or net.version != 4:
        raise ValueError(f"{subnet} must be a private IPv4 subnet")
    hosts = list(net.hosts())
    if len(hosts) < len(services) + 1:
        raise ValueError(f"{subnet} is too small for {len(services)} services")
    return {s.name: str(hosts[i + 1]) for i, s in enumerate(services)}


def _translate_str(value: str, service: Service, addresses: Mapping[str, str], volume_dirs: Mapping[str, Path]) -> str:
    match = re.match(r"^/dns[46]?/([^/]+)(/.*)?$", value)
    if match and match.group(1) in addresses:
        return f"/ip4/{addresses[match.group(1)]}{match.group(2) or ''}"
    if value.startswith("/"):
        for mount in sorted(service.mounts, key=lambda m: -len(m.target)):
            if _under(value, mount.target):
                base = Path(mount.source) if mount.bind else volume_dirs[mount.source]
                rest = os.path.relpath(value, mount.target)
                return str(base if rest == "." else base / rest)
    return value


def translations(
    service: Service, config: Any, addresses: Mapping[str, str], volume_dirs: Mapping[str, Path]
) -> dict[str, str]:
    """``--set section.key=value`` overrides that make ``config`` (as the container would load it)
    work in a namespace: container paths under mounts -> host paths, /dns4/<service> -> /ip4."""
    overrides: dict[str, str] = {}

    def walk(dotted: str, value: Any) -> None:
        if isinstance(value, str):
            new = _translate_str(value, service, addresses, volume_dirs)
            if new != value:
                overrides[dotted] = new
        elif isinstance(value, tuple) and all(isinstance(v, str) for v in value):
            new_items = [_translate_str(v, service, addresses, volume_dirs) for v in value]
            if list(value) != new_items:
                if any("," in v for v in new_items):
                    raise ComposeError(f"service {service.name}: {dotted} has a comma; cannot override it")
                overrides[dotted] = ",".join(new_items)
        elif isinstance(value, dict):
            for sub, inner in value.items():
                walk(f"{dotted}.{sub}", inner)

    for section in dataclasses.fields(config):
        section_value = getattr(config, section.name)
        for key in dataclasses.fields(section_value):
            walk(f"{section.name}.{key.name}", getattr(section_value, key.name))
    return overrides


@dataclass
class PeerPlan:
    service: Service
    namespace: str
    address: str
    status_port: int
    argv: list[str]  # run inside the namespace
    env: dict[str, str]  # the whole environment of the peer process
    workdir: Path
    log_path: Path


def plan_swarm(
    services: Sequence[Service],
    run_id: str,
    workdir: Path,
    subnet: str = DEFAULT_SUBNET,
    base_env: Mapping[str, str] | None = None,
    dns: bool = False,
    sets: Mapping[str, str] | None = None,
) -> list[PeerPlan]:
    """What `up` runs for each service; loads each config the way the peer will (a check in itself).

    With ``dns`` the /dns4/<service> multiaddrs stay as they are (the namespaces get a resolver
    that answers the service names, like Docker's); otherwise they become /ip4 addresses."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from node.config import load_config

    addresses = service_addresses(services, subnet)
    base = {k: v for k, v in (os.environ if base_env is None else base_env).items() if not k.startswith(ENV_PREFIX)}
    base["PYTHONUNBUFFERED"] = "1"
    plans = []
    for service in services:
        peer_dir = workdir / service.name
        volume_dirs = {volume: peer_dir / "volumes" / volume for volume in service.volumes}
        container_config = load_config(str(service.config_file), environ=service.environment)
        overrides = translations(service, container_config, {} if dns else addresses, volume_dirs)
        overrides.update(sets or {})  # applied to every service, like an edit to every config
        command = list(service.command)
        command[command.index(service.config_target)] = str(service.config_file)
        for dotted, value in sorted(overrides.items()):
            command += ["--set", f"{dotted}={value}"]
        env = {**base, **service.environment}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), base.get("PYTHONPATH", "")) if p)
        # The config the peer will really run with: a broken override fails here, not in a namespace.
        final = load_config(str(service.config_file), overrides, environ=service.environment)
        plans.append(
            PeerPlan(
                service=service,
                namespace=f"{NS_PREFIX}{run_id}-{service.name}",
                address=addresses[service.name],
                status_port=final.status.port,
                argv=[sys.executable, "-m", "node.cli", *command],
                env=env,
                workdir=peer_dir,
                log_path=peer_dir / "peer.log",
            )
        )
    return plans


# ---------------------------------------------------------------- namespaces


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"`{shlex.join(argv)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result


def netns_unavailable() -> str | None:
    """Why namespaces cannot be created here, or None when they can (creates and deletes a probe)."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (apt-get install -y iproute2)"
    probe = f"{NS_PREFIX}probe-{os.getpid()}"
    result = _run("ip", "netns", "add", probe, check=False)
    if result.returncode != 0:
        hint = "" if os.geteuid() == 0 else "; it needs root (or CAP_SYS_ADMIN + CAP_NET_ADMIN)"
        return f"`ip netns add` failed: {result.stderr.strip() or result.returncode}{hint}"
    try:
        veth = _run("ip", "-n", probe, "link", "add", "a0", "type", "veth", "peer", "name", "b0", check=False)
        if veth.returncode != 0:
            return f"cannot create veth pairs: {veth.stderr.strip()}"
    finally:
        _run("ip", "netns", "del", probe, check=False)
    return None


def make_hub(hub: str) -> None:
    """Give the (new) namespace ``hub`` a bridge, ``br0``: the switch every peer's veth joins."""
    _run("ip", "-n", hub, "link", "set", "lo", "up")
    _run("ip", "-n", hub, "link", "add", "br0", "type", "bridge")
    _run("ip", "-n", hub, "link", "set", "br0", "up")


def plug(hub: str, namespace: str, hub_end: str, address: str) -> None:
    """Join the (new) namespace ``namespace`` to ``hub``'s bridge: its ``eth0``, with ``address``
    (CIDR), is one end of a veth pair whose other end, ``hub_end``, sits on the bridge."""
    _run("ip", "-n", namespace, "link", "set", "lo", "up")
    # Created inside the hub namespace, with its other end moved straight into `namespace`:
    # nothing ever appears in the host's own namespace.
    _run("ip", "-n", hub, "link", "add", hub_end, "type", "veth", "peer", "name", "eth0", "netns", namespace)
    _run("ip", "-n", hub, "link", "set", hub_end, "master", "br0")
    _run("ip", "-n", hub, "link", "set", hub_end, "up")
    _run("ip", "-n", namespace, "addr", "add", address, "dev", "eth0")
    _run("ip", "-n", namespace, "link", "set", "eth0", "up")


def shape(namespace: str, dev: str, rate: str) -> None:
    """Limit what ``dev`` in ``namespace`` sends to ``rate`` (tc's notation, e.g. 100mbit)."""
    _run("tc", "-n", namespace, "qdisc", "add", "dev", dev, "root", "tbf",
         "rate", rate, "burst", "256kbit", "latency", "50ms")


@dataclass
class Swarm:
    """A running namespace swarm; ``close()`` removes every trace of it."""

    plans: list[PeerPlan]
    hub: str
    workdir: Path
    keep_workdir: bool = False
    rate: str | None = None
    subnet: str = DEFAULT_SUBNET
    dns: bool = False
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    resolv_dirs: list[Path] = field(default_factory=list)
    dns_server: subprocess.Popen[bytes] | None = None
    created_etc_netns: bool = False
    namespaces: list[str] = field(default_factory=list)
    _logs: list[Any] = field(default_factory=list)

    def build_network(self) -> None:
        _run("ip", "netns", "add", self.hub)
        self.namespaces.append(self.hub)
        make_hub(self.hub)
        prefix = ipaddress.ip_network(self.subnet).prefixlen
        for index, plan in enumerate(self.plans):
            ns, hub_end = plan.namespace, f"veth{index}"
            _run("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            plug(self.hub, ns, hub_end, f"{plan.address}/{prefix}")
            if self.dns:
                self._use_hub_resolver(ns)
            if self.rate:
                # Both directions: eth0 shapes what the peer sends, the hub end what it receives.
                shape(ns, "eth0", self.rate)
                shape(self.hub, hub_end, self.rate)

    @property
    def hub_address(self) -> str:
        return str(next(ipaddress.ip_network(self.subnet).hosts()))

    def _use_hub_resolver(self, ns: str) -> None:
        # `ip netns exec NS` bind-mounts /etc/netns/NS/resolv.conf over /etc/resolv.conf.
        if not Path("/etc/netns").exists():
            self.created_etc_netns = True
        directory = Path("/etc/netns") / ns
        directory.mkdir(parents=True, exist_ok=True)
        self.resolv_dirs.append(directory)
        (directory / "resolv.conf").write_text(f"# written by {Path(__file__).name}\nnameserver {self.hub_address}\n")

    def start_dns(self) -> None:
        """Answer A queries for the service names from the hub, as Docker's embedded DNS does."""
        prefix = ipaddress.ip_network(self.subnet).prefixlen
        _run("ip", "-n", self.hub, "addr", "add", f"{self.hub_address}/{prefix}", "dev", "br0")
        records = [f"{p.service.name}={p.address}" for p in self.plans]
        argv = [sys.executable, str(Path(__file__).resolve()), "dns-serve", "--listen", self.hub_address, *records]
        self.dns_server = subprocess.Popen(["ip", "netns", "exec", self.hub, *argv], stdin=subprocess.DEVNULL,
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        assert self.dns_server.stdout is not None
        ready = self.dns_server.stdout.readline()
        if not ready.startswith(b"serving"):
            raise RuntimeError(f"the namespace DNS server did not start: {ready.decode(errors='replace')}")

    def start_peers(self) -> None:
        for plan in self.plans:
            plan.workdir.mkdir(parents=True, exist_ok=True)
            for volume in plan.service.volumes:
                (plan.workdir / "volumes" / volume).mkdir(parents=True, exist_ok=True)
            log = open(plan.log_path, "wb")
            self._logs.append(log)
            # `ip netns exec` execs the command, so the pid is the peer's own.
            self.processes[plan.service.name] = subprocess.Popen(
                ["ip", "netns", "exec", plan.namespace, *plan.argv],
                env=plan.env,
                cwd=plan.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches this script only; it stops the peers
            )

    def query(self, plan: PeerPlan) -> dict[str, Any] | None:
        """The peer's /status and /peers, fetched from inside its namespace; None if it does not answer."""
        base = f"http://127.0.0.1:{plan.status_port}"
        code = (
            "import json, urllib.request as u\n"
            f"s = json.load(u.urlopen({base + '/status'!r}, timeout=2))\n"
            f"p = json.load(u.urlopen({base + '/peers'!r}, timeout=2))\n"
            f"c = json.load(u.urlopen({base + '/chain?limit=200'!r}, timeout=2))\n"
            "print(json.dumps({'status': s, 'peers': p['peers'], 'chain': c['chain']}))\n"
        )
        try:
            result = subprocess.run(
                ["ip", "netns", "exec", plan.namespace, sys.executable, "-c", code],
                capture_output=True, text=True, timeout=10,
            )
        except subprocess.TimeoutExpired:
            return None
        if result.returncode != 0:
            return None
        try:
            return json.loads(result.stdout)
        except json.JSONDecodeError:
            return None

    def exited(self) -> dict[str, int]:
        return {name: p.returncode for name, p in self.processes.items() if p.poll() is not None}

    def log_tail(self, name: str, lines: int = 15) -> str:
        plan = next(p for p in self.plans if p.service.name == name)
        try:
            text = plan.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        # A second Ctrl-C (or a SIGTERM sent to the whole process group) must not cut the cleanup short.
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            for process in self.processes.values():
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE_S
            for process in self.processes.values():
                try:
                    process.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=5)
            for log in self._logs:
                log.close()
            if self.dns_server is not None and self.dns_server.poll() is None:
                self.dns_server.terminate()
                try:
                    self.dns_server.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.dns_server.kill()
                    self.dns_server.wait()
            for directory in self.resolv_dirs:
                shutil.rmtree(directory, ignore_errors=True)
            self.resolv_dirs.clear()
            if self.created_etc_netns:
                try:
                    Path("/etc/netns").rmdir()  # only if empty: another run may be using it
                except OSError:
                    pass
            for ns in reversed(self.namespaces):
                _kill_namespace_pids(ns)
                _run("ip", "netns", "del", ns, check=False)  # takes its veth ends with it
            self.namespaces.clear()
            if not self.keep_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _kill_namespace_pids(ns: str) -> None:
    """Kill what still runs in one of this script's namespaces (only its own peers can be there)."""
    result = _run("ip", "netns", "pids", ns, check=False)
    for pid in result.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


# ---------------------------------------------------------------- convergence


@dataclass
class PeerReport:
    service: str
    namespace: str
    address: str
    peer_id: str | None = None
    live: int = 0
    connected: int = 0
    alive_ids: frozenset[str] = frozenset()
    sees_all: bool = False
    head_round: int = 0
    chain: dict[int, str] = field(default_factory=dict)  # round -> canonical head id


@dataclass
class Result:
    converged: bool
    seconds: float
    peers: list[PeerReport]
    problem: str = ""

    def summary(self) -> str:
        width = max(len(p.service) for p in self.peers) if self.peers else 8
        lines = [f"{'service':<{width}}  {'address':<15}  {'peer id':<14}  live  conn  sees all  head round"]
        for p in self.peers:
            pid = f"...{p.peer_id[-10:]}" if p.peer_id else "(no answer)"
            lines.append(
                f"{p.service:<{width}}  {p.address:<15}  {pid:<14}  {p.live:>4}  {p.connected:>4}  "
                f"{'yes' if p.sees_all else 'no':<8}  {p.head_round:>10}"
            )
        verdict = "converged" if self.converged else f"NOT converged: {self.problem}"
        lines.append(f"{len(self.peers)} peers, {verdict} after {self.seconds:.1f} s")
        return "\n".join(lines)


def poll(swarm: Swarm) -> list[PeerReport]:
    reports = []
    # One query per peer, all at once: a slow peer does not delay the others' answers.
    with_answers = _parallel_queries(swarm)
    ids = {name: a["status"].get("peer_id") for name, a in with_answers.items() if a}
    for plan in swarm.plans:
        name = plan.service.name
        report = PeerReport(name, plan.namespace, plan.address)
        answer = with_answers.get(name)
        if answer:
            status = answer["status"]
            report.peer_id = status.get("peer_id")
            report.live = int(status.get("peers", {}).get("live", 0))
            report.connected = int(status.get("peers", {}).get("connected", 0))
            report.alive_ids = frozenset(row["peer_id"] for row in answer["peers"] if row.get("alive"))
            others = {pid for other, pid in ids.items() if other != name}
            report.sees_all = len(ids) == len(swarm.plans) and None not in others and others <= report.alive_ids
            report.head_round = int((status.get("training") or {}).get("head_round") or 0)
            report.chain = {int(h["round"]): str(h["id"]) for h in answer.get("chain", [])}
        reports.append(report)
    return reports


def _parallel_queries(swarm: Swarm) -> dict[str, dict[str, Any] | None]:
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=len(swarm.plans))
    try:
        answers = list(pool.map(swarm.query, swarm.plans))
    finally:
        # On Ctrl-C, do not sit here until the queries in flight time out (10 s each): the
        # teardown kills whatever still runs in the namespaces, these queries included.
        pool.shutdown(wait=False, cancel_futures=True)
    return {plan.service.name: answer for plan, answer in zip(swarm.plans, answers)}


def trained_and_agree(reports: list[PeerReport], min_round: int) -> bool:
    """Every peer has adopted a head of round ``min_round`` or later, and all name the same head there."""
    if min_round <= 0:
        return True
    if not all(r.head_round >= min_round for r in reports):
        return False
    heads = {r.chain.get(min_round) for r in reports}
    return len(heads) == 1 and None not in heads


def wait_converged(swarm: Swarm, timeout: float, interval: float = 0.5, min_round: int = 0) -> Result:
    started = time.monotonic()
    reports: list[PeerReport] = []
    while True:
        exited = swarm.exited()
        if exited:
            name, code = next(iter(exited.items()))
            tail = swarm.log_tail(name)
            return Result(False, time.monotonic() - started, reports or poll(swarm),
                          f"{name} exited with status {code}; its log ends:\n{tail}")
        reports = poll(swarm)
        if reports and all(r.sees_all for r in reports) and trained_and_agree(reports, min_round):
            return Result(True, time.monotonic() - started, reports)
        if time.monotonic() - started > timeout:
            lagging = ", ".join(
                r.service for r in reports if not r.sees_all or r.head_round < min_round
            ) or f"heads of round {min_round} differ"
            return Result(False, time.monotonic() - started, reports, f"timed out after {timeout:.0f} s ({lagging})")
        time.sleep(interval)


# ---------------------------------------------------------------- commands


def run_swarm(
    compose_file: Path = COMPOSE_FILE,
    *,
    check: bool = True,
    timeout: float = 60.0,
    rate: str | None = None,
    subnet: str = DEFAULT_SUBNET,
    workdir: Path | None = None,
    keep: bool = False,
    dns: bool = False,
    out: Any = None,
    min_round: int = 2,
    sets: Mapping[str, str] | None = None,
) -> Result:
    """Build the namespaces, start every service, wait for convergence; with ``check`` tear down
    right after, otherwise stay up until Ctrl-C/SIGTERM. Always tears down before returning."""
    out = out or sys.stdout
    reason = netns_unavailable()
    if reason:
        raise NetnsUnavailable(reason)
    if rate and shutil.which("tc") is None:
        raise NetnsUnavailable("--rate needs iproute2's `tc`")
    run_id = str(os.getpid())
    services = compose_services(compose_file)
    root = Path(tempfile.mkdtemp(prefix="p2pns-")) if workdir is None else workdir
    plans = plan_swarm(services, run_id, root, subnet, dns=dns, sets=sets)
    swarm = Swarm(plans, hub=f"{NS_PREFIX}{run_id}-hub", workdir=root, keep_workdir=keep or workdir is not None,
                  rate=rate, subnet=subnet, dns=dns)

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        swarm.build_network()
        if dns:
            swarm.start_dns()
        swarm.start_peers()
        print(f"started {len(plans)} peers from {compose_file.name} (logs in {root})", file=out, flush=True)
        result = wait_converged(swarm, timeout, min_round=min_round)
        print(result.summary(), file=out, flush=True)
        if not check and result.converged:
            print("up; Ctrl-C tears it down. Inspect a peer with e.g.", file=out)
            first = plans[0]
            print(f"  ip netns exec {first.namespace} curl -s 127.0.0.1:{first.status_port}/status", file=out,
                  flush=True)
            try:
                while not swarm.exited():
                    time.sleep(10)
                    reports = poll(swarm)
                    line = ", ".join(f"{r.service} {r.live if r.peer_id else '-'}" for r in reports)
                    print(f"{time.strftime('%H:%M:%S')} live peers: {line}", file=out, flush=True)
            except KeyboardInterrupt:
                print("stopping; tearing down", file=out, flush=True)
                return result  # stopped on request after it converged: a success
            return Result(False, result.seconds, result.peers, f"peers exited: {swarm.exited()}")
        return result
    except KeyboardInterrupt:
        print("interrupted; tearing down", file=out, flush=True)
        return Result(False, 0.0, [], "interrupted")
    finally:
        swarm.close()
        signal.signal(signal.SIGTERM, previous)


def down() -> int:
    """Remove namespaces of runs that are gone (their pid no longer exists)."""
    result = _run("ip", "netns", "list", check=False)
    removed = 0
    for line in result.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.match(rf"{re.escape(NS_PREFIX)}(\d+)-", name)
        if not match:
            continue
        if Path(f"/proc/{match.group(1)}").exists() and int(match.group(1)) != os.getpid():
            continue  # that run is still alive
        _kill_namespace_pids(name)
        _run("ip", "netns", "del", name, check=False)
        shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)
        removed += 1
    print(f"removed {removed} leftover namespace(s)")
    return 0


def serve_dns(listen: str, records: Mapping[str, str]) -> None:
    """A minimal authoritative DNS server over UDP: A records for ``records`` (name -> IPv4),
    an empty answer for other types of a known name, NXDOMAIN for anything else."""
    import socket
    import struct

    table = {name.lower().rstrip("."): socket.inet_aton(addr) for name, addr in records.items()}
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((listen, 53))
    print("serving", flush=True)
    while True:
        packet, client = sock.recvfrom(512)
        if len(packet) < 12:
            continue
        ident, flags, qdcount = struct.unpack("!HHH", packet[:6])
        if flags & 0x8000 or qdcount != 1:
            continue
        labels, pos = [], 12
        while pos < len(packet) and packet[pos] != 0:
            length = packet[pos]
            labels.append(packet[pos + 1 : pos + 1 + length].decode("ascii", "replace"))
            pos += 1 + length
        question = packet[12 : pos + 5]
        if pos + 5 > len(packet):
            continue
        qtype = struct.unpack("!H", packet[pos + 1 : pos + 3])[0]
        name = ".".join(labels).lower()
        address = table.get(name)
        answers = b""
        if address is not None and qtype == 1:
            answers = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 5, 4) + address
        rcode = 0 if address is not None else 3
        header = struct.pack("!HHHHHH", ident, 0x8400 | (flags & 0x0100) | rcode, 1, 1 if answers else 0, 0, 0)
        sock.sendto(header + question + answers, client)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--compose-file", type=Path, default=COMPOSE_FILE)
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start the compose services in namespaces")
    up.add_argument("--check", action="store_true", help="tear down as soon as it converged; exit 0 or 1")
    up.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for convergence")
    up.add_argument("--min-round", type=int, default=2,
                    help="converged also means every peer adopted the same head of this round (0: membership only)")
    up.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config key on every peer, e.g. workload.name=tiny")
    up.add_argument("--rate", help="shape every link with tc tbf at this rate, e.g. 100mbit")
    up.add_argument("--subnet", default=DEFAULT_SUBNET, help="private test subnet for the namespaces")
    up.add_argument("--workdir", type=Path, help="keep peer data and logs here (kept afterwards)")
    up.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    up.add_argument("--dns", action="store_true",
                    help="keep the /dns4/<service> addresses and resolve them with a DNS server in the hub "
                         "namespace (as Docker's DNS does) instead of rewriting them to /ip4")
    commands.add_parser("plan", help="print the commands `up` would run (no root needed)")
    commands.add_parser("down", help="remove namespaces left by a killed run")
    serve = commands.add_parser("dns-serve", help=argparse.SUPPRESS)  # run by `up --dns` in the hub namespace
    serve.add_argument("--listen", required=True)
    serve.add_argument("records", nargs="+", metavar="NAME=IPV4")
    args = parser.parse_args(argv)

    if args.command == "dns-serve":
        try:
            serve_dns(args.listen, dict(r.split("=", 1) for r in args.records))
        except KeyboardInterrupt:
            pass
        return 0

    if args.command == "plan":
        services = compose_services(args.compose_file)
        for plan in plan_swarm(services, "<pid>", Path(tempfile.gettempdir()) / "p2pns-<run>"):
            env = [f"{k}={v}" for k, v in plan.service.environment.items()]
            print(f"# {plan.service.name}: {plan.address}, status port {plan.status_port}")
            print(shlex.join(["ip", "netns", "exec", plan.namespace, *(["env", *env] if env else []), *plan.argv]))
        return 0
    if args.command == "down":
        return down()
    try:
        sets = dict(item.split("=", 1) for item in args.set if "=" in item)
        result = run_swarm(args.compose_file, check=args.check, timeout=args.timeout, rate=args.rate,
                           subnet=args.subnet, workdir=args.workdir, keep=args.keep, dns=args.dns,
                           min_round=args.min_round, sets=sets)
    except NetnsUnavailable as exc:
        print(f"netns_swarm: {exc}", file=sys.stderr)
        return 2
    except ComposeError as exc:
        print(f"netns_swarm: {args.compose_file}: {exc}", file=sys.stderr)
        return 2
    if not result.converged:
        print(f"netns_swarm: {result.problem}", file=sys.stderr)
    return 0 if result.converged else 1


if __name__ == "__main__":
    sys.exit(main())
