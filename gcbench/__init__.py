"""gcbench: gradient caching (GradCache) for contrastive training, and how to measure what it costs."""

from gcbench.cache import GradCache
from gcbench.strategies import STRATEGIES, Objective, Strategy, make_strategy
from gcbench.workloads import ModelConfig, WorkloadConfig, build_workload
from gcbench import peers

peers.register()  # optional model kinds and strategies by name; their extras are imported only when chosen

__version__ = "0.1.0"

__all__ = ["GradCache", "ModelConfig", "Objective", "STRATEGIES", "Strategy", "WorkloadConfig", "__version__",
           "build_workload", "make_strategy"]
