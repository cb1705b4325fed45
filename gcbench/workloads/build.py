"""Build any workload, built-in or a user's, from its config and a seed: the same weights every time."""

from __future__ import annotations

import torch

from gcbench.workloads.config import WORKLOADS, WorkloadConfig
from gcbench.workloads.tasks import Workload
from gcbench.workloads.user import build_user


def build_workload(
    config: WorkloadConfig, *, seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Workload:
    """Build the workload's modules from ``seed`` (same weights every time) on ``device`` in ``dtype``."""
    if config.user_factory is None and config.name not in WORKLOADS:
        raise ValueError(f"workload: unknown workload {config.name!r}; choose from {', '.join(WORKLOADS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        workload = build_user(config, seed) if config.user_factory else WORKLOADS[config.name](config)
    if torch.device(device) != torch.device("cpu") or dtype != torch.get_default_dtype():
        for module in workload.objective.modules():  # (a no-op move would fail under fake tensors)
            module.to(device=device, dtype=dtype)
    return workload
