"""A hostile-peer harness: three honest daemons, one hostile daemon playing one mode per phase, and what the honest ones show.

Phases follow each other on one chain; each is judged on the heads built while it ran.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.swarm_harness import ONE_THREAD, REPO, Peer, Swarm, training, wait_until
from workloads.tiny import TinyConfig

HONEST_PEERS = 3
# fp32, so that NaN and x100 pseudo-gradients reach the wire as they were made.
HOSTILE_TRAINING = 'codec = "fp32"'
WARM_UP_ROUND = 2  # the swarm trains this far before the first phase
PHASE_ROUNDS = 5  # rounds each phase runs
PHASE_TIMEOUT_S = 45.0
SETTLE_AFTER_S = 30.0  # for the honest peers' chains to hold one head at the agreed round after a phase
EXAMPLES_PER_MICROSHARD = TinyConfig().examples_per_microshard
# A phase's validation loss may exceed the clean phase's by this much (absolute, relative):
# runs with a fourth trainer or another round layout differ by a few hundredths on tiny.
LOSS_MARGIN = (0.1, 0.25)
TRAINING = """
[workload]
name = "tiny"

[training]
inner_steps = 10
head_reannounce_s = 1.0
{training}

[diloco]
outer_lr = 0.7
outer_momentum = 0.5
"""


class Daemon(Peer):
    """A daemon started in its own process group, so that it and anything it spawns stop together."""

    argv: list[str] | None = None

    def start(self, extra_env: dict[str, str] | None = None) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD, **(extra_env or {})}
        env.pop("P2P_NODE_CONFIG", None)
        argv = self.argv or [sys.executable, "-m", "node.cli", "start", "--config", str(self.config_path)]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                            start_new_session=True)

    def stop(self) -> None:
        """SIGKILL the daemon's process group (a no-op once it has exited)."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGCONT)
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def rss_bytes(self) -> int:
        """Resident memory of the daemon process (0 once it has exited)."""
        assert self.process is not None
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def store_bytes(self) -> int:
        """Disk the daemon's content store takes, in allocated blocks (what fills a disk)."""
        total = 0
        for path in (self.data_dir / "store").rglob("*"):
            with contextlib.suppress(OSError):
                total += path.lstat().st_blocks * 512
        return total

    def log_since(self, offset: int) -> str:
        return self.log()[offset:]


@dataclass
class HeadView:
    id: str
    parent: str | None
    round: int
    epoch: int
    samples: int
    updates: tuple[str, ...]
    excluded: tuple[tuple[str, str], ...]
    microshards: tuple[str, ...]
    rollback: str | None
    own_loss: float | None


@dataclass
class PhaseResult:
    """What the honest peers showed at the end of a phase."""

    mode: str
    base: str  # the agreed head the phase started from
    start_losses: dict[str, float | None]
    seconds: float
    crashed: list[str]
    silent: list[str]
    chains: dict[str, list[HeadView]]  # honest peer name -> canonical chain, genesis first
    losses: dict[str, float | None]  # honest peer name -> its own val loss of its canonical head
    rss_growth: dict[str, int]
    store_growth: dict[str, int]
    adopted: dict[str, set[str]]  # honest peer name -> every head it adopted during the phase
    report: list[dict[str, Any]] = field(default_factory=list)  # what the hostile peer says it did
    hostile_log: str = ""

    def after_base(self, peer: str) -> list[HeadView]:
        """The heads of ``peer``'s canonical chain built in this phase."""
        chain = self.chains[peer]
        ids = [h.id for h in chain]
        return chain[ids.index(self.base) + 1:] if self.base in ids else []

    def reported(self, kind: str) -> list[dict[str, Any]]:
        return [row for row in self.report if row["kind"] == kind]

    def worst_loss(self) -> float:
        values = [v for v in self.losses.values()]
        if any(v is None or not math.isfinite(v) for v in values):
            return math.inf
        return max(v for v in values if v is not None)


def head_view(peer: Peer, head_id: str) -> HeadView | None:
    body = peer.get(f"/heads/{head_id}")
    if body is None:
        return None
    record = body["record"]
    own = body.get("eval", {}).get(peer.peer_id)
    return HeadView(
        id=head_id, parent=record["parent"], round=record["round"], epoch=record["epoch"],
        samples=record["samples"], updates=tuple(record["updates"]),
        excluded=tuple(tuple(x) for x in record["excluded"]), microshards=tuple(record["microshards"]),
        rollback=record.get("rollback"), own_loss=own,
    )


