"""The node's configuration: every TOML section and key, with its default, help and checks.

Precedence, lowest first: field defaults, the TOML file, ``P2P_NODE_<SECTION>_<KEY>``
environment variables, ``--set section.key=value`` pairs (see node.config_schema).
"""

from __future__ import annotations

import ipaddress
import os
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from node.config_schema import (
    ConfigError,
    describe,
    load_schema,
    parse_set_options,
    reference_table,
    render_toml,
    setting,
)
from protocol.cid import is_content_id
from protocol.errors import Invalid
from protocol.identity import public_key_from_peer_id

__all__ = [
    "Config",
    "ConfigError",
    "config_reference",
    "load_config",
    "parse_set_options",
    "render_starter_config",
]

LogLevel = Literal["debug", "info", "warning", "error", "critical"]
LogFormat = Literal["auto", "console", "json"]


# ---------------------------------------------------------------- value checks


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else "must be 0 or greater"


def _clip_iters(value: int) -> str | None:
    # node.merge.MAX_CLIP_ITERS; node.merge imports torch, which loading a config should not.
    return None if 1 <= value <= 32 else "must be 1 to 32"


def _port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else "must be a port number from 0 to 65535"


def _multiaddrs(values: tuple[str, ...]) -> str | None:
    # Parsed as libp2p parses them when the daemon starts, so a bad one fails here, in one line.
    import multiaddr  # small and pure Python; libp2p itself is imported only by the daemon

    for value in values:
        if not value.startswith("/"):
            return f"{describe(value)} is not a multiaddr (it must start with \"/\")"
        try:
            multiaddr.Multiaddr(value)
        except Exception as exc:  # the parser raises several types, all meaning "not a multiaddr"
            reason = " ".join(str(getattr(exc, "message", exc)).split())
            return f"{describe(value)} is not a valid multiaddr ({reason})"
    return None


def _dialable(values: tuple[str, ...]) -> str | None:
    # libp2p's noise handshake checks the remote's identity, so a dial needs the peer id.
    for value in values:
        _, sep, peer = value.rpartition("/p2p/")
        if value.startswith("/") and (not sep or "/" in peer or _peer_ids((peer,)) is not None):
            return f"{describe(value)} must end in /p2p/<peer id> (p2p-node keygen prints a peer's id)"
    return _multiaddrs(values)


def _peer_ids(values: tuple[str, ...]) -> str | None:
    for value in values:
        try:
            public_key_from_peer_id(value)
        except Invalid:
            return f"{describe(value)} is not an ed25519 libp2p peer id (12D3KooW...)"
    return None


def _variants(values: tuple[str, ...]) -> str | None:
    unknown = [v for v in values if v not in ("bf16", "int8")]
    return f"unknown variant {describe(unknown[0])} (bf16 or int8)" if unknown else None


def _topic_safe(value: str) -> str | None:
    if re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value):
        return None
    return "must be 1-64 characters from A-Z, a-z, 0-9, '.', '_' and '-' (it names gossip topics)"


# ---------------------------------------------------------------- sections


@dataclass(frozen=True)
class NodeSection:
    """This peer: its name, where it keeps its files and how it logs."""

    name: str = setting("", "Human-readable name shown in status and logs; empty uses the short peer id.")
    data_dir: str = setting(
        "./data",
        "Directory for the identity key, content store and state (relative to the working directory).",
    )
    key_file: str = setting(
        "",
        "Path of the ed25519 identity key; empty means <data_dir>/identity.key, created on first start.",
    )
    log_level: LogLevel = setting("info", "Lowest level logged: debug, info, warning, error or critical.")
    log_format: LogFormat = setting(
        "auto",
        "Log rendering: console (human), json (one object per line) or auto (console on a terminal).",
    )


@dataclass(frozen=True)
class SwarmSection:
    """Which swarm this peer belongs to and who else is in it."""

    name: str = setting(
        "default",
        "Swarm name; namespaces the gossip topics so that swarms never mix.",
        check=_topic_safe,
    )
    bootstrap: tuple[str, ...] = setting(
        (),
        "Multiaddrs (ending in /p2p/<peer id>) dialled at start to join the swarm.",
        check=_dialable,
    )
    members: tuple[str, ...] = setting(
        (),
        "Peer ids allowed to publish records; empty means an open swarm.",
        check=_peer_ids,
    )
    operators: tuple[str, ...] = setting(
        (),
        "Peer ids whose signed rollback records pin the canonical head.",
        check=_peer_ids,
    )


