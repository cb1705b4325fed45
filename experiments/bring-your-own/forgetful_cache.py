"""A GradCache-style implementation as other libraries write one, checked by ``gcbench verify`` in CI.

``CachedLoss`` has the shape of the cached losses in public libraries: embed every mini-batch without a
graph, back-propagate the loss to the embeddings, then embed each mini-batch again with a graph and push
its slice of the cached gradients into the model. With ``replay_rng=False`` it has their most common bug:
the second pass does not restore the random state of the first, so dropout draws other masks and the
gradients are silently wrong. Wrapped as gcbench strategies (the few lines at the end), both run in
``gcbench verify``, ``sweep`` and ``estimate`` by import path:

    cd experiments/bring-your-own
    gcbench verify --strategies cache,forgetful_cache:ForgetfulCache,forgetful_cache:ReplayingCache
    # cache and ReplayingCache pass; ForgetfulCache FAILs, and verify exits 1
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gcbench import Strategy
from gcbench.cache import Objective, batch_size, call_encoder, chunk_bounds, slice_batch
from gcbench.strategies import chunk_order


class CachedLoss:
    """A third-party cached loss: ``encoders`` (one per input), ``loss_fn`` over their embeddings, mini-batches."""

    def __init__(
        self,
        encoders: Sequence[nn.Module],
        loss_fn: Callable[..., Tensor],
        mini_batch_sizes: Sequence[int],
        get_rep: Callable[[Any], Tensor] | None = None,
        replay_rng: bool = False,
    ) -> None:
        self.encoders, self.loss_fn, self.sizes = list(encoders), loss_fn, list(mini_batch_sizes)
        self.get_rep = get_rep or (lambda output: output)
        self.replay_rng = replay_rng

    def __call__(self, *batches: Any) -> Tensor:
        pieces = [self._pieces(batch, size) for batch, size in zip(batches, self.sizes)]
        states: list[list[Tensor]] = [[] for _ in batches]
        with torch.no_grad():  # pass 1: embeddings only
            embeddings = []
            for i, encoder in enumerate(self.encoders):
                parts = []
                for piece in pieces[i]:
                    states[i].append(torch.get_rng_state())
                    parts.append(self.get_rep(call_encoder(encoder, piece)))
                embeddings.append(torch.cat(parts).requires_grad_())
        loss = self.loss_fn(*embeddings)
        loss.backward()  # the cache: d loss / d embeddings
        for i, encoder in enumerate(self.encoders):  # pass 2: each mini-batch again, with its graph
            start = 0
            for piece, state in zip(pieces[i], states[i]):
                if self.replay_rng:
                    torch.set_rng_state(state)
                rep = self.get_rep(call_encoder(encoder, piece))
                cached = embeddings[i].grad
                assert cached is not None
                rep.backward(cached[start : start + rep.shape[0]])
                start += rep.shape[0]
        return loss.detach()

    @staticmethod
    def _pieces(batch: Any, size: int) -> list[Any]:
        return [slice_batch(batch, start, stop) for start, stop in chunk_bounds(batch_size(batch), size)]


# The gcbench side: a Strategy that states what the implementation claims to be and runs it. -----------


class ForgetfulCache(Strategy):
    """The cached loss as shipped (no RNG replay): claims to be exact, and verify shows it is not."""

    name = "forgetful-cache"
    exact = True
    uses_chunks = True
    caches_representations = True
    replay_rng = False

    def __init__(
        self,
        objective: Objective,
        chunk_sizes: int | Sequence[int] | None = None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        super().__init__(objective, chunk_sizes, scaler)
        assert self.chunk_sizes is not None
        self.loss = CachedLoss(
            objective.encoders, objective.loss_fn, self.chunk_sizes, objective.get_rep, self.replay_rng
        )

    def forward_backward(self, batches: Sequence[Any], **loss_kwargs: Any) -> Tensor:
        return self.loss(*batches)

    def encode_order(self, sizes: Sequence[int]) -> list[tuple[int, slice]]:
        """Its first pass: every mini-batch of input 0, then of input 1 (the reference draws the same masks)."""
        assert self.chunk_sizes is not None
        return chunk_order(sizes, self.chunk_sizes)


class ReplayingCache(ForgetfulCache):
    """The same loss with the fix: the random state of each mini-batch restored before it is embedded again."""

    name = "replaying-cache"
    replay_rng = True