def canonical_chain(peer: Peer) -> list[HeadView]:
    """``peer``'s canonical chain, genesis first, read through /chain and /heads/{id}."""
    body = peer.get("/chain?limit=10000", timeout=10) or {"chain": []}
    views = [head_view(peer, row["id"]) for row in body["chain"]]
    return [v for v in views if v is not None]


def double_counted(chain: list[HeadView], among: set[str] | None = None) -> dict[int, list[str]]:
    """Microshards that more than one head of ``chain`` counts within one epoch, by epoch; with
    ``among``, only those counted again by one of those heads."""
    seen: dict[int, set[str]] = {}
    doubles: dict[int, list[str]] = {}
    for head in chain:
        if head.parent is None:
            continue
        done = seen.setdefault(head.epoch, set())
        again = sorted(set(head.microshards) & done)
        if among is not None and head.id not in among:
            pass
        elif again or len(set(head.microshards)) != len(head.microshards):
            doubles.setdefault(head.epoch, []).extend(again or ["(listed twice in one head)"])
        done.update(head.microshards)
    return doubles


def adopted_heads(log: str) -> set[str]:
    found = set()
    for line in log.splitlines():
        if '"head_adopted"' in line:
            with contextlib.suppress(ValueError, KeyError):
                found.add(json.loads(line)["head"])
    return found


