"""One rank of W, predicted in one process: local rows, the gathered representations, DDP's buckets.

A rank's step differs from a single process's in three ways that cost memory: its encoders see
``B / W`` rows; the exact strategies' loss sees all ``B`` rows, gathered (``W x B/W x d`` per input,
and its own rows' logits against them, or for a loss that cannot split by rows all of them); DDP holds
gradient-sized buffers. The first is the local batch size; the second is the rank's own loss
(:func:`~gcbench.distributed.rank_loss`, unchanged) run as rank 0 of a fake process group
(:func:`fake_world`: torch's ``fake`` backend, whose collectives move nothing but whose output tensors
are allocated as for real); the third is added as :data:`DDP_GRADIENT_COPIES` copies of the encoders'
gradients: measured with gloo on CPU, a rank held its buckets (allocated when DDP wraps the model)
and a second gradient-sized buffer from the all-reduce on, through the optimizer step, at every peak
measured.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.distributed as dist

from gcbench.cache.objective import Objective
from gcbench.distributed.objective import rank_loss
from gcbench.errors import EstimateError

DDP_GRADIENT_COPIES = 2


@contextlib.contextmanager
def fake_world(world_size: int) -> Iterator[None]:
    """This process as rank 0 of ``world_size`` in a fake process group, for the span of one prediction."""
    if dist.is_initialized():
        raise EstimateError(
            "a rank's prediction runs in a fake process group of its own: call it outside an initialised one"
        )
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the backend's constructor too

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def gathering_objective(objective: Objective, world_size: int) -> Objective:
    """``objective`` with the loss a rank computes (:func:`~gcbench.distributed.rank_loss`: the local loss
    for gcbench's losses, the gathered one for others), to be run inside :func:`fake_world` of ``world_size``."""
    loss = rank_loss(objective.loss_fn)
    return Objective(objective.encoders, loss, objective.get_rep)
