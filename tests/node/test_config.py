"""Loading the node's configuration: defaults, shipped files, overrides and one-line errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from node.config import (
    Config,
    ConfigError,
    config_reference,
    load_config,
    parse_set_options,
    render_starter_config,
)
from node.config_schema import load_schema, render_toml, setting

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SHIPPED = sorted(CONFIGS.rglob("*.toml"))
PEER_ID = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return str(path)


def _error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, text), environ={})
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_defaults_load_without_a_file() -> None:
    config = load_config(None, environ={})
    assert config == Config()
    assert config.status.host == "127.0.0.1" and config.status.port == 8470
    assert config.network.listen == ("/ip4/0.0.0.0/tcp/4001",)
    assert config.swarm.name == "default"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_loads(path: Path) -> None:
    load_config(str(path), environ={})


def test_local_swarm_configs_do_not_collide_and_bootstrap_from_peer_one(tmp_path: Path) -> None:
    from node.keys import load_or_create_key
    from node.local_swarm import write_peer_configs

    paths = write_peer_configs(3, tmp_path, base_port=4101, status_port=8471)
    peers = [load_config(str(path), environ={}) for path in paths]
    first = load_or_create_key(tmp_path / "peer1").peer_id
    assert [p.network.listen for p in peers] == [(f"/ip4/127.0.0.1/tcp/410{n}",) for n in (1, 2, 3)]
    assert [p.status.port for p in peers] == [8471, 8472, 8473]
    assert len({p.node.data_dir for p in peers}) == 3
    assert peers[0].swarm.bootstrap == ()
    assert peers[1].swarm.bootstrap == peers[2].swarm.bootstrap == (f"/ip4/127.0.0.1/tcp/4101/p2p/{first}",)


def test_a_bootstrap_address_without_a_peer_id_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, '[swarm]\nbootstrap = ["/ip4/127.0.0.1/tcp/4101"]\n')
    with pytest.raises(ConfigError) as error:
        load_config(path, environ={})
    assert "swarm.bootstrap" in str(error.value) and "/p2p/" in str(error.value)


def test_a_file_sets_what_it_names_and_leaves_the_rest(tmp_path: Path) -> None:
    path = _write(tmp_path, f'[status]\nport = 9001\n[swarm]\nmembers = ["{PEER_ID}"]\n[gossip]\ndegree = 8\n')
    config = load_config(path, environ={})
    assert (config.status.port, config.swarm.members, config.gossip.degree) == (9001, (PEER_ID,), 8)
    assert config.status.host == "127.0.0.1"
    assert config.gossip.heartbeat_interval_s == 1.0


def test_ints_are_accepted_where_floats_are_expected(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, "[network]\ndial_timeout_s = 3\n"), environ={})
    assert config.network.dial_timeout_s == 3.0 and isinstance(config.network.dial_timeout_s, float)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[swarm]\nbootstraps = []\n", "swarm.bootstraps: unknown key (did you mean swarm.bootstrap?)"),
        ("[stauts]\nport = 1\n", "config error: stauts: unknown section (did you mean status?)"),
        ('[status]\nport = "abc"\n', 'config error: status.port: expected an integer, got "abc"'),
        ("[network]\nmdns = 1\n", "config error: network.mdns: expected a boolean (true or false), got 1"),
        ("[status]\nport = true\n", "config error: status.port: expected an integer, got true"),
        ('[swarm]\nbootstrap = ["/ip4/1.2.3.4/tcp/1", 3]\n', "swarm.bootstrap[1]: expected a string, got 3"),
        ('[swarm]\nbootstrap = "/ip4/1.2.3.4/tcp/1"\n', "expected an array of strings"),
        ("[status]\nport = 70000\n", "config error: status.port: must be a port number from 0 to 65535"),
        ("[membership]\nheartbeat_interval_s = 0\n", "membership.heartbeat_interval_s: must be greater"),
        ("[network]\ndial_timeout_s = inf\n", "config error: network.dial_timeout_s: expected a finite number"),
        ('[node]\nlog_level = "verbose"\n', 'config error: node.log_level: expected one of "debug", "info"'),
        ('[swarm]\nmembers = ["alice"]\n', 'swarm.members: "alice" is not an ed25519 libp2p peer id'),
        ('[swarm]\nname = "a b"\n', "config error: swarm.name: must be 1-64 characters"),
        ('[swarm]\nbootstrap = ["127.0.0.1:4001"]\n', 'swarm.bootstrap: "127.0.0.1:4001" is not a multiaddr'),
        ("[gossip]\ndegree = 20\n", "gossip.degree: must lie between degree_low and degree_high"),
        ('[status]\nhost = "0.0.0.0"\n', 'status.host: "0.0.0.0" is not a loopback address; set'),
        ("status = 3\n", "config error: status: expected a table, got 3"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    message = _error(tmp_path, text)
    assert message.startswith("config error: ") and expected in message


def test_remote_status_host_is_allowed_when_asked_for(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, '[status]\nhost = "0.0.0.0"\nallow_remote = true\n'), environ={})
    assert config.status.host == "0.0.0.0"


def test_unreadable_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(str(missing), environ={})
    assert str(caught.value) == f"config error: {missing}: cannot read file (No such file or directory)"


def test_toml_syntax_error_gives_the_line(tmp_path: Path) -> None:
    message = _error(tmp_path, "[status]\nport = 1\nhost = \n")
    assert message.startswith(f"config error: {tmp_path / 'node.toml'}: invalid TOML: ")
    assert "line 3" in message


def test_environment_and_set_override_with_cli_winning(tmp_path: Path) -> None:
    path = _write(tmp_path, "[status]\nport = 9001\n[network]\nmdns = false\n")
    environ = {
        "P2P_NODE_STATUS_PORT": "9002",
        "P2P_NODE_NETWORK_MDNS": "true",
        "P2P_NODE_SWARM_BOOTSTRAP": f"/ip4/10.0.0.1/tcp/4001/p2p/{PEER_ID}, /dns4/boot/tcp/4001/p2p/{PEER_ID}",
        "P2P_NODE_STATUS_TOKEN": "from-env",
        "HOME": "/root",  # unrelated variables are ignored
        "P2P_NODE_CONFIG": "/etc/p2p-node.toml",  # read by the CLI, not a key
    }
    config = load_config(path, environ=environ)
    assert config.status.port == 9002
    assert config.network.mdns is True
    assert config.swarm.bootstrap == (f"/ip4/10.0.0.1/tcp/4001/p2p/{PEER_ID}", f"/dns4/boot/tcp/4001/p2p/{PEER_ID}")
    assert config.status.token == "from-env"
    # The token never reaches logs or a printed config.
    assert "from-env" not in repr(config) and "from-env" not in render_starter_config(config)

    overrides = parse_set_options(["status.port=9003", "node.name=alpha", "swarm.bootstrap="])
    config = load_config(path, overrides, environ=environ)
    assert (config.status.port, config.node.name, config.swarm.bootstrap) == (9003, "alpha", ())
    assert config.network.mdns is True


@pytest.mark.parametrize(
    ("environ", "overrides", "expected"),
    [
        (
            {"P2P_NODE_STATUS_PROT": "1"},
            {},
            "P2P_NODE_STATUS_PROT: unknown environment variable (did you mean P2P_NODE_STATUS_PORT?)",
        ),
        (
            {"P2P_NODE_STATUS_PORT": "abc"},
            {},
            'status.port: expected an integer, got "abc" (from P2P_NODE_STATUS_PORT)',
        ),
        ({"P2P_NODE_NETWORK_MDNS": "maybe"}, {}, "network.mdns: expected a boolean"),
        ({}, {"status.prot": "1"}, "status.prot: unknown key (did you mean status.port?)"),
        ({}, {"status.port": "-1"}, "status.port: must be a port number from 0 to 65535 (from --set)"),
        ({}, {"status.port.x": "1"}, "status.port.x: unknown key (status.port is not a table)"),
    ],
)
def test_bad_overrides_name_the_variable_or_key(
    environ: dict[str, str], overrides: dict[str, str], expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides, environ=environ)
    assert str(caught.value).startswith("config error: " + expected)


def test_set_option_without_equals_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"--set status.port: expected section.key=value"):
        parse_set_options(["status.port"])


def test_starter_config_loads_back_to_the_defaults(tmp_path: Path) -> None:
    text = render_starter_config()
    assert "# TCP port of the status server; 0 picks a free port." in text
    assert load_config(_write(tmp_path, text), environ={}) == Config()


def test_starter_config_round_trips_a_customised_config(tmp_path: Path) -> None:
    config = load_config(
        None,
        {"node.name": 'quote " and \\ backslash', "swarm.members": PEER_ID, "gossip.rate_limit_per_s": "2.5"},
        environ={},
    )
    assert load_config(_write(tmp_path, render_starter_config(config)), environ={}) == config


def test_reference_lists_every_key_once() -> None:
    reference = config_reference()
    defaults = Config()
    for section in dataclasses.fields(defaults):
        for key in dataclasses.fields(getattr(defaults, section.name)):
            assert reference.count(f"| `{section.name}.{key.name}` |") == 1
    row = "| `status.port` | integer | `8470` | TCP port of the status server; 0 picks a free port. |"
    assert row in reference


@dataclasses.dataclass(frozen=True)
class WorkloadSection:
    """The shape a [workload] section with a free-form options table takes."""

    name: str = setting("tiny", "Which workload to train.")
    options: dict[str, Any] = setting({}, "Handed to the workload's factory as a dict.")


@dataclasses.dataclass(frozen=True)
class WorkloadConfig:
    workload: WorkloadSection = dataclasses.field(default_factory=WorkloadSection)


def test_free_form_tables_take_any_toml_and_set_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path, '[workload]\nname = "charlm"\n[workload.options]\nlr = 0.1\nlayers = [2, 3]\n')
    config = load_schema(WorkloadConfig, path, environ={})
    assert config.workload.options == {"lr": 0.1, "layers": [2, 3]}

    overrides = {"workload.options.lr": "0.5", "workload.options.data.path": "/srv/corpus.txt"}
    config = load_schema(WorkloadConfig, path, overrides, environ={})
    assert config.workload.options == {"lr": 0.5, "layers": [2, 3], "data": {"path": "/srv/corpus.txt"}}
    assert load_schema(WorkloadConfig, _write(tmp_path, render_toml(config)), environ={}) == config
    assert load_schema(WorkloadConfig, None, environ={}).workload.options == {}

    with pytest.raises(ConfigError, match=r"workload\.options: is a table; set one entry"):
        load_schema(WorkloadConfig, None, {"workload.options": "1"}, environ={})
    with pytest.raises(ConfigError, match="P2P_NODE_WORKLOAD_OPTIONS: unknown environment variable"):
        load_schema(WorkloadConfig, None, environ={"P2P_NODE_WORKLOAD_OPTIONS": "x"})
    with pytest.raises(ConfigError, match=r"workload\.options: expected a table, got 3"):
        load_schema(WorkloadConfig, _write(tmp_path, "[workload]\noptions = 3\n"), environ={})


def test_the_swarm_report_names_the_round_of_the_head_whose_loss_it_shows() -> None:
    from node.local_swarm import _peer_line

    status = {"peer_id": "12D3KooWxyzabcdefgh", "peers": {"live": 2},
              "training": {"round": 3, "head_round": 2, "val_loss": 2.5}}
    assert _peer_line(2, status) == "  peer2 abcdefgh, live peers 2, round 3, val loss 2.5000 (head of round 2)"
    # A consumer before its first head, and a peer that reports no training at all.
    status["training"] = {"round": 0, "head_round": 0, "val_loss": None}
    assert _peer_line(1, status) == "  peer1 abcdefgh, live peers 2, round 0"
    assert _peer_line(1, {"peer_id": "p", "peers": {}}) == "  peer1 p, live peers 0"
