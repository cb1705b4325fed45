"""Peak memory for devices and batch sizes you do not have, predicted without allocating."""

from gcbench.estimate.estimator import EstimateError, Estimator, Prediction
from gcbench.estimate.target import TARGETS

__all__ = ["EstimateError", "Estimator", "Prediction", "TARGETS"]
