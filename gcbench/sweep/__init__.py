"""The sweep: experiment config -> points -> one process each -> results records."""

from gcbench.sweep.config import Experiment, SweepConfig, load_experiment
from gcbench.sweep.records import Point, Record
from gcbench.sweep.runner import SweepOutcome, run_sweep
from gcbench.sweep.store import ResultsStore

__all__ = ["Experiment", "Point", "Record", "ResultsStore", "SweepConfig", "SweepOutcome", "load_experiment",
           "run_sweep"]
