"""What runs only on a GPU: peaks from the CUDA allocator, the budget it enforces, dropout replayed from the
GPU's generator, and the estimate's CUDA model against a measured peak. Skipped, with the reason, without
a CUDA device; ``experiments/gpu-check.sh`` runs them where there is one."""

from __future__ import annotations

import pytest
import torch

from gcbench.cache.rng import RngState
from gcbench.estimate import Estimator
from gcbench.estimate.estimator import WORKSPACES
from gcbench.estimate.workspaces import workspace_bytes
from gcbench.experiment import build_experiment
from gcbench.measure.equivalence import check_strategy
from gcbench.measure.memory import CUDA_BLOCK, measure_step_memory, track_step
from gcbench.results import Point
from gcbench.sweep.point import InProcess
from gcbench.training import StepConfig, build_step
from gcbench.verify import verify, workload_config
from gcbench.workloads import ModelConfig, WorkloadConfig

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda", 0)  # set_per_process_memory_fraction refuses a device without an index
WORKLOAD = WorkloadConfig(
    "dpr", ModelConfig(hidden=64, layers=2, heads=4, vocab=2000), query_length=16, passage_length=32
)


def warmed_step(strategy: str, batch: int, chunks: tuple[int, ...] | None = None):
    step = build_step(StepConfig(WORKLOAD, strategy, batch, chunks), CUDA)
    step()  # the optimizer state and cuBLAS workspaces exist from here on
    return step


def held_outside_tensors(step, measured) -> int:
    """What the allocator holds after warm-up beside the step's tensors: cuBLAS's workspaces, measured."""
    tracked_baseline, _ = track_step(step, CUDA_BLOCK, count_cpu_rng_states=False)
    return measured.baseline_bytes - tracked_baseline


def test_the_peak_is_max_memory_allocated_and_the_tracker_agrees():
    step = warmed_step("full", 64)
    measured = measure_step_memory(step)
    assert measured.method == "cuda max_memory_allocated"
    assert measured.baseline_bytes > 0 and measured.step_peak_bytes > 0
    assert measured.reserved_bytes is not None and measured.reserved_bytes >= measured.peak_bytes
    workspaces = held_outside_tensors(step, measured)
    _, tracked = track_step(step, CUDA_BLOCK, count_cpu_rng_states=False)
    tensors = measured.peak_bytes - workspaces  # the tracker sees tensors only: 10% of theirs, not of a constant
    assert workspaces >= 0 and abs(tracked.total - tensors) <= 0.1 * tensors, (tracked.total, workspaces, measured)


def test_the_workspaces_held_are_those_the_estimate_counts():
    step = warmed_step("full", 64)
    measured = held_outside_tensors(step, measure_step_memory(step))
    predicted = workspace_bytes(torch.cuda.get_device_capability(CUDA))
    assert abs(measured - predicted) <= 0.1 * predicted + 2**20, (measured, predicted)


def test_the_budget_is_enforced_on_the_allocator():
    raw = {
        "workload": {"name": "dpr", "query_length": 16, "passage_length": 32},
        "model": {"hidden": 64, "layers": 2, "heads": 4, "vocab": 2000},
        "sweep": {
            "strategies": ["full"],
            "batch_sizes": [1024],
            "device": "cuda",
            "memory_budget": "8MiB",
            "equivalence": False,
            "repeats": 1,
        },
    }
    record = InProcess(build_experiment(raw, "budget", {})).measure(Point("full", 1024))
    assert record.status == "oom", record.reason
    assert record.memory is not None and record.memory.method == "cuda max_memory_allocated"
    torch.cuda.set_per_process_memory_fraction(1.0, CUDA)


@pytest.mark.parametrize("name", ["dpr", "clip", "simclr"])
def test_dropout_is_replayed_from_the_gpu_generator(name, monkeypatch):
    config = workload_config(name, dropout=0.1)
    exact = check_strategy(config, "cache", 12, (5, 5), precision="float64", device=CUDA)
    assert exact.max_rel_err <= 1e-10, exact

    def cpu_only(state: RngState) -> None:  # the trap of the reference library: the GPU's masks not replayed
        torch.set_rng_state(state.cpu)

    monkeypatch.setattr(RngState, "restore", cpu_only)
    wrong = check_strategy(config, "cache", 12, (5, 5), precision="float64", device=CUDA)
    assert wrong.max_rel_err > 1e-3, "without the GPU's generator the check must fail"


@pytest.mark.parametrize("precision", ["float32", "bf16", "fp16"])
def test_verify_passes_at_every_precision(precision):
    results = verify(precision=precision, device=CUDA)
    assert all(r.passed for r in results), [(r.workload, r.comparison) for r in results]


@pytest.mark.parametrize(
    "strategy, batch, chunks", [("full", 64, None), ("cache", 256, (16,)), ("checkpoint", 64, None)]
)
def test_the_cuda_estimate_is_within_10_percent_of_the_measured_peak(strategy, batch, chunks):
    measured = measure_step_memory(warmed_step(strategy, batch, chunks)).peak_bytes
    capability = torch.cuda.get_device_capability(CUDA)
    estimator = Estimator(WORKLOAD, "float32", "cuda", capability=capability)
    predicted = estimator.predict(StepConfig(WORKLOAD, strategy, batch, chunks))
    assert predicted.peak_bytes is not None
    # 10% of what the step's tensors hold: the workspaces (a constant 64 MiB on Hopper) are in both, not in the bar
    tensors = measured - predicted.peak_breakdown[WORKSPACES]
    assert abs(predicted.peak_bytes - measured) <= 0.1 * tensors, (predicted.peak_bytes, measured)
