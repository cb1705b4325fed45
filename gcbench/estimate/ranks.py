"""One rank of W, predicted in one process: local rows, the gathered representations, DDP's buckets.

A rank's step differs from a single process's in three ways that cost memory: its encoders see
``B / W`` rows; the exact strategies' loss sees all ``B`` rows, gathered (``W x B/W x d`` per input,
and its own rows' logits against them, or for a loss that cannot split by rows all of them); DDP holds
gradient-sized buffers. The first is the local batch
size, the second a stand-in for the all-gather with the same allocations (no process group needed),
the third is added as :data:`DDP_GRADIENT_COPIES` copies of the encoders' gradients: measured with
gloo on CPU, a rank held its buckets (allocated when DDP wraps the model) and a second
gradient-sized buffer from the all-reduce on, through the optimizer step, at every peak measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from gcbench.cache.objective import Objective
from gcbench.distributed.local import RankCollectives
from gcbench.distributed.objective import rank_loss

DDP_GRADIENT_COPIES = 2


class _GatherStandIn(torch.autograd.Function):
    """Allocates what ``all_gather_with_grad`` does on one rank: W x rows out, and this rank's rows back."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, world: int) -> Tensor:
        gathered = tensor.new_empty((world * tensor.shape[0], *tensor.shape[1:]))
        gathered.view(world, *tensor.shape).copy_(tensor.unsqueeze(0).expand(world, *tensor.shape))
        ctx.rows, ctx.world = tensor.shape[0], world
        return gathered

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad[: ctx.rows] * ctx.world, None


class _StandInCollectives(RankCollectives):
    """Rank 0 of ``world_size``, no process group: the gathers allocate as the real ones do."""

    def __init__(self, world_size: int) -> None:
        super().__init__()
        self.world_size = world_size

    def rank(self) -> int:
        return 0

    def check(self, tensors: Sequence[Tensor]) -> None:
        pass

    def gather(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        return [_GatherStandIn.apply(t, self.world_size) for t in tensors]

    def total(self, part: Tensor) -> Tensor:
        return part

    def averaged(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        return list(tensors)


def gathering_objective(objective: Objective, world_size: int) -> Objective:
    """``objective`` with the loss a rank computes (:func:`~gcbench.distributed.rank_loss`: the local loss
    for gcbench's losses, the gathered one for others) over ``world_size`` ranks' stand-in columns."""
    loss = rank_loss(objective.loss_fn, collectives=_StandInCollectives(world_size))
    return Objective(objective.encoders, loss, objective.get_rep)