class AdversarialSwarm:
    """Honest daemons (three unless told) and one hostile daemon whose mode changes from phase to phase."""

    def __init__(self, root: Path, honest: int = HONEST_PEERS) -> None:
        self.root = root
        self.honest_count = honest
        self.swarm = Swarm(root, swarm="adversarial")
        self.honest: list[Daemon] = []
        self.hostile: Daemon | None = None
        self.mode_file = root / "hostile.mode"
        self.report_file = root / "hostile.report.jsonl"

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        for _ in range(self.honest_count):
            self.honest.append(self._add(Daemon))
        hostile = self.hostile = self._add(Daemon, HOSTILE_TRAINING)
        self.mode_file.write_text("honest")
        hostile.argv = [sys.executable, "-m", "tests.adversary.hostile_daemon", "--mode-file", str(self.mode_file),
                        "--config", str(hostile.config_path), "--report", str(self.report_file)]
        for peer in self.swarm.peers:
            peer.start()
        try:
            for peer in self.swarm.peers:
                peer.wait_healthy(90)
        except AssertionError:
            print(self.logs())
            raise
        wait_until(lambda: self.agreed(WARM_UP_ROUND), 90, interval=0.1, what=f"agreement at round {WARM_UP_ROUND}")

    def _add(self, kind: type[Daemon], training: str = "") -> Daemon:
        peer = self.swarm.add(TRAINING.format(training=training))
        self.swarm.peers.remove(peer)
        daemon = kind(peer.name, peer.data_dir, peer.config_path, peer.p2p_port, peer.status_port,
                      peer.peer_id, token=peer.token)
        self.swarm.peers.append(daemon)
        return daemon

    def close(self) -> None:
        """Stop every daemon this swarm started, and delete their data; with ``P2P_TEST_KEEP_LOGS``
        set to a directory, the daemons' logs are copied there first, to read after a failed run."""
        for peer in self.swarm.peers:
            if isinstance(peer, Daemon):
                peer.stop()
        if keep := os.environ.get("P2P_TEST_KEEP_LOGS"):
            for peer in self.swarm.peers:
                if peer.log_path.exists():
                    Path(keep).mkdir(parents=True, exist_ok=True)
                    shutil.copy(peer.log_path, Path(keep) / f"{self.root.name}-{peer.name}.log")
        shutil.rmtree(self.root, ignore_errors=True)

    # ---- views -----------------------------------------------------------------------

    def agreed(self, min_round: int) -> str | None:
        rows = [training(p) for p in self.honest]
        heads = {row.get("head") for row in rows}
        if len(heads) == 1 and all(row.get("head_round", -1) >= min_round for row in rows):
            return heads.pop()
        return None

    def _round_of(self, head_id: str) -> int | None:
        view = head_view(self.honest[0], head_id)
        return None if view is None else view.round

    def _settled_chains(self, judged: str | None) -> dict[str, list[HeadView]]:
        """The live honest peers' canonical chains, read again (for up to ``SETTLE_AFTER_S``) until they
        hold one head at the round of the ``judged`` head.

        The agreed head is the newest, and a heavier sibling of it may still be on its way to some
        peers, each side building on its own until it has verified the other's. Agreement on one head
        at one moment does not settle that (it holds at once, before the sibling arrives), and the
        chains are read one peer after another: so the very chains the phase is judged on are read
        until they agree, or the time is up and the assertion shows how they part.
        """
        round_ = self._round_of(judged) if judged is not None else None
        deadline = time.monotonic() + SETTLE_AFTER_S
        while True:
            chains = {p.name: canonical_chain(p) for p in self.honest if p.alive}
            at_round = {next((h.id for h in chain if h.round == round_), None) for chain in chains.values()}
            if round_ is None or (len(at_round) == 1 and None not in at_round) or time.monotonic() > deadline:
                return chains
            time.sleep(0.5)

    def min_head_round(self) -> int:
        return min(training(p).get("head_round", -1) for p in self.honest)

    def describe(self) -> str:
        rows = []
        for peer in self.swarm.peers:
            row = training(peer)
            rows.append(f"{peer.name} alive={peer.process is not None and peer.process.poll() is None} "
                        f"round={row.get('head_round')} head={(row.get('head') or '')[-8:]} phase={row.get('phase')}")
        return "; ".join(rows)

    def lagging_logs(self, lines: int = 40) -> str:
        """The last log lines of each honest peer not on the head most of them hold."""
        heads = [training(p).get("head") for p in self.honest]
        common = max(set(heads), key=heads.count)
        return "\n".join(f"===== {p.name} (last {lines} log lines)\n" + "\n".join(p.log().splitlines()[-lines:])
                         for p, head in zip(self.honest, heads) if head != common)

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"===== {p.name}\n{p.log()[-tail:]}" for p in self.swarm.peers)

    # ---- phases ----------------------------------------------------------------------

    def hostile_report(self, since: float = 0.0) -> list[dict[str, Any]]:
        """What the hostile peer says it did (its report file), from time ``since`` on."""
        if not self.report_file.exists():
            return []
        rows = [json.loads(line) for line in self.report_file.read_text().splitlines() if line.strip()]
        return [row for row in rows if row["at"] >= since]

    def revive(self) -> None:
        """Restart, on its data dir, any daemon an earlier phase left dead, so one crash fails one test."""
        dead = [p for p in self.swarm.peers if isinstance(p, Daemon) and not p.alive]
        for peer in dead:
            peer.start()
        for peer in dead:
            peer.wait_healthy(90)

    @contextlib.contextmanager
    def phase(self, mode: str, rounds: int = PHASE_ROUNDS, hostile_mode: str | None = None,
              timeout_s: float = PHASE_TIMEOUT_S) -> Iterator[PhaseRun]:
        """Switch the hostile peer to ``hostile_mode`` (default ``mode``; "clean" and "honest": it trains
        honestly) and run ``rounds`` rounds from the agreed head while the block runs; ``PhaseRun.result``
        then holds what the honest peers showed."""
        self.revive()
        try:
            start_head = wait_until(lambda: self.agreed(0), 30, interval=0.1, what="agreement before the phase")
        except AssertionError:  # an earlier phase left them apart: this phase still runs, from peer 1's head
            start_head = training(self.honest[0]).get("head") or ""
        start_round = self.min_head_round()
        start_losses = {p.name: self._own_loss(p) for p in self.honest}
        started = time.monotonic()
        since = time.time()
        offsets = {p.name: len(p.log()) for p in self.honest}
        rss = {p.name: p.rss_bytes() for p in self.honest}
        store = {p.name: p.store_bytes() for p in self.honest}
        run = PhaseRun(self, mode, rounds)
        hostile_offset = len(self.hostile.log()) if self.hostile is not None else 0
        self.mode_file.write_text(hostile_mode or ("honest" if mode == "clean" else mode))
        try:
            yield run
            try:
                run.agreed = wait_until(lambda: self.agreed(start_round + rounds) or self._any_crashed(), timeout_s,
                           interval=0.2, what=f"{mode}: honest peers agree {rounds} rounds on")
            except AssertionError as exc:
                run.timed_out = f"{exc}; {self.describe()}\n{self.lagging_logs()}"
            # Each peer's own loss of its head: an evaluation is published shortly after adoption.
            judged = run.agreed if isinstance(run.agreed, str) else None
            with contextlib.suppress(AssertionError):
                wait_until(lambda: all(self._judged_loss(p, judged) is not None for p in self.honest if p.alive), 10,
                           what="own evaluations")
            run.result = PhaseResult(
                mode=mode, base=start_head, start_losses=start_losses, seconds=time.monotonic() - started,
                crashed=[p.name for p in self.honest if not p.alive],
                silent=[p.name for p in self.honest if p.alive and p.get("/status", timeout=10) is None],
                chains=self._settled_chains(judged),
                losses={p.name: self._judged_loss(p, judged) for p in self.honest if p.alive},
                rss_growth={p.name: p.rss_bytes() - rss[p.name] for p in self.honest if p.alive},
                store_growth={p.name: p.store_bytes() - store[p.name] for p in self.honest if p.alive},
                adopted={p.name: adopted_heads(p.log_since(offsets[p.name])) for p in self.honest},
                report=self.hostile_report(since),
                hostile_log=self.hostile.log_since(hostile_offset)[-4000:] if self.hostile is not None else "",
            )
        finally:
            self.mode_file.write_text("honest")
            print(f"phase {mode}: {time.monotonic() - started:.1f} s; {self.describe()}")

    def _any_crashed(self) -> bool:
        return any(not p.alive for p in self.honest)

    def _judged_loss(self, peer: Daemon, judged: str | None) -> float | None:
        """``peer``'s own loss of the agreed head, or of the head it holds now where it moved on to a
        heavier sibling before evaluating the agreed one (a peer evaluates only its canonical head)."""
        loss = self._own_loss(peer, judged)
        return loss if loss is not None or judged is None else self._own_loss(peer)

    def _own_loss(self, peer: Daemon, head: str | None = None) -> float | None:
        """``peer``'s own validation loss of ``head`` (default: its canonical head): the swarm moves on
        every second or two, so a phase is judged on the head all peers agreed on."""
        head = head or training(peer).get("head")
        view = head_view(peer, head) if head else None
        return None if view is None else view.own_loss


