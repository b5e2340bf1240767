"""``p2p-node fetch``: stream a head's weights from a running peer to a file, with a progress bar."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

BLOCK = 1 << 20


class DownloadError(RuntimeError):
    """The download failed; the message says why in one line."""


def _progress(done: int, total: int, started: float, out: IO[str]) -> None:
    elapsed = max(time.monotonic() - started, 1e-6)
    rate = done / elapsed / 1e6
    if total:
        width = 30
        filled = int(width * done / total)
        bar = "#" * filled + "-" * (width - filled)
        out.write(f"\r[{bar}] {done / 1e6:8.1f}/{total / 1e6:.1f} MB {rate:6.1f} MB/s")
    else:
        out.write(f"\r{done / 1e6:8.1f} MB {rate:6.1f} MB/s")
    out.flush()


def resolve_head(url: str, head: str) -> str:
    """``canonical`` (or ``latest``) names the peer's canonical head; anything else is taken as an id."""
    if head not in ("canonical", "latest"):
        return head
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/heads", timeout=10) as response:
            return str(json.load(response)["canonical"])
    except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
        raise DownloadError(f"cannot ask {url} for its canonical head: {exc}") from None


def partial_path(output: Path) -> Path:
    """Where a download to ``output`` is written until it is complete (then renamed to ``output``)."""
    return output.with_name(f".{output.name}.part")


def download_head(url: str, head: str, output: Path, out: IO[str] = sys.stderr) -> Path:
    """Download ``head``'s weights to ``output`` atomically; the file is standard safetensors."""
    head_id = resolve_head(url, head)
    source = f"{url.rstrip('/')}/heads/{head_id}/weights"
    temp = partial_path(output)
    started = time.monotonic()
    try:
        with urllib.request.urlopen(source, timeout=60) as response, open(temp, "wb") as sink:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            while block := response.read(BLOCK):
                sink.write(block)
                done += len(block)
                _progress(done, total, started, out)
            sink.flush()
            os.fsync(sink.fileno())
    except urllib.error.HTTPError as exc:
        temp.unlink(missing_ok=True)
        try:
            reason = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            reason = exc.reason
        raise DownloadError(f"{source}: {exc.code} {reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        temp.unlink(missing_ok=True)
        raise DownloadError(f"{source}: {getattr(exc, 'reason', exc)}") from None
    out.write("\n")
    if total and done != total:
        temp.unlink(missing_ok=True)
        raise DownloadError(f"{source}: got {done} of {total} bytes")
    os.replace(temp, output)
    return output
