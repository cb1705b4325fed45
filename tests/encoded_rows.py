"""What an encoder was called on, against what a strategy's ``encode_order`` declares: the rows themselves,
not only how many (right sizes from the wrong rows would pass a count)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from gcbench.cache.batching import slice_batch


def record_calls(encoders: Sequence[nn.Module]) -> tuple[list[tuple[int, list[Tensor]]], list[Any]]:
    """``(calls, hooks)``: each forward of ``encoders[i]`` appends ``(i, its input tensors)``."""
    calls: list[tuple[int, list[Tensor]]] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict, index: int) -> None:
        leaves = [t.detach().clone() for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        calls.append((index, leaves))

    hooks = [
        encoder.register_forward_pre_hook(lambda m, a, k, i=i: hook(m, a, k, i), with_kwargs=True)
        for i, encoder in enumerate(encoders)
    ]
    return calls, hooks


def mismatches(calls: Sequence[tuple[int, list[Tensor]]], declared: Sequence[tuple[int, slice]], batches) -> list[str]:
    """Where the first ``len(declared)`` calls differ from the declared (input, rows): every tensor of the
    declared rows of that input must be among the call's inputs, value for value."""
    problems = []
    if len(calls) < len(declared):
        problems.append(f"{len(calls)} calls for {len(declared)} declared steps")
    for step, ((index, seen), (want, rows)) in enumerate(zip(calls, declared)):
        expected = [
            t for t in pytree.tree_leaves(slice_batch(batches[want], rows.start, rows.stop)) if isinstance(t, Tensor)
        ]
        if index != want:
            problems.append(f"step {step}: encoder {index} called, {want} declared")
        elif not all(any(_same_rows(s, e) for s in seen) for e in expected):
            problems.append(f"step {step}: encoder {index} saw other rows than {rows.start}:{rows.stop}")
    return problems


def _same_rows(seen: Tensor, expected: Tensor) -> bool:
    """The same rows, value for value; a peer that trims trailing padding per mini-batch (sentence-transformers
    does) may pass fewer columns of them."""
    if seen.dim() != expected.dim() or seen.shape[:-1] != expected.shape[:-1] or seen.shape[-1] > expected.shape[-1]:
        return False
    return torch.equal(seen, expected[..., : seen.shape[-1]])


def swap_two_equal_steps(declared: Sequence[tuple[int, slice]]) -> list[tuple[int, slice]]:
    """The declared order with two steps of one input and the same size exchanged: the same sizes in the
    same order, other rows (the control a size-only comparison would not catch)."""
    order = list(declared)
    for a in range(len(order)):
        for b in range(a + 1, len(order)):
            (i, x), (j, y) = order[a], order[b]
            if i == j and x.stop - x.start == y.stop - y.start and x != y:
                order[a], order[b] = order[b], order[a]
                return order
    raise ValueError("no two steps of one input with the same size to swap")
