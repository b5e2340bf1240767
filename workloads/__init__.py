"""Workloads: the protocol the node trains through, and the built-in models and datasets."""

from workloads.base import (
    Capability,
    DeviceUnavailable,
    EvalMetrics,
    InnerState,
    ParamSpec,
    TrainMetrics,
    Workload,
    WorkloadError,
)
from workloads.registry import load_workload

__all__ = [
    "Capability",
    "DeviceUnavailable",
    "EvalMetrics",
    "InnerState",
    "ParamSpec",
    "TrainMetrics",
    "Workload",
    "WorkloadError",
    "load_workload",
]
