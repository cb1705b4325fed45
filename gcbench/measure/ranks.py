"""Are W-rank gradients, after DDP's all-reduce, the single-process gradients of the global batch?

The reference is one process running ``full`` over the global batch built from the same seed (same
weights, same rows in the same order). Every rank computes it too and compares its own gradients,
so the result is the worst rank's: passing means every rank agrees with the reference, hence with
rank 0.

Dropout is off here. A rank draws its masks from its own RNG stream, in its own chunk order; a
single process cannot draw those masks without replaying W interleaved streams. What the distributed
path adds (the gather, its backward, DDP's averaging, ``no_sync``) does not depend on masks, and the
replay of masks within a process is what ``gcbench verify`` already checks against a mask-consistent
reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import Tensor

from gcbench.device import exact_float32, grad_scaler
from gcbench.distributed.launch import RankInfo, launch
from gcbench.distributed.objective import distribute_step, gathers
from gcbench.measure.equivalence import COMPARISON_LOSS_SCALE, GradComparison, compare, gradients
from gcbench.strategies import Full, resolve_strategy
from gcbench.training import StepConfig, TrainingStep, build_step

REFERENCE = "single-process full over the global batch, dropout off"


def whole_loss(config: StepConfig) -> StepConfig:
    """``config`` with its loss computed over the whole score matrix (the reference for a tiled loss)."""
    return replace(config, workload=replace(config.workload, loss_tile=0))


def step_gradients(step: TrainingStep) -> tuple[list[Tensor], float]:
    """One forward+backward of ``step`` from zero gradients: float64 copies, unscaled, and the loss."""
    step.zero_grad()
    with exact_float32(step.config.precision, step.device):
        loss = step.forward_backward()
    unscale = 1.0 / step.scaler.get_scale() if step.scaler is not None else 1.0
    return [g * unscale for g in gradients(step.parameters())], float(loss)


def checked_step(config: StepConfig, device: torch.device) -> TrainingStep:
    """``build_step`` with the comparison's moderate fp16 loss scale (see COMPARISON_LOSS_SCALE)."""
    step = build_step(config, device)
    step.scaler = grad_scaler(config.precision, device, init_scale=COMPARISON_LOSS_SCALE)
    step.strategy = config.build_strategy(step.workload.objective, step.scaler)
    return step


def distributed_gradients(config: StepConfig, device: torch.device) -> tuple[list[Tensor], float]:
    """This rank's gradients after one W-rank step of ``config`` (global batch), and the loss they descend.

    A gathering strategy's loss is the global one on every rank; ``accumulate``'s is the rank's own,
    so the mean over ranks is reported: DDP's averaged gradient is that mean's gradient.
    """
    grads, loss = step_gradients(distribute_step(checked_step(config, device)))
    if not gathers(config.strategy):
        total = torch.tensor(loss, dtype=torch.float64, device=device)
        dist.all_reduce(total)
        loss = float(total) / dist.get_world_size()
    return grads, loss


def reference_gradients(
    config: StepConfig, device: torch.device, strategy: str = Full.name
) -> tuple[list[Tensor], float]:
    """``strategy`` in this process alone over ``config``'s global batch (no collective: OOM here is local)."""
    cls = resolve_strategy(strategy)
    chunks = config.chunk_sizes if cls.uses_chunks else None
    keep = config.keep_graphs if cls.keeps_graphs else None
    tokens = config.chunk_tokens if cls.token_chunks else None
    return step_gradients(
        checked_step(
            replace(config, strategy=strategy, chunk_sizes=chunks, keep_graphs=keep, chunk_tokens=tokens), device
        )
    )


def worst(comparisons: Sequence[GradComparison]) -> GradComparison:
    """The rank furthest from the reference (NaN counts as furthest)."""

    def distance(x: float) -> float:
        return math.inf if math.isnan(x) else x

    return max(comparisons, key=lambda c: (distance(c.max_rel_err), distance(c.loss_diff)))


def _check_cases(info: RankInfo, cases: list[StepConfig], reference: str | None) -> list[GradComparison]:
    results = []
    for config in cases:
        grads, loss = distributed_gradients(config, info.device)
        ref_grads, ref_loss = reference_gradients(whole_loss(config), info.device, reference or config.strategy)
        results.append(compare(grads, ref_grads, loss, ref_loss))
    return results


def check_distributed(
    cases: Sequence[StepConfig],
    nproc: int,
    *,
    device: torch.device | str = "cpu",
    backend: str = "auto",
    timeout: float = 600.0,
    reference: str | None = Full.name,
) -> list[GradComparison]:
    """Each case (its ``batch_size`` is the global batch) on ``nproc`` ranks in one launch, against one process
    computing its loss whole (so a tiled loss is checked too).

    ``reference``: the single-process strategy to compare with; ``None``: the case's own strategy
    (``accumulate`` on W ranks equals one-process ``accumulate`` when each rank's rows split into
    whole micro-batches). One comparison per case: the worst rank's.
    """
    per_rank = launch(_check_cases, nproc, (list(cases), reference), device=device, backend=backend, timeout=timeout)
    return [worst(column) for column in zip(*per_rank)]
