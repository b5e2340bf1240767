"""The independent js-libp2p peer (shared/interop/js-libp2p-peer) as a subprocess for interop tests.

The shared folder is read-only, so its sources are copied into ``<repo>/.cache/js-libp2p-peer``
and installed there with ``npm ci``; the install is reused while package.json and
package-lock.json are unchanged.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]
ENV_DIR = "P2P_NODE_JS_PEER_DIR"
CACHE_DIR = REPO / ".cache" / "js-libp2p-peer"
SOURCES = ("package.json", "package-lock.json", "peer.mjs")
STAMP = ".installed-lock-sha256"
NPM_CI_TIMEOUT_S = 600.0

Event = dict[str, Any]


def locate_source() -> Path:
    """The js peer's source folder: $P2P_NODE_JS_PEER_DIR, else ../shared/interop/js-libp2p-peer."""
    configured = os.environ.get(ENV_DIR)
    if configured:
        return Path(configured).expanduser().resolve()
    return (REPO.parent / "shared" / "interop" / "js-libp2p-peer").resolve()


def missing_prerequisite() -> str | None:
    """Why the js peer cannot run here (node, npm or its sources absent), or None when it can."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not on PATH; the js-libp2p interop test needs Node.js 20+ and npm"
    source = locate_source()
    missing = [name for name in SOURCES if not (source / name).is_file()]
    if missing:
        how = f"${ENV_DIR}" if os.environ.get(ENV_DIR) else f"../shared/interop/js-libp2p-peer (or set ${ENV_DIR})"
        return f"js-libp2p peer sources not found at {source} ({', '.join(missing)} missing); looked in {how}"
    return None


def _digest(folder: Path, names: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode() + b"\0" + (folder / name).read_bytes() + b"\0")
    return digest.hexdigest()


def install(source: Path | None = None, cache: Path = CACHE_DIR) -> Path:
    """Copy the peer into ``cache`` and ``npm ci`` it unless an identical install is already there.

    Raises RuntimeError carrying npm's output when the install fails.
    """
    source = source or locate_source()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache.parent / (cache.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one installer at a time (parallel test runs)
        for name in SOURCES:
            data = (source / name).read_bytes()
            target = cache / name
            if not target.is_file() or target.read_bytes() != data:
                target.write_bytes(data)
        wanted = _digest(cache, ("package.json", "package-lock.json"))
        stamp = cache / STAMP
        if stamp.is_file() and stamp.read_text().strip() == wanted and (cache / "node_modules").is_dir():
            return cache
        stamp.unlink(missing_ok=True)
        try:
            done = subprocess.run(
                ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=cache,
                capture_output=True,
                text=True,
                timeout=NPM_CI_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired as exc:
            output = f"{exc.stdout}\n{exc.stderr}"
            raise RuntimeError(f"npm ci in {cache} timed out after {NPM_CI_TIMEOUT_S:.0f} s:\n{output}") from None
        if done.returncode != 0:
            output = f"{done.stdout}\n{done.stderr}"
            raise RuntimeError(f"npm ci in {cache} failed with exit status {done.returncode}:\n{output}")
        stamp.write_text(wanted + "\n")
    return cache


class JsPeer:
    """One ``node peer.mjs`` process; its stdout JSON events are collected by a reader thread."""

    def __init__(self, folder: Path, log_path: Path, args: list[str]) -> None:
        self.folder = folder
        self.log_path = log_path
        self.args = args
        self.events: list[Event] = []
        self.junk: list[str] = []  # stdout lines that were not JSON
        self._cond = threading.Condition()
        self._stderr: IO[bytes] | None = None
        self._reader: threading.Thread | None = None
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self._stderr = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            ["node", "peer.mjs", *self.args],
            cwd=self.folder,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._read, name="js-peer-stdout", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            line = line.strip()
            if not line:
                continue
            with self._cond:
                try:
                    event = json.loads(line)
                except ValueError:
                    self.junk.append(line)
                else:
                    if isinstance(event, dict):
                        self.events.append(event)
                    else:
                        self.junk.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def snapshot(self, event: str | None = None) -> list[Event]:
        with self._cond:
            return [e for e in self.events if event is None or e.get("event") == event]

    def wait_for(self, predicate: Callable[[Event], Any], timeout: float, what: str) -> Event:
        """The first event (seen before or arriving within ``timeout``) for which ``predicate`` holds."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for event in self.events[seen:]:
                    if predicate(event):
                        return event
                seen = len(self.events)
                left = deadline - time.monotonic()
                if left <= 0 or (not self.alive() and self._reader is not None and not self._reader.is_alive()):
                    break
                self._cond.wait(min(left, 0.5))
        raise AssertionError(
            f"timed out after {timeout} s waiting for the js peer: {what}\n"
            f"exit status: {None if self.process is None else self.process.poll()}\n{self.transcript()}"
        )

    def send(self, line: str) -> None:
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(line.rstrip("\n") + "\n")
        self.process.stdin.flush()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask it to /quit, then SIGTERM, then SIGKILL."""
        process = self.process
        if process is None:
            return
        try:
            if process.poll() is None:
                try:
                    self.send("/quit")
                except (BrokenPipeError, OSError, ValueError):
                    pass
                try:
                    process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    process.terminate()
                    try:
                        process.wait(timeout=timeout)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait(timeout=timeout)
        finally:
            if self._reader is not None:
                self._reader.join(timeout=timeout)  # the pipe hits EOF once the process is gone
            for stream in (process.stdin, process.stdout):
                try:
                    if stream is not None:
                        stream.close()
                except (OSError, ValueError):
                    pass
            if self._stderr is not None:
                self._stderr.close()

    def transcript(self, limit: int = 8000) -> str:
        with self._cond:
            lines = [json.dumps(e) for e in self.events] + [f"(non-JSON) {j}" for j in self.junk]
        stderr = self.log_path.read_text(errors="replace")[-limit:] if self.log_path.exists() else ""
        return "----- js stdout events\n" + "\n".join(lines)[-limit:] + "\n----- js stderr\n" + stderr