@dataclass
class PhaseRun:
    swarm: AdversarialSwarm
    mode: str
    rounds: int
    agreed: str | bool | None = None  # the head all honest peers held at once, rounds on
    timed_out: str | None = None
    result: PhaseResult | None = None


# ---------------------------------------------------------------- what every phase must show


def assert_survived(result: PhaseResult, run: PhaseRun) -> None:
    """No honest daemon died or stopped answering, and the honest peers kept making progress."""
    assert not result.crashed, f"{result.mode}: honest daemons died: {result.crashed}"
    assert not result.silent, f"{result.mode}: honest daemons stopped answering /status: {result.silent}"
    assert run.timed_out is None, run.timed_out


def assert_loss_near(result: PhaseResult, clean: PhaseResult) -> None:
    """The phase ends near the clean phase's loss, or near its own start where an earlier phase left it
    worse: each mode answers for the rounds it ran, not for the phase before it."""
    absolute, relative = LOSS_MARGIN
    started = [v for v in result.start_losses.values() if v is not None and math.isfinite(v)]
    reference = max([clean.worst_loss(), *started])
    bound = reference * (1 + relative) + absolute
    assert result.worst_loss() <= bound, (
        f"{result.mode}: honest val loss {result.losses} above {bound:.3f} (clean run: {clean.losses})")


def assert_exactly_once(result: PhaseResult) -> None:
    for peer, chain in result.chains.items():
        built = {h.id for h in result.after_base(peer)}
        doubles = double_counted(chain, built)
        assert not doubles, f"{result.mode}: {peer}'s canonical chain counts microshards twice: {doubles}"


def assert_agreed(result: PhaseResult, run: PhaseRun) -> None:
    """All honest peers held one head at once, and their canonical chains still agree at its round:
    on it, or all on the heavier sibling that replaced it for every peer alike a moment later."""
    assert isinstance(run.agreed, str), f"{result.mode}: the honest peers never held one head at once"
    agreed = next((h for chain in result.chains.values() for h in chain if h.id == run.agreed), None)
    if agreed is None:
        agreed = head_view(run.swarm.honest[0], run.agreed)
    assert agreed is not None, f"{result.mode}: no honest peer knows the agreed head {run.agreed} any more"
    at_round = {peer: next((h.id for h in chain if h.round == agreed.round), None) for peer, chain in result.chains.items()}
    assert len(set(at_round.values())) == 1 and None not in at_round.values(), (
        f"{result.mode}: the honest peers' chains part at round {agreed.round} (agreed {run.agreed}): {at_round}")
