"""What the three integrations share: their arguments checked, the cached step, one gradient sync per step.

Every integration runs :class:`~gcbench.cache.deferred.DeferredGradCache` on the *unwrapped* modules
and lets the framework run ``backward`` on the loss it returns, so the framework's own accumulation
factor, GradScaler and precision plugin apply. Under DDP no chunk's backward goes through DDP's
reducer: gradients accumulate locally over every chunk (and every micro-batch of an accumulation
window), and one all-reduce of all of them, flattened, averages them over the ranks on the last
micro-batch, as DDP's own would. One reducer armed per chunk would all-reduce once per chunk (the
sentence-transformers issue #4027), and armed on the last chunk alone it cannot see a two-tower model's
other tower (its gradients would stay local, silently).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.parallel import DistributedDataParallel

from gcbench.cache.deferred import DeferredGradCache
from gcbench.cache.engine import GetRep, KeepGraphs, as_chunk_sizes, check_keep_graphs
from gcbench.errors import UsageError


def check_chunk_size(value: Any, count: int | None = None, name: str = "chunk_size") -> int | tuple[int, ...]:
    """An int >= 1 or one per input; a UsageError naming ``name`` otherwise."""
    try:
        sizes = as_chunk_sizes(value, count if count is not None else 1, name)
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None
    return sizes[0] if count is None else sizes


def check_inputs(inputs: Any, loss_fn: Any) -> tuple[str, ...]:
    """The batch keys of the inputs, in the loss's order; ``loss_fn`` callable. UsageErrors name the argument."""
    if not callable(loss_fn):
        raise UsageError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if isinstance(inputs, str) or not inputs or not all(isinstance(name, str) for name in inputs):
        raise UsageError(f"inputs must be a non-empty sequence of batch keys, got {inputs!r}")
    return tuple(inputs)


def check_keep(value: Any, name: str = "keep_graphs") -> KeepGraphs:
    try:
        return check_keep_graphs(value, name)
    except ValueError as error:
        raise UsageError(str(error)) from None


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside DDP (and inside ``torch.compile``'s wrapper), the one a chunk is encoded with."""
    while True:
        if isinstance(module, DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        else:
            return module


class GradientSync:
    """One all-reduce (mean over the ranks) of every trainable parameter's gradient, flattened.

    ``parameters``: the model's, in one order on every rank. A parameter no chunk reached counts as
    zeros (so every rank flattens the same layout). Parameters of several dtypes or devices take one
    all-reduce per kind. ``calls`` counts the syncs, for tests.
    """

    def __init__(self, parameters: Iterable[nn.Parameter], group: Any = None) -> None:
        self.parameters = [p for p in parameters if p.requires_grad]
        self.group = group
        self.calls = 0

    def __call__(self) -> None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(self.group) == 1:
            return
        kinds: dict[tuple[torch.dtype, torch.device], list[nn.Parameter]] = {}
        for param in self.parameters:
            kinds.setdefault((param.dtype, param.device), []).append(param)
        for params in kinds.values():
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = _flatten_dense_tensors(grads)
            flat.div_(dist.get_world_size(self.group))  # DDP's order: divide, then sum
            dist.all_reduce(flat, group=self.group)
            for param, reduced in zip(params, _unflatten_dense_tensors(flat, grads)):
                if param.grad is None:
                    param.grad = reduced
                else:
                    param.grad.copy_(reduced)
        self.calls += 1


def cached_loss(
    encoders: Sequence[nn.Module],
    loss_fn: Callable[..., Tensor],
    batches: Sequence[Any],
    chunk_sizes: int | Sequence[int],
    keep_graphs: KeepGraphs,
    *,
    get_rep: GetRep | None = None,
    sync: Callable[[], None] | None = None,
    **loss_kwargs: Any,
) -> tuple[Tensor, DeferredGradCache]:
    """The loss over ``batches`` whose backward pushes the cache into ``encoders`` (unwrapped) and then syncs."""
    cache = DeferredGradCache(
        [unwrap(e) for e in encoders], loss_fn, chunk_sizes, get_rep=get_rep, keep_graphs=keep_graphs, on_pushed=sync
    )
    return cache(*batches, **loss_kwargs), cache


def syncing(model: nn.Module) -> bool:
    """Whether this backward should all-reduce: DDP outside its ``no_sync`` (the last micro-batch of a step)."""
    return isinstance(model, DistributedDataParallel) and model.require_backward_grad_sync
