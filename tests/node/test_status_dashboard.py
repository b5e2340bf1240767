"""The dashboard: its files ship with the package, /chain feeds its plot, and headless Chromium renders it."""

from __future__ import annotations

import functools
import re
import shutil
import struct
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest

from node.dashboard import CONTENT_TYPES, static_files
from tests.swarm_harness import REPO, Swarm, shared_swarm, training_swarm

ARTIFACTS = REPO / "test-artifacts"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


# ---------------------------------------------------------------- the files


def test_static_files_are_local_only() -> None:
    files = static_files()
    assert {"index.html", "dashboard.js", "dashboard.css"} <= set(files)
    for name, entry in files.items():
        text = entry.read_text()
        # Nothing from a CDN or any other host: the status port must work on an offline machine.
        assert not re.search(r"(?i)(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text.replace("http://www.w3.org/2000/svg", "")), name
    page = files["index.html"].read_text()
    referenced = re.findall(r'(?:src|href)="(/static/[^"]+)"', page)
    assert sorted(referenced) == ["/static/dashboard.css", "/static/dashboard.js"]


# ---------------------------------------------------------------- on a training daemon


SHARED_SWARMS = ("operator-surfaces",)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    swarm = shared_swarm("operator-surfaces", lambda: training_swarm(tmp_path_factory.mktemp("ops"), 2, 4))
    yield swarm  # stopped by tests/node/conftest.py once no following module shares it


def fetch(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@pytest.mark.slow
def test_dashboard_files_are_served_with_their_types(swarm: Swarm) -> None:
    url = swarm.peers[0].url
    for path, name in (("/", "index.html"), *((f"/static/{n}", n) for n in ("dashboard.js", "dashboard.css"))):
        status, headers, body = fetch(url + path)
        assert status == 200 and headers["Content-Type"] == CONTENT_TYPES[name[name.rfind("."):]], path
        assert body == static_files()[name].read_bytes()
        assert headers["Content-Security-Policy"].startswith("default-src 'self'")
    for path in ("/static/missing.js", "/static/..%2Fdashboard.py", "/static/__init__.py"):
        status, headers, body = fetch(url + path)
        assert status == 404 and headers["Content-Type"] == "application/json", path


@pytest.mark.slow
def test_chain_is_the_canonical_chain_oldest_first(swarm: Swarm) -> None:
    peer = swarm.peers[0]
    answer = peer.get("/chain?limit=10000")
    chain = answer["chain"]
    assert chain[-1]["id"] == answer["canonical"] and chain[-1]["canonical"]
    assert chain[0]["parent"] is None and chain[0]["round"] == 0
    assert all(child["parent"] == parent["id"] for parent, child in zip(chain, chain[1:]))
    assert [h["round"] for h in chain] == list(range(len(chain)))
    assert sum(isinstance(h["val_loss"], float) for h in chain) >= 4
    short = peer.get("/chain?limit=2")["chain"]
    assert len(short) == 2 and short[-1]["round"] >= chain[-1]["round"]
    for bad in ("0", "10001", "x"):
        status, _, body = fetch(f"{peer.url}/chain?limit={bad}")
        assert status == 400 and b'"error"' in body
    # /heads keeps its shape for the CLI.
    heads = peer.get("/heads")
    assert set(heads) == {"canonical", "heads"} and heads["heads"][0]["round"] >= chain[-1]["round"]


# ---------------------------------------------------------------- in a browser


@functools.cache
def browser() -> str | None:
    """A headless Chromium that starts here, or None."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path is None:
            continue
        try:
            run = subprocess.run([path, "--version"], capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if run.returncode == 0:
            return path
    return None


@pytest.fixture
def chromium() -> str:
    path = browser()
    if path is None:
        pytest.skip(f"no headless Chromium ({', '.join(BROWSERS)}) found or launchable; run .ci/setup-browser")
    return path


def headless(chromium: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=6000", *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


class Page(HTMLParser):
    """What the test looks at in the dumped DOM: the plot, its points and the table rows."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))

    def find(self, tag: str, **wanted: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.elements if t == tag and all(a.get(k) == v for k, v in wanted.items())]


@pytest.mark.slow
def test_dashboard_renders_in_headless_chromium(chromium: str, swarm: Swarm, tmp_path: Path) -> None:
    # ``chromium`` comes first so that a machine without a browser skips before starting a swarm.
    peer = swarm.peers[0]
    evaluated = sum(isinstance(h["val_loss"], float) for h in peer.get("/chain?limit=10000")["chain"])

    dumped = headless(chromium, tmp_path, "--dump-dom", peer.url + "/")
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    page = Page()
    page.feed(dumped.stdout)
    [line] = page.find("path", id="loss-line")
    points = int(line["data-points"] or 0)
    assert points >= evaluated >= 4
    assert len(re.findall(r"[ML][0-9.]+,[0-9.]+", line["d"] or "")) == points
    assert len(page.find("circle", **{"class": "point"})) == points
    rows = {a["data-peer"] for a in page.find("tr") if a.get("data-peer")}
    assert rows == {p.peer_id for p in swarm.peers}
    assert page.find("tr", **{"data-peer": peer.peer_id, "class": "self"})
    assert page.find("p", id="error", hidden="")  # the page reached every endpoint it reads
    assert len([a for a in page.find("tr") if a.get("data-head")]) >= 4
    assert re.search(r'id="head-round">\d+<', dumped.stdout)

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    shot.unlink(missing_ok=True)
    taken = headless(chromium, tmp_path, f"--screenshot={shot}", "--window-size=1200,900", peer.url + "/")
    assert taken.returncode == 0 and shot.exists(), taken.stderr[-2000:]
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (1200, 900)
    assert len(png) > 20_000  # a blank page compresses to a few kB; the plot and tables do not
