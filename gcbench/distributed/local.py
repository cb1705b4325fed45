"""The local loss on W ranks: each rank scores only its own rows against every rank's columns.

open_clip's ``local_loss=True``, exact here because each of gcbench's losses is a sum of per-row terms
(:class:`gcbench.losses.ContrastiveLoss`). Rank r holds examples ``[r·n, (r+1)·n)`` and computes their
part of the global loss against the gathered columns: an n x W·n score matrix (or tiles of it) where
:class:`~gcbench.distributed.GatherLoss` has every rank compute the whole W·n x W·n one.

Gradients. The global loss L is the sum of the ranks' parts, and every part depends on every rank's
columns, so the gradient of the gathered columns goes back to their owners and is summed there (a
reduce-scatter, the all-gather's adjoint). Each rank's part is scaled by W on the way back, so that DDP's
average over the ranks, (1/W) Σ_r W·J_r^T g_r, is the single-process gradient of L. The loss's own
parameters (a temperature) get W times their part's gradient on each rank and are averaged over the
ranks here, the same way (they stay outside DDP). The loss returned is L, the same on every rank.

Communication per step, per input used as columns (n rows of width d on each rank): an all-gather of
W·n·d values in forward and a reduce-scatter of as many in backward, plus a small all-gather of row
counts, an all-reduce of the loss and one of the loss's parameters' gradients (a few scalars).
GatherLoss needs the all-gather alone but W times the loss's work and W² times its memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from gcbench.distributed.gather import all_gather_into, check_equal_rows
from gcbench.losses import ContrastiveLoss

# torch 2.13 renames reduce_scatter_tensor (and warns on the old name); the project supports older torch too.
_reduce_scatter_into = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherSummedBack(torch.autograd.Function):
    """Rows of every rank in rank order; backward: each rank's rows of every rank's gradient, summed."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: ProcessGroup | None) -> Tensor:
        gathered = tensor.new_empty((dist.get_world_size(group) * tensor.shape[0], *tensor.shape[1:]))
        all_gather_into(gathered, tensor.contiguous(), group=group)
        ctx.group, ctx.shape = group, tensor.shape
        return gathered

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        mine = grad.new_empty(ctx.shape)
        _reduce_scatter_into(mine, grad.contiguous(), group=ctx.group)
        return mine, None


class _SumOverRanks(torch.autograd.Function):
    """The sum of every rank's value, on every rank; backward: this rank's share, times W (for DDP's mean)."""

    @staticmethod
    def forward(ctx: Any, part: Tensor, group: ProcessGroup | None) -> Tensor:
        total = part.detach().clone()
        dist.all_reduce(total, group=group)
        ctx.world = dist.get_world_size(group)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.world, None


class _MeanGradOverRanks(torch.autograd.Function):
    """The tensors themselves; backward: their gradients averaged over the ranks (one all-reduce for all)."""

    @staticmethod
    def forward(ctx: Any, group: ProcessGroup | None, *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.group = group
        ctx.shapes = [t.shape for t in tensors]
        ctx.kinds = [(t.dtype, t.device) for t in tensors]  # an unused tensor's zeros: on its device, in its dtype
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        flat = torch.cat(
            [
                (g if g is not None else torch.zeros(shape, dtype=dtype, device=device)).reshape(-1)
                for g, shape, (dtype, device) in zip(grads, ctx.shapes, ctx.kinds)
            ]
        )
        dist.all_reduce(flat, group=ctx.group)
        flat /= dist.get_world_size(ctx.group)
        sizes = [shape.numel() for shape in ctx.shapes]
        return (None, *(g.view(shape) for g, shape in zip(flat.split(sizes), ctx.shapes)))


class RankCollectives:
    """What the local loss asks of its process group (:attr:`LocalLoss.collectives`)."""

    def __init__(self, group: ProcessGroup | None = None) -> None:
        self.group = group

    def rank(self) -> int:
        return dist.get_rank(self.group)

    def check(self, tensors: Sequence[Tensor]) -> None:
        """ValueError, the same on every rank, unless all ranks hold as many rows of each tensor."""
        check_equal_rows(tensors, self.group)

    def gather(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Every rank's rows; backward: the gradient of this rank's rows summed over the ranks."""
        return [_GatherSummedBack.apply(t, self.group) for t in tensors]

    def total(self, part: Tensor) -> Tensor:
        """Every rank's part summed; backward: W times this rank's share."""
        total: Tensor = _SumOverRanks.apply(part, self.group)
        return total

    def averaged(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """The tensors, their gradients averaged over the ranks."""
        return list(_MeanGradOverRanks.apply(self.group, *tensors)) if tensors else []


class LocalLoss(nn.Module):
    """This rank's rows of ``loss`` against every rank's columns; returns the global batch's loss.

    Rank r must hold examples ``[r·n, (r+1)·n)`` of each input (see :func:`gcbench.distributed.shard`).
    ``loss`` is registered as a submodule, so its parameters train as before.
    """

    def __init__(self, loss: ContrastiveLoss, group: ProcessGroup | None = None) -> None:
        super().__init__()
        if not isinstance(loss, ContrastiveLoss):
            raise TypeError(
                f"LocalLoss needs a loss split by rows (a gcbench.losses.ContrastiveLoss), not "
                f"{type(loss).__name__}; GatherLoss computes any loss over the gathered batch"
            )
        self.loss = loss
        self.collectives = RankCollectives(group)

    def forward(self, *reps: Tensor) -> Tensor:
        ops = self.collectives
        ops.check(reps)
        columns: list[Tensor | None] = [None] * len(reps)
        used = [i for i in self.loss.column_inputs if i < len(reps)]
        for i, gathered in zip(used, ops.gather([reps[i] for i in used])):
            columns[i] = gathered
        names = [name for name, _ in self.loss.named_parameters()]
        shared = dict(zip(names, ops.averaged([p for _, p in self.loss.named_parameters()])))
        kwargs = {"columns": columns, "start": ops.rank() * reps[0].shape[0]}
        part = torch.func.functional_call(self.loss, shared, tuple(reps), kwargs)
        return ops.total(part)
