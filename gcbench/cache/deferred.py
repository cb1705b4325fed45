"""GradCache split at the loss, for trainers that call ``backward`` themselves.

A trainer (Hugging Face's, sentence-transformers', Lightning's) asks for a loss and then runs
``backward`` on it in its own way: divided by the gradient-accumulation steps, multiplied by a
GradScaler's scale, through its precision plugin, outside the autocast of the forward.
:class:`DeferredGradCache` fits that loop: its call runs step 1 (every chunk encoded without a graph,
the last ``keep_graphs`` with theirs) and builds the loss over the representations; it returns that
loss, detached, as a leaf whose backward runs steps 2 and 3. The gradient that reaches the loss is
whatever the trainer made of it (``scale / accumulation_steps``), so the cache carries exactly the
factor the trainer applies, and a loss's own parameters (a learnable temperature) get theirs with it.
Step 3 re-enters the autocast state of the call, so a trainer whose backward runs after its autocast
has exited does not re-encode in another precision than the first pass (pylate PR #242).

Each encoder is called as given: pass unwrapped modules and sync gradients once after the push
(``on_pushed``), or DDP-wrapped ones to let the engine sync on their last chunk.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gcbench.cache.batching import Batch
from gcbench.cache.engine import GetRep, GradCache, KeepGraphs, OnReps, _Plan
from gcbench.cache.loss import contrastive_loss
from gcbench.cache.rng import RngState


@dataclass(frozen=True)
class AutocastState:
    """Whether autocast is on, and in which dtype, for each device type a step uses."""

    states: tuple[tuple[str, bool, torch.dtype], ...]

    @classmethod
    def capture(cls, devices: Sequence[torch.device] | frozenset[torch.device]) -> AutocastState:
        types = sorted({device.type for device in devices} | {"cpu"})
        return cls(tuple((t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in types))

    def enter(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for device_type, enabled, dtype in self.states:
            stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
        return stack


class DeferredGradCache(GradCache):
    """:class:`GradCache` whose steps 2 and 3 run in the backward of the loss it returns.

    ``on_pushed``: called after step 3 of every backward (where a trainer syncs gradients once).
    ``on_reps`` as in :class:`GradCache` (called in the call, once the loss is built); the representations
    of the last call also stay readable as :attr:`last_reps` (detached, no copy), for metrics.
    """

    def __init__(
        self,
        encoders: nn.Module | Sequence[nn.Module],
        loss_fn: Callable[..., Tensor],
        chunk_size: int | Sequence[int],
        *,
        get_rep: GetRep | None = None,
        keep_graphs: KeepGraphs = 1,
        on_reps: OnReps | None = None,
        on_pushed: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(encoders, loss_fn, chunk_size, get_rep=get_rep, keep_graphs=keep_graphs, on_reps=on_reps)
        self.on_pushed = on_pushed
        self.last_reps: list[Tensor] = []

    def __call__(self, *batches: Batch, **loss_kwargs: Any) -> Tensor:
        if len(batches) != len(self.encoders):
            raise ValueError(f"batches: got {len(batches)} batches for {len(self.encoders)} encoders")
        if not torch.is_grad_enabled():  # evaluation: the loss alone, one forward per chunk
            plan = _Plan.make(self.encoders, self.wrappings, batches, self.chunk_sizes, 0, self.chunk_tokens)
            reps = self._encode_without_graph(plan)[0]
            self.last_reps = [rep.detach() for rep in reps]
            return contrastive_loss(self.loss_fn, reps, loss_kwargs).detach()
        self._warn_batchnorm()
        plan = _Plan.make(self.encoders, self.wrappings, batches, self.chunk_sizes, self.keep_graphs, self.chunk_tokens)
        autocast = AutocastState.capture(plan.devices)
        reps, kept, rng_states = self._encode_without_graph(plan)
        self.last_reps = [rep.detach() for rep in reps]
        loss = contrastive_loss(self.loss_fn, reps, loss_kwargs)
        if self.on_reps is not None:
            with torch.no_grad():
                self.on_reps(tuple(self.last_reps))
        handle = loss.detach().requires_grad_()

        def push(grad: Tensor) -> None:
            rng_after = RngState.capture(plan.devices)
            loss.backward(grad)  # step 2, with the trainer's factor in ``grad``
            with torch.enable_grad(), autocast.enter():  # a backward hook runs with grad mode off
                self._push_gradients(plan, reps, kept, rng_states)  # step 3
            rng_after.restore()
            if self.on_pushed is not None:
                self.on_pushed()

        handle.register_hook(push)
        return handle
