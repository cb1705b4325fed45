"""gcbench: gradient caching (GradCache) for contrastive training, and how to measure what it costs.

The layers, lowest first: the technique (``cache``, ``losses``, ``workloads``, ``strategies``,
``training``, ``distributed``), measurement (``measure``), results (``results``), experiments
(``experiment``), the commands' engines (``estimate``, ``verify``, ``sweep``, ``report``) and the
command line (``cli``). A module imports only from its own layer or lower ones (tests/test_layers.py).

``from gcbench import GradCache`` loads the technique alone (torch, no pydantic, pandas or extras); the
other names here load their modules on first use, and with them the optional model kinds and strategies
(:func:`gcbench.peers.register`; the experiment layer registers them too).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from gcbench import _cuda_double
from gcbench.cache import GradCache, Objective
from gcbench.version import __version__

if TYPE_CHECKING:
    from gcbench.strategies import (
        STRATEGIES,
        Strategy,
        StrategyTraits,
        StrategyUse,
        make_strategy,
        resolve_strategy,
    )
    from gcbench.workloads import ImageConfig, ModelConfig, UserWorkload, WorkloadConfig, build_workload

_cuda_double.install_if_asked()  # GCBENCH_CUDA_DOUBLE=1: CUDA's calls rehearsed on the CPU (tests, gpu-check)

_LAZY = {
    **dict.fromkeys(
        ("STRATEGIES", "Strategy", "StrategyTraits", "StrategyUse", "make_strategy", "resolve_strategy"),
        "gcbench.strategies",
    ),
    **dict.fromkeys(
        ("ImageConfig", "ModelConfig", "UserWorkload", "WorkloadConfig", "build_workload"), "gcbench.workloads"
    ),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gcbench' has no attribute {name!r}")
    from gcbench import peers

    peers.register()  # optional model kinds and strategies by name; their extras are imported only when chosen
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "STRATEGIES",
    "GradCache",
    "ImageConfig",
    "ModelConfig",
    "Objective",
    "Strategy",
    "StrategyTraits",
    "StrategyUse",
    "UserWorkload",
    "WorkloadConfig",
    "__version__",
    "build_workload",
    "make_strategy",
    "resolve_strategy",
]
