"""Pure bf16 (``precision = "pure-bf16"``): bfloat16 weights, gradients and optimizer state, no autocast;
the cache is as exact as bf16 rounding allows, and the check still tells accumulate apart."""

from __future__ import annotations

from dataclasses import replace

import torch

from gcbench.device import autocast, grad_scaler, param_dtype
from gcbench.measure.equivalence import check_strategy
from gcbench.training import StepConfig, build_step
from gcbench.verify import DEFAULT_TOLERANCE, workload_config


def small():
    config = workload_config("dpr", 0.0)
    return replace(config, model=replace(config.model, vocab=2000))


def test_weights_gradients_and_optimizer_state_are_bf16():
    assert param_dtype("pure-bf16") == torch.bfloat16 and grad_scaler("pure-bf16", torch.device("cpu")) is None
    assert isinstance(autocast("pure-bf16", torch.device("cpu")), type(autocast("float32", torch.device("cpu"))))
    step = build_step(StepConfig(small(), "cache", 4, (2,), "pure-bf16"), torch.device("cpu"))
    step()
    resident = step.resident()
    for kind in ("parameters", "gradients", "optimizer"):
        floats = [t for t in resident[kind] if t.is_floating_point() and t.dim()]
        assert floats and all(t.dtype == torch.bfloat16 for t in floats), kind


def test_cache_within_the_pure_bf16_tolerance_and_accumulate_outside_it():
    tolerance = DEFAULT_TOLERANCE["pure-bf16"]
    assert check_strategy(small(), "cache", 6, (2, 3), precision="pure-bf16").passes(tolerance)
    assert not check_strategy(small(), "accumulate", 6, (2, 3), precision="pure-bf16").passes(tolerance)
