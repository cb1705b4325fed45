"""Workloads (dpr, clip, siglip, simclr, or a user's by import path), their configs and the models they are made of."""

from gcbench.workloads.build import build_workload
from gcbench.workloads.config import (
    FEATURE_KIND,
    IMAGE_TEXT,
    IMAGE_TOWERS,
    TEXT_TOWERS,
    WORKLOADS,
    ImageConfig,
    ImageTower,
    ModelConfig,
    TextTower,
    WorkloadConfig,
)
from gcbench.workloads.models import MLPEncoder, TransformerEncoder
from gcbench.workloads.tasks import Workload
from gcbench.workloads.user import UserWorkload, check_user_workload

__all__ = [
    "FEATURE_KIND",
    "IMAGE_TEXT",
    "IMAGE_TOWERS",
    "TEXT_TOWERS",
    "WORKLOADS",
    "ImageConfig",
    "ImageTower",
    "MLPEncoder",
    "ModelConfig",
    "TextTower",
    "TransformerEncoder",
    "UserWorkload",
    "Workload",
    "WorkloadConfig",
    "build_workload",
    "check_user_workload",
]
