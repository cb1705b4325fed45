"""The technique: GradCache and the pieces every strategy shares (batches, RNG replay, the loss, the objective)."""

from gcbench.cache.batching import Batch, batch_size, call_encoder, chunk_bounds, slice_batch
from gcbench.cache.engine import CachedStep, GradCache, encode
from gcbench.cache.loss import contrastive_loss
from gcbench.cache.objective import Objective
from gcbench.cache.rng import RngState

__all__ = [
    "Batch",
    "CachedStep",
    "GradCache",
    "Objective",
    "RngState",
    "batch_size",
    "call_encoder",
    "chunk_bounds",
    "contrastive_loss",
    "encode",
    "slice_batch",
]