@dataclass(frozen=True)
class NetworkSection:
    """Transports, addresses and peer discovery."""

    listen: tuple[str, ...] = setting(
        ("/ip4/0.0.0.0/tcp/4001",),
        "Multiaddrs to listen on for libp2p connections.",
        check=_multiaddrs,
    )
    announce: tuple[str, ...] = setting(
        (),
        "Multiaddrs advertised to other peers instead of the listen addresses (NAT, containers).",
        check=_multiaddrs,
    )
    mdns: bool = setting(False, "Discover peers on the local network with mDNS.")
    kademlia: bool = setting(True, "Discover peers through the Kademlia DHT.")
    dial_timeout_s: float = setting(10.0, "Seconds before an outgoing dial is abandoned.", check=_positive)


@dataclass(frozen=True)
class GossipSection:
    """The gossipsub mesh that carries signed records."""

    heartbeat_interval_s: float = setting(1.0, "Seconds between gossipsub mesh heartbeats.", check=_positive)
    max_message_bytes: int = setting(65536, "Largest gossip message accepted or published.", check=_positive)
    publish_queue: int = setting(
        1024,
        "Outgoing messages buffered before publishing applies backpressure.",
        check=_positive,
    )
    rate_limit_per_s: float = setting(
        25.0,
        "Gossip messages per second accepted and relayed from one publishing peer (bursts of twice that); the"
        " excess is neither delivered nor relayed, and counted; 0 disables. An honest peer sends a few a second.",
        check=_non_negative,
    )
    degree: int = setting(6, "Target number of mesh neighbours per topic (gossipsub D).", check=_positive)
    degree_low: int = setting(
        4,
        "Mesh size below which neighbours are added (gossipsub D_low).",
        check=_positive,
    )
    degree_high: int = setting(
        12,
        "Mesh size above which neighbours are pruned (gossipsub D_high).",
        check=_positive,
    )

    def problem(self) -> tuple[str, str] | None:
        if not self.degree_low <= self.degree <= self.degree_high:
            return "degree", (
                "must lie between degree_low and degree_high "
                f"(got {self.degree_low} <= {self.degree} <= {self.degree_high})"
            )
        return None


@dataclass(frozen=True)
class MembershipSection:
    """Liveness: how often peers announce themselves and when they count as gone."""

    heartbeat_interval_s: float = setting(
        2.0,
        "Seconds between this peer's membership heartbeats.",
        check=_positive,
    )
    dead_after_missed: int = setting(
        3,
        "Missed heartbeats after which a peer counts as dead.",
        check=_positive,
    )


@dataclass(frozen=True)
class StatusSection:
    """The local HTTP status port: JSON, server-sent events, metrics and head downloads."""

    enabled: bool = setting(True, "Serve the HTTP status port.")
    host: str = setting(
        "127.0.0.1",
        "Address the status port binds; a non-loopback address needs allow_remote = true.",
    )
    port: int = setting(8470, "TCP port of the status server; 0 picks a free port.", check=_port)
    token: str = setting(
        "",
        "Bearer token for mutating endpoints; empty disables them. Prefer setting P2P_NODE_STATUS_TOKEN.",
        secret=True,
    )
    allow_remote: bool = setting(False, "Allow binding the status port to a non-loopback address.")

    def problem(self) -> tuple[str, str] | None:
        if not self.allow_remote and not _is_loopback(self.host):
            return "host", (
                f"{describe(self.host)} is not a loopback address; "
                "set status.allow_remote = true to expose the status port"
            )
        return None


def _head_ids(value: tuple[str, ...]) -> str | None:
    return None if all(is_content_id(v) for v in value) else "each must be a head id (b3: and 64 hex digits)"


@dataclass(frozen=True)
class StoreSection:
    """The content store under <data_dir>/store: chunks, manifests and records by content id."""

    check_on_start: Literal["quick", "full"] = setting(
        "quick",
        "Start-up check: quick drops temp files and wrong sizes; full also rehashes every file.",
    )
    gc_interval_s: float = setting(
        60.0, "Seconds between garbage collections of unpinned content.", check=_positive
    )
    gc_keep_recent_s: float = setting(
        300.0, "Unpinned content younger than this survives garbage collection.", check=_non_negative
    )
    keep_update_rounds: int = setting(
        8,
        "Rounds of the canonical chain whose update records and artifacts stay pinned: what a peer that"
        " many rounds behind needs to verify its way to the tip.",
        check=_positive,
    )
    checkpoint_every: int = setting(
        100, "Every this many rounds the canonical head's weights and momentum are pinned as a checkpoint; 0: never.",
        check=_non_negative,
    )
    keep_checkpoints: int = setting(2, "Checkpoints kept; older ones are collected.", check=_non_negative)


