"""Built-in workloads (dpr, clip, simclr), the configs that describe them and the models they are made of."""

from gcbench.workloads.config import FEATURE_KIND, TEXT_TOWERS, WORKLOADS, ModelConfig, TextTower, WorkloadConfig
from gcbench.workloads.models import MLPEncoder, TransformerEncoder
from gcbench.workloads.tasks import Workload, build_workload

__all__ = [
    "FEATURE_KIND",
    "TEXT_TOWERS",
    "WORKLOADS",
    "MLPEncoder",
    "ModelConfig",
    "TextTower",
    "TransformerEncoder",
    "Workload",
    "WorkloadConfig",
    "build_workload",
]
