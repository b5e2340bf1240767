"""Loading workloads by built-in name or ``module:attr``, and the one-line errors when that fails."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from workloads.base import REQUIRED_MEMBERS
from workloads.charlm import CharLM
from workloads.registry import load_workload
from workloads.base import WorkloadError
from workloads.tiny import Tiny

PLUGIN = '''
from workloads.tiny import Tiny, TinyConfig


def make(hidden=8, **rest):
    workload = Tiny(TinyConfig(hidden=hidden, **rest))
    workload.name = "plugin-tiny"
    return workload


class Factories:
    @staticmethod
    def nested():
        return make()


def broken(**options):
    raise RuntimeError("no GPU budget\\nsecond line")


def half(**options):
    return object()


not_callable = 42
'''


@pytest.fixture
def plugin_module(tmp_path: Path) -> Iterator[str]:
    name = "p2p_test_plugin_workload"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(PLUGIN))
    sys.path.insert(0, str(tmp_path))
    try:
        yield name
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)


def test_builtins_load_with_options() -> None:
    tiny = load_workload("tiny", {"hidden": 8})
    assert isinstance(tiny, Tiny) and tiny.model_schema()[0].shape == (8, 16)
    charlm = load_workload("charlm")
    assert isinstance(charlm, CharLM) and charlm.name == "charlm"
    assert all(hasattr(charlm, member) for member in REQUIRED_MEMBERS)


def test_module_attr_factory_loads_and_trains(plugin_module: str) -> None:
    workload = load_workload(f"{plugin_module}:make", {"hidden": 4, "microshards": 3})
    assert workload.name == "plugin-tiny"
    assert len(workload.dataset().microshards) == 3
    model = workload.init_model(0)
    metrics = workload.train(model, workload.new_inner_state(model), [workload.microshard_bytes(0)], 5)
    assert metrics.steps == 5
    assert load_workload(f"{plugin_module}:Factories.nested").name == "plugin-tiny"


@pytest.mark.parametrize(
    ("spec", "options", "message"),
    [
        ("gpt5", {}, "not a built-in"),
        ("no_such_package.module:make", {}, "cannot import module 'no_such_package.module': ModuleNotFoundError"),
        ("{plugin}:missing", {}, "has no attribute 'missing'"),
        ("{plugin}:not_callable", {}, "is int, not a callable factory"),
        ("{plugin}:broken", {}, "factory raised RuntimeError: no GPU budget second line"),
        ("{plugin}:half", {}, "missing name, supported_settings, model_schema"),
        ("{plugin}:make", {"hiden": 3}, "factory raised TypeError"),
        ("tiny", {"hiden": 3}, "unknown option 'hiden'"),
        ("tiny", {"hidden": "big"}, "option 'hidden' must be int"),
        ("tiny", {"freeze": "hidden"}, "option 'freeze' must be"),
        ("charlm", {"lr": -1.0}, "'lr' must be > 0"),
        ("tiny:", {}, "not a built-in"),
    ],
)
def test_failures_are_one_line_workload_errors(
    plugin_module: str, spec: str, options: dict[str, object], message: str
) -> None:
    spec = spec.format(plugin=plugin_module)
    with pytest.raises(WorkloadError) as info:
        load_workload(spec, options)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"workload {spec!r}: ")
    assert message in text
