"""The loss's own memory: what its forward and backward hold above the representations they start from.

A step's peak mixes the encoders' activations with the loss's, and strategies differ in when the loss
runs; a tiled loss changes only the second. So it is measured apart: the step's loss as the step calls
it (on W ranks the local or the gathered one) on representations of the step's shapes, under the
dispatch tracker. Memory depends on shapes, not values, so the same function runs on a real device
(the sweep) and under fake tensors (the estimate). What it counts: the score matrix or its tiles, the
softmax and its gradient, normalised copies, and the representations' gradients (GradCache's cache).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gcbench.cache.batching import batch_size, slice_batch
from gcbench.cache.engine import encode, unwrap_ddp
from gcbench.cache.loss import contrastive_loss
from gcbench.device import autocast
from gcbench.measure.tracker import MemoryTracker
from gcbench.training import TrainingStep


def representations(step: TrainingStep, rows: list[int]) -> list[Tensor]:
    """Random representations of ``rows`` rows each, of the step's widths and dtypes: one row of each input
    encoded (no graph, random state left as it was) gives the width and dtype."""
    objective = step.strategy.objective
    reps = []
    with torch.random.fork_rng(devices=[step.device] if step.device.type == "cuda" else []), torch.no_grad():
        for i, (encoder, batch, count) in enumerate(zip(objective.encoders, step.batches, rows)):
            with autocast(step.config.precision, step.device):
                one = encode(unwrap_ddp(encoder), slice_batch(batch, 0, 1), objective.get_rep, f"encoders[{i}]")
            reps.append(torch.randn((count, *one.shape[1:]), dtype=one.dtype, device=one.device))
    return reps


def loss_memory(step: TrainingStep, block_size: int = 1) -> int | None:
    """Peak bytes of the step's loss, forward and backward, above the representations it is given, at the
    rows the strategy gives it at once (``accumulate``: a micro-batch); None for a strategy that computes a
    loss of its own (a peer's)."""
    rows = step.strategy.loss_rows([batch_size(b, f"batches[{i}]") for i, b in enumerate(step.batches)])
    if rows is None:
        return None
    reps = [rep.requires_grad_() for rep in representations(step, rows)]
    tracker = MemoryTracker(block_size=block_size)
    tracker.register(reps, "inputs")
    tracker.reset_peak()
    start = tracker.total
    with tracker:
        with autocast(step.config.precision, step.device):
            loss = contrastive_loss(step.strategy.objective.loss_fn, reps, {})
        loss.backward()
    step.zero_grad()  # the loss's own parameters (a temperature) got gradients
    return tracker.result().total - start
