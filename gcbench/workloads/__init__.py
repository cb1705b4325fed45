"""Built-in workloads (dpr, clip, simclr) and the models and losses they are made of."""

from gcbench.workloads.losses import InBatchSoftmax, NTXent, SymmetricInfoNCE
from gcbench.workloads.models import MLPEncoder, ModelConfig, TransformerEncoder
from gcbench.workloads.tasks import TEXT_TOWERS, WORKLOADS, TextTower, Workload, WorkloadConfig, build_workload

__all__ = ["InBatchSoftmax", "MLPEncoder", "ModelConfig", "NTXent", "SymmetricInfoNCE", "TEXT_TOWERS", "TextTower",
           "TransformerEncoder", "WORKLOADS", "Workload", "WorkloadConfig", "build_workload"]
