"""Count the collectives a step issues: calls and bytes, by kind, on this rank.

Every torch.distributed collective (DDP's buckets, FSDP2's all-gathers and reduce-scatters, DeepSpeed's
reductions, gcbench's own gathers) reaches the dispatcher as a ``c10d`` op, so a dispatch mode sees them
all, with their tensors, whichever library issued them. A call's bytes are those of its largest tensor
argument: the whole (unsharded) buffer for an all-gather or a reduce-scatter, the buffer itself for an
all-reduce or a broadcast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# c10d op name -> kind; the functional (``_c10d_functional``) ops are named the same way
_KINDS = {
    "allgather": "all_gather",
    "_allgather_base": "all_gather",
    "allgather_into_tensor_coalesced": "all_gather",
    "all_gather_into_tensor": "all_gather",
    "all_gather_into_tensor_coalesced": "all_gather",
    "reduce_scatter": "reduce_scatter",
    "_reduce_scatter_base": "reduce_scatter",
    "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
    "allreduce": "all_reduce",
    "allreduce_coalesced": "all_reduce",
    "all_reduce": "all_reduce",
    "all_reduce_coalesced": "all_reduce",
    "broadcast": "broadcast",
    "reduce": "reduce",
    "alltoall": "all_to_all",
    "alltoall_base": "all_to_all",
    "all_to_all_single": "all_to_all",
    "gather": "gather",
    "scatter": "scatter",
}
_NAMESPACES = ("c10d", "_c10d_functional")


@dataclass
class Collectives:
    """Calls and bytes per kind of collective (``all_gather``, ``reduce_scatter``, ``all_reduce``, ...)."""

    calls: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, nbytes: int) -> None:
        self.calls[kind] = self.calls.get(kind, 0) + 1
        self.bytes[kind] = self.bytes.get(kind, 0) + nbytes

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {"calls": dict(sorted(self.calls.items())), "bytes": dict(sorted(self.bytes.items()))}


def collective_kind(op_name: str) -> str | None:
    """``c10d::_reduce_scatter_base_`` -> ``reduce_scatter``; None for anything that is not a collective."""
    namespace, _, name = op_name.partition("::")
    if namespace not in _NAMESPACES:
        return None
    return _KINDS.get(name.split(".")[0].rstrip("_"))


class CountCollectives(TorchDispatchMode):
    """``with CountCollectives() as counted: step()``; then ``counted.collectives``."""

    def __init__(self) -> None:
        super().__init__()
        self.collectives = Collectives()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kind = collective_kind(func.name()) if hasattr(func, "name") else None
        if kind is not None:
            sizes = [t.numel() * t.element_size() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            self.collectives.add(kind, max(sizes, default=0))
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> CountCollectives:
        super().__enter__()
        return self
