"""The OpenAPI description matches the route table, and a running daemon answers as it describes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node.config import Config
from node.daemon import Node
from node.openapi import describe
from node.status_api import StatusApi
from tests.swarm_harness import REPO, Swarm, shared_swarm, training_swarm

METHODS = {"get", "post", "put", "patch", "delete"}
# Routes whose answer is not JSON, or never ends, are checked for status and type only.
NOT_JSON = {"/events", "/metrics", "/", "/static/{name}", "/heads/{id}/weights"}


def routes_of(api: StatusApi) -> set[tuple[str, str]]:
    return {(route.method.lower(), route.pattern) for route in api.app.routes}


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            assert method in METHODS, f"{path}: {method} is not an operation"
            yield method, path, operation


# ---------------------------------------------------------------- the description itself


def test_every_route_is_described_and_nothing_else() -> None:
    api = StatusApi(Node(Config()))
    document = describe(api.app)
    described = {(method, path) for method, path, _ in operations(document)}
    assert described == routes_of(api)
    by_key = {(r.method.lower(), r.pattern): r for r in api.app.routes}
    for method, path, operation in operations(document):
        route = by_key[(method, path)]
        params = {(p["in"], p["name"]) for p in operation.get("parameters", [])}
        assert params == {("path", n) for n in route.path_params} | {("query", p.name) for p in route.params}
        assert ("security" in operation) == route.mutating, path
        if route.mutating:
            assert operation["security"] == [{"bearer": []}] and {"401", "403"} <= set(operation["responses"])
        responses = operation["responses"]
        assert any(code.startswith("2") for code in responses), f"{method} {path} has no success answer"
        assert responses["default"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    assert len({op["operationId"] for _, _, op in operations(document)}) == len(described)


def test_the_document_is_valid_openapi_3_1() -> None:
    validator = pytest.importorskip("openapi_spec_validator", reason="openapi-spec-validator is not installed")
    document = describe(StatusApi(Node(Config())).app)
    assert document["openapi"] == "3.1.0"
    validator.validate(document)


# ---------------------------------------------------------------- a running daemon against it


SHARED_SWARMS = ("operator-surfaces",)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    swarm = shared_swarm("operator-surfaces", lambda: training_swarm(tmp_path_factory.mktemp("ops"), 2, 4))
    yield swarm  # stopped by tests/node/conftest.py once no following module shares it


def call(url: str, method: str = "GET") -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            # An event stream never ends; its head is all there is to check.
            body = b"" if response.headers["Content-Type"] == "text/event-stream" else response.read()
            return response.status, response.headers["Content-Type"], body
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


class Conformance:
    """Checks answers against the operation that describes them."""

    def __init__(self, document: dict[str, Any]) -> None:
        jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed")
        self.document = document
        self.validator = jsonschema.Draft202012Validator
        self.checked = 0

    def check(self, method: str, path: str, url: str, status: int, content_type: str, body: bytes) -> None:
        where = f"{method.upper()} {url} -> {status}"
        assert status < 500, f"{where}: {body[:300]!r}"
        responses = self.document["paths"][path][method]["responses"]
        answer = responses.get(str(status), responses["default"])
        media = content_type.split(";")[0]
        assert media in answer["content"], f"{where}: {content_type} is not described ({list(answer['content'])})"
        if media != "application/json":
            return
        value = json.loads(body)
        if status >= 400:
            assert set(value) == {"error"} and isinstance(value["error"], str), where
        schema = {**answer["content"][media]["schema"], "components": self.document["components"]}
        errors = sorted(self.validator(schema).iter_errors(value), key=lambda e: list(e.absolute_path))
        assert not errors, f"{where}: {errors[0].message} at {list(errors[0].absolute_path)}"
        self.checked += 1


def valid_values(swarm: Swarm) -> dict[str, str]:
    peer = swarm.peers[0]
    canonical = peer.get("/heads")["canonical"]
    return {"id": canonical, "head": canonical, "peer": swarm.peers[1].peer_id, "name": "dashboard.js"}


BAD_PATH_VALUES = ("nope", "b3:" + "0" * 64, "b3:" + "Z" * 64, "%ff%fe", "x" * 3000, "..%2F..%2Fetc")
BAD_QUERY_VALUES = {"integer": ("abc", "1.5", "-1", "99999999999999999999", ""), "number": ("nan", "x", "inf"),
                    "boolean": ("maybe", "2"), "string": ("\u00ff" * 3, "x" * 2000)}


@pytest.mark.slow
def test_the_daemon_answers_as_described(swarm: Swarm) -> None:
    peer = swarm.peers[0]
    status, content_type, body = call(peer.url + "/openapi.json")
    assert status == 200 and content_type == "application/json"
    document = json.loads(body)
    conformance = Conformance(document)
    values = valid_values(swarm)
    for method, path, operation in operations(document):
        if method != "get":
            continue
        parameters = operation.get("parameters", [])
        filled = re.sub(r"\{(\w+)\}", lambda m: urllib.parse.quote(values.get(m.group(1), "x"), safe=":"), path)
        query = "?replay=0" if path == "/events" else ""
        conformance.check(method, path, peer.url + filled + query, *call(peer.url + filled + query))
        for param in parameters:
            if param["in"] == "path":
                for bad in BAD_PATH_VALUES:
                    url = peer.url + path.replace("{" + param["name"] + "}", bad)
                    url = re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), "x"), url)
                    conformance.check(method, path, url, *call(url))
            else:
                for bad in BAD_QUERY_VALUES[param["schema"]["type"]]:
                    url = f"{peer.url}{filled}?{urllib.parse.urlencode({param['name']: bad})}"
                    got = call(url)
                    conformance.check(method, path, url, *got)
                    if param["schema"]["type"] in ("integer", "number", "boolean") and path not in NOT_JSON:
                        assert got[0] == 400 or bad == "-1", f"{url} -> {got[0]}"
    assert conformance.checked >= 20

    # Unknown paths, wrong methods and unauthenticated writes are JSON errors too.
    for method, path, expected in (("GET", "/nowhere", 404), ("DELETE", "/status", 405), ("POST", "/fetches", 403)):
        status, content_type, body = call(peer.url + path, method)
        assert (status, content_type) == (expected, "application/json") and set(json.loads(body)) == {"error"}


# ---------------------------------------------------------------- who can reach the status port


def test_a_remote_status_host_needs_allow_remote(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n\n[status]\nhost = "0.0.0.0"\n')
    run = subprocess.run(
        [sys.executable, "-m", "node.cli", "start", "--config", str(config)],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert run.returncode == 2
    assert 'status.host: "0.0.0.0" is not a loopback address; set status.allow_remote = true' in run.stderr
    assert not (tmp_path / "data").exists()  # refused before the node touched anything


@pytest.mark.slow
def test_allow_remote_binds_every_address_and_warns(swarm: Swarm) -> None:
    remote = swarm.peers[0]  # the shared swarm's first peer binds 0.0.0.0 with allow_remote = true
    warnings = [json.loads(line) for line in remote.log().splitlines() if '"status_port_remote"' in line]
    assert len(warnings) == 1 and warnings[0]["level"] == "warning"
    assert warnings[0]["url"].startswith("http://0.0.0.0:") and warnings[0]["mutating"] == "off"
    local = swarm.peers[1]
    assert '"status_port_remote"' not in local.log()
