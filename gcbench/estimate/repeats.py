"""Skip chunks whose memory pattern is a copy of one already run: seconds per point, not minutes.

GradCache at batch 4096 with chunks of 8 encodes 1 500 chunks twice; under fake tensors that is
minutes. But a chunk's memory pattern repeats exactly once the buffers it fills exist: the first
call of a kind allocates them (the representation buffer, the parameters' ``.grad``), the second
runs in the steady state, and every later call of the same kind (grad mode and input shapes) is
the same as the second. So each encoder slot runs the first two calls of a kind for real and answers
later ones with an output of the recorded shape. Chunk sizes that differ (the short last chunk,
the last chunk's kept graph) are kinds of their own and always run. The engine's own bookkeeping
(slicing, RNG states, copying into the buffer) still runs for every chunk.

A call made while an earlier graph of the same slot is still held (GradCache's kept first-pass
graphs, ``keep_graphs`` > 1) always runs for real: its activations pile up on the held ones, which no
earlier call's pattern shows.
"""

from __future__ import annotations

import weakref
from collections import Counter
from typing import Any

import torch
from torch import Tensor, nn

from gcbench.cache.batching import map_tensors
from gcbench.cache.engine import GetRep
from gcbench.cache.objective import Objective
from gcbench.strategies import set_checkpointing

REAL_CALLS = 2


class RepeatSkipper(nn.Module):
    """One encoder slot (a tied encoder gets one per input, sharing the module)."""

    def __init__(self, encoder: nn.Module, get_rep: GetRep | None) -> None:
        super().__init__()
        self.encoder = encoder
        self.get_rep = get_rep
        self.calls: Counter[tuple[Any, ...]] = Counter()
        self.shapes: dict[tuple[Any, ...], tuple[torch.Size, torch.dtype, torch.device]] = {}
        self.held: list[weakref.ref[Tensor]] = []  # outputs of real calls whose graphs may still be alive

    @property
    def gradient_checkpointing(self) -> bool:  # so the checkpoint strategy reaches the real encoder
        return bool(getattr(self.encoder, "gradient_checkpointing", False))

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        set_checkpointing(self.encoder, enabled)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        kind = (
            torch.is_grad_enabled(),
            tuple(map(_describe, args)),
            tuple((key, _describe(value)) for key, value in sorted(kwargs.items())),
        )
        self.calls[kind] += 1
        self.held = [ref for ref in self.held if ref() is not None]
        if self.calls[kind] <= REAL_CALLS or (torch.is_grad_enabled() and self.held):
            output = self.encoder(*args, **kwargs)
            rep = self.get_rep(output) if self.get_rep is not None else output
            if isinstance(rep, Tensor):
                self.shapes[kind] = (rep.shape, rep.dtype, rep.device)
                if rep.requires_grad:
                    self.held.append(weakref.ref(rep))
            return rep
        shape, dtype, device = self.shapes[kind]
        return torch.empty(shape, dtype=dtype, device=device, requires_grad=torch.is_grad_enabled())


def _describe(value: Any) -> str:
    """What of an argument shapes the call's memory: its tensors' shapes, at any depth, and its other values."""
    return repr(map_tensors(lambda tensor: tuple(tensor.shape), value))


def skipping_objective(objective: Objective) -> Objective:
    """The same objective with every encoder slot behind its own :class:`RepeatSkipper`."""
    slots: list[nn.Module] = [RepeatSkipper(encoder, objective.get_rep) for encoder in objective.encoders]
    return Objective(slots, objective.loss_fn, get_rep=None)
