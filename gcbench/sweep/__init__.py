"""The sweep: an experiment's points, each measured in a process of its own, each record stored as it ends."""

from gcbench.sweep.point import InProcess, OnRanks, PointMeasurer, measurer
from gcbench.sweep.runner import SweepEvents, SweepOutcome, run_point_process, run_sweep

__all__ = [
    "InProcess",
    "OnRanks",
    "PointMeasurer",
    "SweepEvents",
    "SweepOutcome",
    "measurer",
    "run_point_process",
    "run_sweep",
]
