"""Per-layer activation checkpointing for any model, with torch's own ``checkpoint_wrapper``.

Hugging Face models and gcbench's have a switch of their own; any other model gets its layers wrapped: the
ones of the classes named, else its repeated layers (:func:`~gcbench.cache.layers.repeated_layers`). The
wrapper is torch's non-reentrant checkpoint, which saves the RNG state with each layer's inputs and
restores it for the recomputation, so a layer's dropout draws the same masks in backward as in forward.
Under GradCache that composes with the cache's own RNG replay: each re-encoded chunk is checkpointed
layer by layer, and holds one layer's activations plus the layer inputs instead of the chunk's whole graph.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    checkpoint_wrapper,
)

from gcbench.cache.layers import layers_of_class, repeated_layers


def checkpoint_layers(model: nn.Module, classes: Sequence[str] | None = None) -> int:
    """Wrap ``model``'s layers (those of ``classes``, else its repeated layers) in checkpoints; how many.

    Layers already checkpointed (or inside a checkpointed layer) are left alone, so calling it twice wraps
    nothing more and no checkpoint is nested in another.
    """
    targets = layers_of_class(model, tuple(classes)) if classes else repeated_layers(model)
    inside = {id(m) for w in model.modules() if isinstance(w, CheckpointWrapper) for m in w.modules()}
    wanted = {id(t) for t in targets if id(t) not in inside}
    wrapped = 0
    for parent in list(model.modules()):
        if id(parent) in inside:
            continue
        for name, child in list(parent.named_children()):
            if id(child) in wanted:
                setattr(parent, name, checkpoint_wrapper(child, checkpoint_impl=CheckpointImpl.NO_REENTRANT))
                wanted.discard(id(child))
                wrapped += 1
    return wrapped


def uncheckpoint_layers(model: nn.Module) -> int:
    """Put back every layer :func:`checkpoint_layers` wrapped; how many."""
    restored = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, CheckpointWrapper):
                setattr(parent, name, child._checkpoint_wrapped_module)
                restored += 1
    return restored


def has_checkpointed_layers(model: nn.Module) -> bool:
    return any(isinstance(m, CheckpointWrapper) for m in model.modules())
