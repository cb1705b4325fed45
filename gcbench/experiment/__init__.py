"""Experiments: the schema of their keys, loading them from TOML, and the grid of points they expand to."""

from gcbench import peers
from gcbench.experiment.experiment import Experiment, build_experiment, find_experiment, load_experiment, shipped
from gcbench.experiment.schema import SweepConfig, key_table, keys

peers.register()  # optional model kinds and strategies by name, before any experiment names one

__all__ = [
    "Experiment",
    "SweepConfig",
    "build_experiment",
    "find_experiment",
    "key_table",
    "keys",
    "load_experiment",
    "shipped",
]
