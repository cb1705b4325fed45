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
        step_module.StepProtocol(1, RepeatPolicy(1, 1, 0.0)).measure(build_step(config, torch.device("cpu")))
    assert seen == [True]


@pytest.mark.parametrize("keep", [0, "all"])
def test_a_chunk_whose_representations_differ_in_shape_is_named(keep):
    """Token-level representations padded per chunk: chunk 1's (2, 1, 3) would broadcast into (2, 4, 3)."""
    from gcbench import GradCache

    class PaddedPerChunk(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 3)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            tokens = 4 if self.calls % 2 == 1 else 1
            return self.linear(x).unsqueeze(1).expand(-1, tokens, -1)

    def loss(a, b):
        return (a.flatten(1) @ b.flatten(1).T).logsumexp(1).mean()

    other = torch.nn.Sequential(torch.nn.Linear(4, 12), torch.nn.Unflatten(1, (4, 3)))
    with pytest.raises(ValueError, match=r"encoders\[0\]: chunk 1 .* shape \(2, 1, 3\)"):
        GradCache([PaddedPerChunk(), other], loss, 2, keep_graphs=keep)(torch.randn(4, 4), torch.randn(4, 4))


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference).norm() / reference.norm())


def test_tiled_losses_accumulate_in_float32_for_half_precision_inputs():
    """Called on bf16 representations directly, over many tiles, against float64 on the same values (fp16 takes
    the same path; its 10-bit mantissa makes the old error too small to see at this size)."""
    dtype = torch.bfloat16
    from gcbench.losses import tiled_lse_sum, tiled_negatives_sum

    generator = torch.Generator().manual_seed(0)
    rows = (torch.randn(96, 16, generator=generator) / 2).to(dtype).requires_grad_()
    columns = (torch.randn(96, 16, generator=generator) / 2).to(dtype).requires_grad_()
    wide_rows, wide_columns = rows.detach().double().requires_grad_(), columns.detach().double().requires_grad_()

    tiled_lse_sum(rows, columns, 2.0, 4, columns_too=True).backward()
    reference = (wide_rows @ wide_columns.T * 2.0).logsumexp(1).sum() + (wide_rows @ wide_columns.T * 2.0).logsumexp(
        0
    ).sum()
    reference.backward()
    assert _relative_error(rows.grad, wide_rows.grad) < 1e-2  # bf16 running statistics: about 5e-2
    assert _relative_error(columns.grad, wide_columns.grad) < 1e-2

    negatives = tiled_negatives_sum(rows.detach(), columns.detach(), 2.0, -1.0, 4)
    expected = -torch.nn.functional.logsigmoid(-(wide_rows.detach() @ wide_columns.detach().T * 2.0 - 1.0)).sum()
    assert abs(float(negatives) - float(expected)) / float(expected) < 1e-2
