"""Defects found reading gcbench as a CUDA reviewer would (issue 21), each with the case that exposed it."""

from __future__ import annotations

import pytest
import torch

import gcbench.measure.step as step_module
import gcbench.training as training
from gcbench.measure.timing import RepeatPolicy
from gcbench.training import StepConfig, build_step
from gcbench.workloads import ModelConfig, WorkloadConfig

TINY = WorkloadConfig("dpr", ModelConfig(hidden=32, layers=1, heads=2, vocab=2000), query_length=8, passage_length=12)


class Stop(Exception):
    pass


def test_the_optimizer_has_its_state_before_the_measured_step_when_the_scaler_skips_the_first(monkeypatch):
    """fp16: a first step whose scaled gradients overflow skips optimizer.step; its state must not be made
    inside the measured step (it would count in the peak and not in the baseline)."""

    def overflowing(precision, device):  # 2^24: fp16 gradients overflow for the first steps
        return torch.amp.GradScaler(device.type, init_scale=2.0**24) if precision == "fp16" else None

    monkeypatch.setattr(training, "grad_scaler", overflowing)
    config = StepConfig(TINY, "cache", 8, (4,), precision="fp16")
    control = build_step(config, torch.device("cpu"))
    control()
    assert not control.optimizer.state, "the case needs a first step that the scaler skips"

    seen = []

    def memory(step):
        seen.append(all(step.optimizer.state.get(p) for p in step.parameters() if p.grad is not None))
        raise Stop

    monkeypatch.setattr(step_module, "measure_step_memory", memory)
    with pytest.raises(Stop):
        step_module.measure_step(build_step(config, torch.device("cpu")), 1, RepeatPolicy(1, 1, 0.0))
    assert seen == [True]
