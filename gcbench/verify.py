"""``gcbench verify``: are the gradients really the full-batch ones? A check to run in CI."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from gcbench.device import check_precision
from gcbench.errors import UsageError
from gcbench.measure.equivalence import GradComparison, check_strategy
from gcbench.strategies import STRATEGIES
from gcbench.workloads import WORKLOADS, ModelConfig, WorkloadConfig

# Half precision: the reference itself rounds at bf16/fp16 (autocast sums the chunks' weight
# gradients in half precision there, in float32 here), so the bound is a few units of its epsilon.
DEFAULT_TOLERANCE = {"float64": 1e-10, "float32": 1e-5, "bf16": 3e-2, "fp16": 3e-3}
VERIFY_MODEL = ModelConfig(hidden=64, layers=2, heads=4, features=32)


@dataclass(frozen=True)
class VerifyResult:
    workload: str
    strategy: str
    precision: str
    batch_size: int
    chunk_sizes: tuple[int, ...]
    comparison: GradComparison
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.comparison.passes(self.tolerance)


def workload_config(name: str, dropout: float, tied: bool = False) -> WorkloadConfig:
    """The small default model of each workload, big enough to exercise masks, pooling and chunking."""
    return WorkloadConfig(name=name, model=replace(VERIFY_MODEL, dropout=dropout), query_length=16,
                          passage_length=24, tied=tied)


def verify(
    workloads: Sequence[str] = tuple(WORKLOADS),
    strategies: Sequence[str] = ("cache",),
    *,
    precision: str = "float32",
    device: torch.device | str = "cpu",
    batch_size: int = 12,
    chunk_sizes: Sequence[int] = (5,),
    tolerance: float | None = None,
    seed: int = 0,
    dropout: float = 0.1,
) -> list[VerifyResult]:
    """One comparison per workload and strategy; a chunk size per encoder, or one for all."""
    chunks = check_arguments(workloads, strategies, precision, batch_size, chunk_sizes)
    if not 0.0 <= dropout < 1.0:
        raise UsageError(f"--dropout must be in [0, 1), got {dropout}")
    tol = DEFAULT_TOLERANCE[precision] if tolerance is None else tolerance
    results = []
    for name in workloads:
        config = workload_config(name, dropout)
        for strategy in strategies:
            comparison = check_strategy(config, strategy, batch_size, chunks, precision=precision, device=device,
                                        seed=seed)
            results.append(VerifyResult(name, strategy, precision, batch_size, chunks, comparison, tol))
    return results


def check_arguments(workloads: Sequence[str], strategies: Sequence[str], precision: str, batch_size: int,
                    chunk_sizes: Sequence[int]) -> tuple[int, ...]:
    """UsageError naming the flag for a bad value; the chunk sizes, one per input."""
    check_precision(precision)
    for name in workloads:
        if name not in WORKLOADS:
            raise UsageError(f"--workload: unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    for name in strategies:
        if name not in STRATEGIES:
            raise UsageError(f"--strategy: unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if not chunk_sizes or len(chunk_sizes) > 2 or any(c < 1 for c in chunk_sizes):
        raise UsageError(f"--chunk-size: one size, or one per input (2), each >= 1; got {list(chunk_sizes)}")
    return tuple(chunk_sizes) * (2 // len(chunk_sizes))
