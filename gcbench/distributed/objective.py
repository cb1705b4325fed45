"""How any strategy becomes a W-rank one without a copy of its logic: wrap the objective, split the data.

:func:`distribute` wraps each distinct encoder in DDP once (a tied encoder used for two inputs is one
DDP module, so it all-reduces once) and, for strategies whose loss sees the whole batch, wraps the
loss in :class:`LocalLoss` (gcbench's losses: each rank its own rows) or :class:`GatherLoss` (any
loss). The strategies themselves run unchanged: GradCache and ``accumulate`` use ``no_sync`` on every
backward but the last of each DDP module, ``full`` and ``checkpoint`` have one.
:func:`shard` is the one place that splits a global batch over the ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.nn.parallel import DistributedDataParallel
from torch.utils._pytree import tree_map_only

from gcbench.cache.batching import Batch, batch_size, distinct, slice_batch
from gcbench.cache.objective import Objective
from gcbench.distributed.gather import GatherLoss
from gcbench.distributed.local import LocalLoss
from gcbench.losses import ContrastiveLoss
from gcbench.strategies import resolve_strategy
from gcbench.training import TrainingStep


def gathers(strategy: str) -> bool:
    """Whether ``strategy``'s loss sees the global batch on W ranks (its ``global_negatives`` trait).

    The exact strategies gather: on one process they equal the full-batch gradient, so on W they
    must see the global batch's negatives. ``accumulate`` keeps per-rank negatives, as DDP
    accumulation does in practice: that is the baseline it is here to be.
    """
    return resolve_strategy(strategy).traits().global_negatives


def rank_loss(
    loss_fn: Callable[..., Tensor],
    group: ProcessGroup | None = None,
    *,
    local: bool = True,
    gather_kwargs: Sequence[str] = (),
) -> nn.Module:
    """What a rank computes so that DDP's average is the global batch's gradient: the :class:`LocalLoss`
    (its own rows against every rank's columns) where ``loss_fn`` splits by rows (gcbench's losses) and
    ``local`` allows it, else :class:`GatherLoss` (the whole loss over the gathered batch, any loss)."""
    if local and isinstance(loss_fn, ContrastiveLoss) and not gather_kwargs:
        return LocalLoss(loss_fn, group)
    return GatherLoss(loss_fn, group, gather_kwargs)


def distribute(
    objective: Objective,
    group: ProcessGroup | None = None,
    *,
    gather: bool = True,
    local_loss: bool = True,
    gather_kwargs: Sequence[str] = (),
    ddp_options: Mapping[str, Any] | None = None,
) -> Objective:
    """The same objective with DDP encoders (each distinct module wrapped once) and, if ``gather``, the loss
    over the global batch (:func:`rank_loss`: local where the loss allows and ``local_loss``, else gathered).

    ``ddp_options`` go to every ``DistributedDataParallel``; already wrapped encoders are kept.
    """
    wrapped: dict[int, nn.Module] = {}
    for encoder in objective.encoders:
        if id(encoder) not in wrapped:
            wrapped[id(encoder)] = (
                encoder
                if isinstance(encoder, DistributedDataParallel)
                else DistributedDataParallel(encoder, process_group=group, **(ddp_options or {}))
            )
    loss = (
        rank_loss(objective.loss_fn, group, local=local_loss, gather_kwargs=gather_kwargs)
        if gather
        else objective.loss_fn
    )
    return replace(objective, encoders=[wrapped[id(e)] for e in objective.encoders], loss_fn=loss)


def shard(batches: Sequence[Batch], rank: int, world_size: int) -> list[Batch]:
    """Rank ``rank``'s rows ``[r*R/W, (r+1)*R/W)`` of each input (R: its rows), as compact copies.

    Proportional rows keep dpr's passage groups with their query; gathered in rank order the shards
    are the global batch in its own order. Copies, so a rank holds (and its baseline counts) only its
    own inputs, not the global batch they were cut from.
    """
    local = []
    for i, batch in enumerate(batches):
        rows = batch_size(batch, f"batches[{i}]")
        if rows % world_size:
            raise ValueError(f"batches[{i}]: {rows} rows do not split evenly over {world_size} ranks")
        part = slice_batch(batch, rank * rows // world_size, (rank + 1) * rows // world_size)
        local.append(tree_map_only(Tensor, torch.clone, part))
    return local


def distribute_step(step: TrainingStep, group: ProcessGroup | None = None) -> TrainingStep:
    """Make a step built for the global batch (``build_step``) this rank's part of a W-rank step.

    Same weights and data as the single-process step for the seed: the strategy runs on the
    distributed objective and this rank's shard; the optimizer keeps the same parameters.
    """
    name = step.config.strategy
    objective = distribute(step.workload.objective, group, gather=gathers(name))
    step.strategy = step.config.build_strategy(objective, step.scaler)
    step.batches = shard(step.batches, dist.get_rank(group), dist.get_world_size(group))
    return step


def ddp_bucket_bytes(encoders: Sequence[nn.Module]) -> int:
    """Bytes DDP holds for gradient buckets once each distinct encoder is wrapped: a copy of its gradients,
    unless they are bucket views. Plain modules count as they would once wrapped (the estimator's case)."""
    return sum(
        p.numel() * p.element_size()
        for m in distinct(encoders)
        if not getattr(m, "gradient_as_bucket_view", False)
        for p in m.parameters()
        if p.requires_grad
    )
