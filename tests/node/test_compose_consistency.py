"""docker-compose.yml, its configs, the Dockerfile and scripts/netns_swarm.py agree with each other.

No Docker is needed: the compose file is read with the netns script's reader for plain YAML (the
project does not depend on PyYAML), which is cross-checked against an independent line scan of
the file and, where PyYAML happens to be installed, against ``yaml.safe_load``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest

from node.config import Config, load_config
from node.keys import read_key
from tests.swarm_harness import netns_script

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
EXPECTED_SERVICES = ["bootstrap", "trainer1", "trainer2", "trainer3", "consumer"]
DNS_ADDR = re.compile(r"^/dns4/(?P<host>[a-z0-9-]+)/tcp/(?P<port>\d+)(?:/p2p/(?P<peer>\w+))?$")


netns_swarm = netns_script()


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    return {s.name: s for s in netns_swarm.compose_services(COMPOSE)}


@pytest.fixture(scope="module")
def configs(services: dict[str, Any]) -> dict[str, Config]:
    """Each service's config as its container loads it: the file plus the service's environment."""
    return {name: load_config(str(s.config_file), environ=s.environment) for name, s in services.items()}


def _container_file(service: Any, container_path: str) -> Path:
    host = service.host_path(container_path)
    assert host is not None, f"{service.name}: {container_path} is not under a bind mount"
    return host


def _peer_id(service: Any, config: Config) -> str:
    assert config.node.key_file, f"{service.name} has no fixed identity (node.key_file)"
    return read_key(_container_file(service, config.node.key_file)).peer_id


# ---------------------------------------------------------------- the compose file itself


def test_services_and_their_config_files(services: dict[str, Any]) -> None:
    assert list(services) == EXPECTED_SERVICES
    for service in services.values():
        assert service.config_file.is_file(), service.config_file
        assert service.config_file.parent == REPO / "configs" / "compose"


def test_reader_agrees_with_an_independent_line_scan() -> None:
    text = COMPOSE.read_text()
    section = text.split("\nservices:\n", 1)[1].split("\nvolumes:\n", 1)[0]
    names = re.findall(r"^  ([a-z0-9-]+):\s*$", section, flags=re.M)
    config_paths = re.findall(r'"--config", "([^"]+)"', section)
    services = netns_swarm.compose_services(COMPOSE)
    assert [s.name for s in services] == names
    assert [s.config_target for s in services] == config_paths


def test_reader_agrees_with_pyyaml_when_installed() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not a dependency; this cross-check runs where it exists")
    text = COMPOSE.read_text()
    assert netns_swarm.parse_yaml_subset(text) == yaml.safe_load(text)


def test_every_service_runs_the_one_image(services: dict[str, Any]) -> None:
    data = netns_swarm.load_compose(COMPOSE)
    for name, spec in data["services"].items():
        assert spec["image"] == "p2p-node:local", name
        assert spec["build"]["context"] == ".", name
        assert set(spec["build"]["args"]) == {"TORCH_SPEC", "TORCH_INDEX_URL"}, name


def test_configs_load_with_their_environment(services: dict[str, Any], configs: dict[str, Config]) -> None:
    for name, config in configs.items():
        assert config.swarm.name == "compose", name
        # Environment overrides really apply (names come from P2P_NODE_NODE_NAME for trainers).
        assert (config.node.name or name) == name, name
        for key in services[name].environment:
            assert key.startswith("P2P_NODE_"), key
    assert {c.swarm.name for c in configs.values()} == {"compose"}


def test_bootstrap_addresses_name_services_and_their_peer_ids(
    services: dict[str, Any], configs: dict[str, Config]
) -> None:
    dialled = set()
    for name, config in configs.items():
        if name != "bootstrap":
            assert config.swarm.bootstrap, f"{name} has no bootstrap address"
            assert "bootstrap" in services[name].depends_on, name
        for address in config.swarm.bootstrap:
            match = DNS_ADDR.match(address)
            assert match and match["peer"], f"{name}: {address} is not /dns4/<service>/tcp/<port>/p2p/<id>"
            target = match["host"]
            assert target in services and target != name, f"{name}: {address} names no other service"
            listen_ports = {a.rsplit("/tcp/", 1)[1].split("/")[0] for a in configs[target].network.listen}
            assert match["port"] in listen_ports, f"{name}: {target} does not listen on {match['port']}"
            assert match["peer"] == _peer_id(services[target], configs[target]), f"{name}: wrong peer id"
            dialled.add(target)
    assert dialled == {"bootstrap"}


def test_the_demo_key_is_the_bootstrap_services_alone(services: dict[str, Any], configs: dict[str, Config]) -> None:
    key_file = _container_file(services["bootstrap"], configs["bootstrap"].node.key_file)
    assert key_file == REPO / "configs" / "compose" / "bootstrap.key"
    assert read_key(key_file).peer_id.startswith("12D3KooW")
    for name, config in configs.items():
        if name != "bootstrap":
            assert not config.node.key_file, f"{name} must create its own identity in its volume"
    assert "PUBLIC DEMO KEY" in COMPOSE.read_text()
    assert "PUBLIC DEMO KEY" in (REPO / "configs" / "compose" / "bootstrap.toml").read_text()


def test_announced_addresses_are_the_services_own(configs: dict[str, Config]) -> None:
    for name, config in configs.items():
        for address in config.network.announce:
            match = DNS_ADDR.match(address)
            assert match and match["host"] == name, f"{name} announces {address}"


def test_status_ports_published_on_host_loopback_only(services: dict[str, Any], configs: dict[str, Config]) -> None:
    host_ports = []
    for name, service in services.items():
        config = configs[name]
        assert config.status.enabled and config.status.allow_remote and config.status.host == "0.0.0.0", name
        assert len(service.ports) == 1, f"{name} publishes exactly its status port"
        host_ip, host_port, container_port = service.ports[0]
        assert host_ip == "127.0.0.1", f"{name} publishes its status port beyond the host's loopback"
        assert container_port == config.status.port, name
        host_ports.append(host_port)
    assert len(host_ports) == len(set(host_ports))
    assert sorted(host_ports) == list(range(8471, 8471 + len(services)))


def test_every_service_has_its_own_volume_for_its_data_dir(
    services: dict[str, Any], configs: dict[str, Config]
) -> None:
    data = netns_swarm.load_compose(COMPOSE)
    seen = []
    for name, service in services.items():
        named = [m for m in service.mounts if not m.bind]
        assert len(named) == 1, name
        assert named[0].target == configs[name].node.data_dir == "/data", name
        assert not named[0].read_only
        seen.append(named[0].source)
        for mount in service.mounts:
            if mount.bind:
                assert mount.read_only, f"{name}: bind mount {mount.target} should be read-only"
    assert len(seen) == len(set(seen))
    assert set(seen) == set(data["volumes"])


# ---------------------------------------------------------------- the netns script


def test_netns_script_runs_the_same_services_and_configs(
    services: dict[str, Any], configs: dict[str, Config], tmp_path: Path
) -> None:
    plans = netns_swarm.plan_swarm(list(services.values()), "test", tmp_path)
    assert [p.service.name for p in plans] == EXPECTED_SERVICES
    addresses = {p.service.name: p.address for p in plans}
    assert len(set(addresses.values())) == len(plans)
    for plan in plans:
        name = plan.service.name
        argv = plan.argv
        assert argv[1:4] == ["-m", "node.cli", "start"]
        assert argv[argv.index("--config") + 1] == str(services[name].config_file)
        for key, value in services[name].environment.items():
            assert plan.env[key] == value
        assert not {k for k in plan.env if k.startswith("P2P_NODE_")} - set(services[name].environment)
        overrides = dict(arg.split("=", 1) for arg in argv[argv.index("--set") + 1 :: 2])
        ran = load_config(str(services[name].config_file), overrides, environ=plan.env)
        container = configs[name]
        # Only what a container sees differently is translated; everything else is identical.
        assert ran.status == container.status and ran.swarm.name == container.swarm.name
        assert ran.node.name == container.node.name and ran.network.listen == container.network.listen
        assert Path(ran.node.data_dir).is_relative_to(tmp_path / name)
        if container.node.key_file:
            assert ran.node.key_file == str(_container_file(services[name], container.node.key_file))
        for before, after in zip(container.swarm.bootstrap + container.network.announce,
                                 ran.swarm.bootstrap + ran.network.announce, strict=True):
            match = DNS_ADDR.match(before)
            assert match is not None
            assert after == before.replace(f"/dns4/{match['host']}/", f"/ip4/{addresses[match['host']]}/")


def test_netns_addresses_stay_in_the_private_test_subnet(services: dict[str, Any]) -> None:
    import ipaddress

    addresses = netns_swarm.service_addresses(list(services.values()))
    net = ipaddress.ip_network(netns_swarm.DEFAULT_SUBNET)
    assert net.is_private
    assert all(ipaddress.ip_address(a) in net for a in addresses.values())
    with pytest.raises(ValueError):
        netns_swarm.service_addresses(list(services.values()), "8.8.8.0/24")


@pytest.mark.parametrize(
    "text",
    [
        "a: &x 1\nb: *x\n",
        "a: |\n  multi\n  line\n",
        "a: !tag x\n",
        "a:\n  - b: 1\n",
        "a: 1\na: 2\n",
        "a: [1, [2]]\n",
        "---\na: 1\n",
        "a:\n\t- x\n",
    ],
)
def test_reader_refuses_what_it_does_not_understand(text: str) -> None:
    with pytest.raises(netns_swarm.ComposeError):
        netns_swarm.parse_yaml_subset(text)


def test_reader_handles_the_plain_subset() -> None:
    text = (
        "# comment\n"
        "top:\n"
        "  s: plain value  # trailing comment\n"
        "  q: \"has # hash\"\n"
        "  sq: 'it''s'\n"
        "  n: 8470\n"
        "  flow: [\"start\", '--config', /x/y.toml]\n"
        "  empty:\n"
        "  seq:\n"
        "  - \"127.0.0.1:8471:8470\"\n"
        "  - a:b:ro\n"
        "other: {}\n"
    )
    assert netns_swarm.parse_yaml_subset(text) == {
        "top": {
            "s": "plain value",
            "q": "has # hash",
            "sq": "it's",
            "n": 8470,
            "flow": ["start", "--config", "/x/y.toml"],
            "empty": None,
            "seq": ["127.0.0.1:8471:8470", "a:b:ro"],
        },
        "other": {},
    }


def test_script_rejects_environment_it_cannot_reproduce(tmp_path: Path) -> None:
    compose = tmp_path / "docker-compose.yml"
    (tmp_path / "c.toml").write_text("")
    compose.write_text(
        "services:\n  a:\n    command: [\"start\", \"--config\", \"/etc/c/c.toml\"]\n"
        "    volumes:\n      - \"./:/etc/c:ro\"\n    environment:\n      P2P_NODE_NODE_NAME: \"${NAME}\"\n"
    )
    with pytest.raises(netns_swarm.ComposeError, match="interpolation"):
        netns_swarm.compose_services(compose)


# ---------------------------------------------------------------- Dockerfile and .dockerignore


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_matches_the_compose_setup(configs: dict[str, Config]) -> None:
    instructions = _dockerfile_instructions()
    text = DOCKERFILE.read_text()
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    assert all(rest.split()[0] in ("${PYTHON_IMAGE}",) for word, rest in instructions if word == "FROM")
    assert "-c constraints-cpu.txt" in text and "download.pytorch.org/whl/cpu" in text
    assert "torch==" in (REPO / "constraints-cpu.txt").read_text()
    exposed = {rest for word, rest in instructions if word == "EXPOSE"}
    assert exposed == {"4001/tcp 8470/tcp"}
    for name, config in configs.items():
        assert config.network.listen == ("/ip4/0.0.0.0/tcp/4001",), name
        assert config.status.port == 8470, name
    users = [rest for word, rest in instructions if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert ("VOLUME", '["/data"]') in instructions
    assert ("ENTRYPOINT", '["p2p-node"]') in instructions
    cmd = ast.literal_eval(next(rest for word, rest in instructions if word == "CMD"))
    assert cmd[:2] == ["start", "--config"]
    # The default config is a file of this repository copied to the CMD's path, and it loads.
    copies = [rest.split() for word, rest in instructions if word == "COPY" and not rest.startswith("--from")]
    sources = {dest: src for *srcs, dest in copies for src in srcs}
    assert cmd[2] in sources, "the CMD's config is not copied into the image"
    default = load_config(str(REPO / sources[cmd[2]]), environ={})
    assert default.node.data_dir == "/data" and default.status.allow_remote and default.status.port == 8470


def test_dockerfile_healthcheck_is_valid_python_against_healthz() -> None:
    healthcheck = next(rest for word, rest in _dockerfile_instructions() if word == "HEALTHCHECK")
    exec_form = ast.literal_eval(healthcheck[healthcheck.index("CMD") + 3 :].strip())
    assert exec_form[:2] == ["python", "-c"]
    compile(exec_form[2], "<healthcheck>", "exec")
    assert "/healthz" in exec_form[2] and "urllib" in exec_form[2]


def test_dockerignore_keeps_data_keys_and_caches_out() -> None:
    patterns = {
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for needed in (".*", "**/*.key", "data/", "swarm-data/", "**/__pycache__", ".venv/", "venv/", "tests/"):
        assert needed in patterns, needed
    # What the image needs is not excluded.
    for kept in ("node", "protocol", "workloads", "pyproject.toml", "constraints-cpu.txt", "configs"):
        assert kept not in patterns and f"{kept}/" not in patterns
