"""The status port answers only requests that name it: a DNS-rebinding page gets a 421."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import pytest

from node.config import Config
from node.daemon import Node
from node.http import allowed_host_names, host_name
from node.status_api import StatusApi

HEAD = "b3:" + "ab" * 32


async def _get(port: int, path: str, host: str | None) -> tuple[int, dict[str, str]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"GET {path} HTTP/1.1", "Connection: close"] + ([f"Host: {host}"] if host is not None else [])
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body) if body.startswith(b"{") else {}


def _answers(tmp_path: Path, bind: str, requests: list[tuple[str, str | None]]) -> list[tuple[int, dict[str, str]]]:
    config = Config()
    api = StatusApi(Node(dataclasses.replace(config, node=dataclasses.replace(config.node, data_dir=str(tmp_path)))))

    async def main() -> list[tuple[int, dict[str, str]]]:
        await api.start(bind, 0)
        try:
            port = api._server.port
            return [await _get(port, path, host.format(port=port) if host else host) for path, host in requests]
        finally:
            await api.close()

    return asyncio.run(main())


def test_a_loopback_port_refuses_other_host_names_on_every_route(tmp_path: Path) -> None:
    evil = "rebind.attacker.example:{port}"
    answers = _answers(tmp_path, "127.0.0.1", [
        ("/healthz", evil), (f"/heads/{HEAD}/weights", evil), ("/status", "attacker.example"),
        ("/healthz", "127.0.0.1:{port}"), ("/healthz", "localhost:{port}"), ("/healthz", "LOCALHOST.:{port}"),
        ("/healthz", "[::1]:{port}"), ("/healthz", "localhost:9999"), ("/healthz", None),
    ])
    for status, body in answers[:3]:
        assert status == 421 and "is not this status port" in body["error"] and "localhost" in body["error"], body
    # Past the Host check: /healthz answers 503 here because libp2p is not running.
    assert [status for status, _ in answers[3:]] == [503] * 6


def test_a_wildcard_bind_accepts_any_host_name(tmp_path: Path) -> None:
    answers = _answers(tmp_path, "0.0.0.0", [("/healthz", "node7.lan:{port}"), ("/healthz", "127.0.0.1:{port}")])
    assert [status for status, _ in answers] == [503, 503]


@pytest.mark.parametrize(("bound", "names"), [
    ("127.0.0.1", {"127.0.0.1", "localhost", "::1"}),
    ("::1", {"127.0.0.1", "localhost", "::1"}),
    ("localhost", {"127.0.0.1", "localhost", "::1"}),
    ("192.168.1.20", {"192.168.1.20"}),
    ("node7.lan", {"node7.lan"}),
    ("0.0.0.0", None),
    ("::", None),
])
def test_allowed_host_names(bound: str, names: set[str] | None) -> None:
    assert allowed_host_names(bound) == (frozenset(names) if names is not None else None)


def test_host_name_drops_the_port_and_brackets() -> None:
    assert host_name("Example.COM:8470") == "example.com"
    assert host_name("[::1]:8470") == "::1"
    assert host_name("localhost.") == "localhost"
