"""An all-gather of representations that autograd goes through: the loss over the global batch on W ranks.

Sec. 3.4 of the paper: after the no-grad pass every rank gathers all representations, computes the
loss over the global batch and back-propagates to its *local* representations only.

Every rank computes the same loss from the same gathered tensor, so the gradient each rank gets for
that tensor is the full one, identical everywhere. The backward keeps this rank's rows and multiplies
them by W: what a reduce-scatter (sum) of W identical gradients would give, without communicating.
DDP then averages the parameter gradients over the ranks, (1/W) * sum_r W * J_r^T g_r = sum_r J_r^T g_r:
exactly the single-process gradient of the global batch, not 1/W of it (the known DDP trap). The
loss's own parameters (a learnable temperature) see the global loss on every rank and get the full
gradient on every rank: they need no reduction and must stay outside DDP.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup

# torch 2.13 renames all_gather_into_tensor (and warns on the old name); the project supports older torch too.
all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def check_equal_rows(tensors: Sequence[Tensor], group: ProcessGroup | None = None) -> None:
    """ValueError naming every rank's rows unless all ranks hold as many rows of each tensor.

    One small all-gather of the sizes; every rank sees the same sizes and raises the same error,
    so a mismatch never leaves a rank waiting in the gather that would follow. A fake process group
    (torch's ``fake`` backend: collectives that move nothing) has no sizes to compare.
    """
    if dist.get_backend(group) == "fake":
        return
    local = torch.tensor([t.shape[0] for t in tensors], device=tensors[0].device)
    sizes = local.new_empty(dist.get_world_size(group) * len(tensors))
    all_gather_into(sizes, local, group=group)
    sizes = sizes.view(-1, len(tensors))  # (rank, input)
    differing = [i for i in range(len(tensors)) if bool((sizes[:, i] != sizes[0, i]).any())]
    if differing:
        listed = "; ".join(
            f"input {i}: " + ", ".join(f"rank {r} has {n}" for r, n in enumerate(sizes[:, i].tolist()))
            for i in differing
        )
        raise ValueError(
            f"all-gather: ranks hold different numbers of rows ({listed}); split the global batch evenly over the ranks"
        )


class _GatherRows(torch.autograd.Function):
    """Rows of every rank in rank order; backward: this rank's rows of the gradient, times W."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: ProcessGroup | None) -> Tensor:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        rows = tensor.shape[0]
        gathered = tensor.new_empty((world * rows, *tensor.shape[1:]))
        all_gather_into(gathered, tensor.contiguous(), group=group)
        ctx.rows, ctx.world = slice(rank * rows, (rank + 1) * rows), world
        return gathered

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad[ctx.rows] * ctx.world, None


def gather_rows(tensors: Sequence[Tensor], group: ProcessGroup | None = None) -> list[Tensor]:
    """Each tensor's rows from every rank, concatenated in rank order; one size check for all of them."""
    check_equal_rows(tensors, group)
    return [_GatherRows.apply(t, group) for t in tensors]


def all_gather_with_grad(tensor: Tensor, group: ProcessGroup | None = None) -> Tensor:
    """``tensor``'s rows from every rank in rank order, differentiable (see the module docstring).

    Only correct when every rank computes the same loss from the result (the gradient that comes
    back is assumed identical on all ranks); ValueError if ranks hold different numbers of rows.
    """
    return gather_rows([tensor], group)[0]


class GatherLoss(nn.Module):
    """``loss_fn`` over the representations of every rank: the loss of the global batch, on each rank.

    The targets of gcbench's losses come from shapes, so gathering in rank order gives exactly the
    global batch's loss when rank r holds rows ``[r*B/W, (r+1)*B/W)`` of every input (see
    :func:`gcbench.distributed.shard`). Keyword tensors with a batch dimension (labels) are gathered
    when named in ``gather_kwargs`` (without gradient); other keyword arguments pass through as they
    are. A loss that is a module is registered as a submodule, so its parameters train as before.
    """

    def __init__(
        self,
        loss_fn: Callable[..., Tensor],
        group: ProcessGroup | None = None,
        gather_kwargs: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.loss_fn = loss_fn
        self.group = group
        self.gather_kwargs = tuple(gather_kwargs)

    def forward(self, *reps: Tensor, **loss_kwargs: Any) -> Tensor:
        names = [name for name in self.gather_kwargs if name in loss_kwargs]
        gathered = gather_rows([*reps, *(loss_kwargs[name] for name in names)], self.group)
        kwargs = {**loss_kwargs, **dict(zip(names, gathered[len(reps) :]))}
        return self.loss_fn(*gathered[: len(reps)], **kwargs)
