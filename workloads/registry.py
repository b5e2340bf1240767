"""Turns a config's workload spec (a built-in name or ``package.module:attr``) into a Workload."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from workloads.base import REQUIRED_MEMBERS, Workload, WorkloadError

BUILTINS = {
    "charlm": "workloads.charlm:create",
    "tiny": "workloads.tiny:create",
}


def load_workload(spec: str, options: Mapping[str, Any] | None = None) -> Workload:
    """Load and configure a workload; every failure is one WorkloadError naming the spec.

    ``spec`` is a built-in name (``charlm``, ``tiny``) or ``package.module:attr``
    naming a factory, which is called with the options table as keyword
    arguments and must return an object with every member of the Workload
    protocol.
    """
    try:
        return _load(spec, dict(options or {}))
    except WorkloadError as exc:
        raise WorkloadError(_one_line(f"workload {spec!r}: {exc}")) from None


def _load(spec: str, options: dict[str, Any]) -> Workload:
    if not all(isinstance(key, str) for key in options):
        raise WorkloadError("option keys must be strings")
    target = BUILTINS.get(spec, spec)
    module_name, colon, attr_path = target.partition(":")
    if not colon or not module_name or not attr_path:
        raise WorkloadError(f"not a built-in ({', '.join(BUILTINS)}) nor of the form 'package.module:attr'")
    try:
        factory: Any = importlib.import_module(module_name)
    except Exception as exc:  # the module's own top-level code may raise anything
        raise WorkloadError(f"cannot import module {module_name!r}: {type(exc).__name__}: {exc}") from None
    for attr in attr_path.split("."):
        if not hasattr(factory, attr):
            raise WorkloadError(f"{module_name!r} has no attribute {attr_path!r}")
        factory = getattr(factory, attr)
    if not callable(factory):
        raise WorkloadError(f"{target!r} is {type(factory).__name__}, not a callable factory")
    try:
        workload = factory(**options)
    except WorkloadError:
        raise
    except Exception as exc:
        raise WorkloadError(f"factory raised {type(exc).__name__}: {exc}") from None
    missing = [member for member in REQUIRED_MEMBERS if not hasattr(workload, member)]
    if missing:
        raise WorkloadError(f"factory returned {type(workload).__name__}, missing {', '.join(missing)}")
    if not isinstance(workload.name, str) or not workload.name:
        raise WorkloadError("workload 'name' must be a non-empty string")
    return workload  # type: ignore[no-any-return]


def _one_line(message: str) -> str:
    line = " ".join(message.split())
    return line if len(line) <= 400 else line[:397] + "..."
