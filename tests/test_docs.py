"""The README documents what the code does: its config reference is generated and in sync."""

from pathlib import Path

from node.config import config_reference
from node.docs import README, render

REPO = Path(__file__).resolve().parents[1]


def test_readme_config_reference_is_current():
    text = README.read_text()
    assert render(text) == text, "README config reference is stale: run `python -m node.docs`"
    assert config_reference().strip() in text


def test_readme_names_the_two_commands_and_ci_runs_the_test_command():
    text = README.read_text()
    assert "p2p-node swarm --peers 3" in text
    test_command = ".venv/bin/pip install -q -c constraints-cpu.txt -e '.[test]' && .venv/bin/python -m pytest -q"
    assert test_command in text
    assert test_command in (REPO / ".ci" / "run").read_text()
