"""gcbench: gradient caching (GradCache) for contrastive training, and how to measure what it costs.

The layers, lowest first: the technique (``cache``, ``losses``, ``workloads``, ``strategies``,
``training``, ``distributed``), measurement (``measure``), results (``results``), experiments
(``experiment``), the commands' engines (``estimate``, ``verify``, ``sweep``, ``report``) and the
command line (``cli``). A module imports only from its own layer or lower ones (tests/test_layers.py).
"""

from gcbench import _cuda_double, peers
from gcbench.cache import GradCache, Objective
from gcbench.strategies import STRATEGIES, Strategy, StrategyTraits, StrategyUse, make_strategy, resolve_strategy
from gcbench.version import __version__
from gcbench.workloads import ImageConfig, ModelConfig, UserWorkload, WorkloadConfig, build_workload

_cuda_double.install_if_asked()  # GCBENCH_CUDA_DOUBLE=1: CUDA's calls rehearsed on the CPU (tests, gpu-check)
peers.register()  # optional model kinds and strategies by name; their extras are imported only when chosen

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