@dataclass(frozen=True)
class ExchangeSection:
    """The chunk exchange: how artifacts are announced, served and fetched."""

    announce_interval_s: float = setting(
        5.0, "Seconds between re-announcements of the artifacts this peer holds.", check=_positive
    )
    request_timeout_s: float = setting(
        10.0,
        "Deadline of one chunk request; a provider that misses it is dropped from the fetch.",
        check=_positive,
    )
    streams_per_provider: int = setting(2, "Concurrent requests to one provider during a fetch.", check=_positive)
    batch_bytes: int = setting(
        4 * 1024 * 1024,
        "Most bytes asked for in one chunk request; a request also takes at most an even share of what the fetch"
        " still lacks among its streams.",
        check=_positive,
    )
    max_streams_per_peer: int = setting(
        8, "Concurrent chunk streams served to one peer; more are refused as busy.", check=_positive
    )
    max_bytes_in_flight: int = setting(
        256 * 1024 * 1024, "Bytes of chunks being served at once, over all peers.", check=_positive
    )
    stall_timeout_s: float = setting(
        60.0, "A fetch with no progress for this long fails (and is retried later).", check=_positive
    )
    chunk_bytes: int = setting(
        1024 * 1024, "Size of fixed chunks for artifacts this peer creates.", check=_positive
    )
    fan_out: Literal["adaptive", "wide", "narrow"] = setting(
        "adaptive",
        "How many providers a fetch draws from at once. adaptive: starts on one, stays there while one keeps"
        " this peer busy, else measures one against all of them and keeps whichever delivers more (again"
        " after 10 s, then less often); wide: all; narrow: one at a time.",
    )


@dataclass(frozen=True)
class WorkloadSection:
    """What this swarm trains: a built-in workload or a ``module:attr`` factory, and where."""

    name: str = setting("tiny", "Built-in workload (charlm, tiny) or a package.module:attr factory.")
    options: dict[str, Any] = setting({}, "Table passed to the workload factory ([workload.options]).")
    seed: int = setting(0, "Seed of the initial weights; every peer of a swarm must use the same.", check=_non_negative)
    device: str = setting("cpu", "Torch device for the inner loop: cpu, cuda or cuda:N.")
    local_data: bool = setting(
        True, "Read microshards from the workload's own files; false fetches every microshard from peers."
    )


@dataclass(frozen=True)
class TrainingSection:
    """The inner loop, leases and rounds."""

    role: Literal["trainer", "consumer"] = setting(
        "trainer", "trainer: lease data, train and merge; consumer: follow the canonical head only."
    )
    inner_steps: int = setting(50, "Inner steps (H) each trainer runs per round.", check=_positive)
    inner_budget: Literal["steps", "time"] = setting(
        "steps",
        "steps: every trainer runs H inner steps; time: every trainer trains for the time the swarm's median"
        " peer needs for H steps (a faster peer runs more steps, up to 2H, a slower one fewer), so no peer"
        " idles waiting for the slowest.",
    )
    codec: Literal["fp32", "bf16", "int8"] = setting("int8", "Encoding of the pseudo-gradients a peer publishes.")
    inner_state_every_s: float = setting(
        60.0,
        "Seconds between saves of the inner optimizer state (kept for a restart) after a round; 0 saves"
        " after every round. AdamW's state is twice the model: at a round's end it is written at most this often.",
        check=_non_negative,
    )
    lease_s: float = setting(120.0, "Lifetime of a lease; renewed while training takes longer.", check=_positive)
    lease_settle_s: float = setting(
        0.5, "Seconds to wait for rival claims before training on what a peer won.", check=_non_negative
    )
    round_deadline_s: float = setting(
        0.0, "Seconds a round waits for updates; 0 adapts to observed inner-loop time.", check=_non_negative
    )
    min_round_deadline_s: float = setting(10.0, "Lower bound of the adaptive round deadline.", check=_positive)
    max_round_deadline_s: float = setting(3600.0, "Upper bound of the adaptive round deadline.", check=_positive)
    verify: Literal["verify", "trust"] = setting(
        "verify",
        "verify: recompute heads this peer did not merge before adopting them; trust: only check content ids.",
    )
    trusted_heads: tuple[str, ...] = setting(
        (),
        "Head ids this peer adopts without recomputing them or their ancestors (the operator vouches for them):"
        " how a peer joins a swarm whose early rounds' updates are no longer kept.",
        check=_head_ids,
    )
    head_retention: int = setting(
        200, "Heads kept in the index (their records; weights are kept per [store]).", check=_positive
    )
    head_reannounce_s: float = setting(5.0, "Seconds between re-announcements of the canonical head.", check=_positive)
    evaluate: bool = setting(True, "Compute the validation loss of each adopted head and publish it.")
    publish_variants: tuple[str, ...] = setting(
        (), "Extra encodings of each adopted head this peer stores and announces: bf16, int8.", check=_variants
    )
    export_dir: str = setting(
        "", "Directory where the newest canonical weights are kept as model.safetensors (consumers); empty: off."
    )
    export_variant: Literal["fp32", "bf16", "int8"] = setting("fp32", "Encoding of the exported weights.")


