"""Peak memory for devices and batch sizes you do not have, predicted without allocating."""

from gcbench.errors import EstimateError
from gcbench.estimate.estimator import Estimator
from gcbench.estimate.target import TARGETS
from gcbench.results.records import Prediction

__all__ = ["TARGETS", "EstimateError", "Estimator", "Prediction"]
