"""cuBLAS's workspaces in the CUDA estimate, sized as PyTorch sizes them (see gcbench/estimate/workspaces.py)."""

from __future__ import annotations

import pytest

from gcbench.estimate import Estimator
from gcbench.estimate.estimator import WORKSPACES
from gcbench.estimate.workspaces import cublas_workspace_bytes, cublaslt_extra_bytes, workspace_bytes
from gcbench.training import StepConfig
from gcbench.workloads import ModelConfig, WorkloadConfig

MiB, KiB = 2**20, 2**10
TINY = WorkloadConfig("dpr", ModelConfig(hidden=32, layers=1, heads=2, vocab=2000), query_length=8, passage_length=12)


@pytest.mark.parametrize(
    "capability, environ, expected",
    [
        ((9, 0), {}, 32 * MiB),  # Hopper
        ((10, 0), {}, 32 * MiB),  # Blackwell
        ((8, 0), {}, 8 * MiB + 128 * KiB),  # Ampere: :4096:2:16:8
        ((7, 5), {}, 8 * MiB + 128 * KiB),
        ((9, 0), {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}, 128 * KiB),  # the deterministic setting
        ((8, 0), {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}, 32 * MiB),
        ((8, 0), {"CUBLAS_WORKSPACE_CONFIG": ":4096:2:16:8"}, 8 * MiB + 128 * KiB),
        ((9, 0), {"CUBLAS_WORKSPACE_CONFIG": "nonsense"}, 32 * MiB),  # torch warns and keeps its default
    ],
)
def test_the_cublas_workspace_is_sized_as_pytorch_sizes_it(capability, environ, expected):
    assert cublas_workspace_bytes(capability, environ) == expected


def test_cublaslt_shares_the_workspace_unless_told_not_to():
    assert cublaslt_extra_bytes({}) == 0
    assert cublaslt_extra_bytes({"TORCH_CUBLASLT_UNIFIED_WORKSPACE": "0"}) == MiB
    assert cublaslt_extra_bytes({"TORCH_CUBLASLT_UNIFIED_WORKSPACE": "0", "CUBLASLT_WORKSPACE_SIZE": "4096"}) == 4 * MiB
    assert workspace_bytes((9, 0), {}) == 2 * 32 * MiB  # one handle for the forward's thread, one for autograd's


def test_the_cuda_estimate_has_a_line_for_the_workspaces(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    config = StepConfig(TINY, "full", 8)
    hopper = Estimator(TINY, "float32", "cuda").predict(config)
    ampere = Estimator(TINY, "float32", "cuda", capability=(8, 0)).predict(config)
    cpu = Estimator(TINY, "float32", "cpu").predict(config)
    assert hopper.peak_breakdown[WORKSPACES] == 64 * MiB and WORKSPACES not in cpu.peak_breakdown
    assert hopper.peak_bytes - ampere.peak_bytes == 2 * (32 * MiB - 8 * MiB - 128 * KiB)
    assert hopper.baseline_bytes - ampere.baseline_bytes == hopper.peak_bytes - ampere.peak_bytes  # held from warm-up
    assert sum(hopper.peak_breakdown.values()) == hopper.peak_bytes
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    deterministic = Estimator(TINY, "float32", "cuda").predict(config)
    assert deterministic.peak_breakdown[WORKSPACES] == 2 * 128 * KiB