@dataclass(frozen=True)
class DilocoSection:
    """The outer step: how pseudo-gradients are aggregated and applied."""

    rule: Literal["mean", "trimmed_mean", "median", "centered_clip"] = setting(
        "mean",
        "Aggregation: sample-weighted mean, coordinate-wise trimmed mean, coordinate-wise median, or centered"
        " clipping (a mean of the updates' differences from a centre, each clipped to clip_tau).",
    )
    outer_lr: float = setting(0.7, "Outer learning rate (1.0 with momentum 0 is plain averaging).", check=_positive)
    outer_momentum: float = setting(0.9, "Outer momentum.", check=_non_negative)
    nesterov: bool = setting(True, "Use Nesterov momentum in the outer step.")
    trim_fraction: float = setting(0.2, "Fraction trimmed from each end by trimmed_mean.", check=_non_negative)
    outlier_factor: float = setting(
        10.0,
        "Exclude updates whose norm exceeds this many times the round's median (3+ updates) or the median"
        " update norm recorded in the last 8 heads (any number of updates); 0 disables.",
        check=_non_negative,
    )
    clip_tau: float = setting(
        0.0, "L2 radius centered_clip clips each update's difference from the centre to; 0: their median.",
        check=_non_negative,
    )
    clip_iters: int = setting(3, "Iterations of centered_clip, 1 to 32.", check=_clip_iters)
    overlap: bool = setting(
        False,
        "Overlap the outer step with training: once a round closes, train the next round's microshards from the"
        " local weights while the merge runs, then rebase that progress onto the merged head"
        " (local = head + (local - local at publish)). Heads and verification are unchanged.",
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Config:
    """Everything a peer is configured with; each field is one TOML section.

    Adding a section is adding a frozen dataclass of ``setting``s and one field here. A setting
    typed ``dict[str, Any]`` is a free-form table (``[workload.options]``) handed on as a dict.
    """

    node: NodeSection = field(default_factory=NodeSection)
    swarm: SwarmSection = field(default_factory=SwarmSection)
    network: NetworkSection = field(default_factory=NetworkSection)
    gossip: GossipSection = field(default_factory=GossipSection)
    membership: MembershipSection = field(default_factory=MembershipSection)
    status: StatusSection = field(default_factory=StatusSection)
    store: StoreSection = field(default_factory=StoreSection)
    exchange: ExchangeSection = field(default_factory=ExchangeSection)
    workload: WorkloadSection = field(default_factory=WorkloadSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    diloco: DilocoSection = field(default_factory=DilocoSection)


def load_config(
    path: str | None,
    overrides: Mapping[str, str] = types.MappingProxyType({}),
    environ: Mapping[str, str] = os.environ,
) -> Config:
    """Load ``path`` (None: defaults only), then apply environment and ``--set`` overrides."""
    return load_schema(Config, path, overrides, environ)


def config_reference() -> str:
    """A Markdown table of every key with its type, default and help, for the README."""
    return reference_table(Config)


def render_starter_config(config: Config | None = None) -> str:
    """A commented TOML starter file that loads back to ``config`` (default: the defaults)."""
    return render_toml(Config() if config is None else config)
