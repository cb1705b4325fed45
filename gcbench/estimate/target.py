"""What differs on the device a prediction is for, modelled on CPU fake tensors.

Fake CUDA tensors abort a CPU-only build as soon as autograd runs, so every prediction runs on fake
CPU tensors and models the target's differences:

- ``cuda``: the caching allocator rounds every block up to 512 bytes; optimizers default to their
  ``foreach`` implementation (whole-list temporaries); masked attention in training runs the
  memory-efficient kernel, which keeps the output and one log-sum-exp per row instead of the
  L x L probabilities the CPU path stores; host-side RNG states are not device memory; cuBLAS's
  workspaces (:mod:`gcbench.estimate.workspaces`) are held beside the tensors.
- ``cpu``: raw bytes, the for-loop optimizer, CPU attention kernels, CPU RNG states counted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from gcbench.errors import UsageError
from gcbench.estimate.workspaces import HOPPER, workspace_bytes
from gcbench.measure.memory import CUDA_BLOCK
from gcbench.training import OptimizerConfig

TARGETS = ("cuda", "cpu")


@dataclass(frozen=True)
class Target:
    name: str
    block_size: int
    count_cpu_rng_states: bool
    foreach_optimizer: bool | None  # the optimizer implementation torch picks there by default
    workspace_bytes: int = 0  # held by the device's libraries, outside every tensor (cuBLAS)

    def optimizer(self, config: OptimizerConfig) -> OptimizerConfig:
        if config.foreach is None and self.foreach_optimizer is not None:
            return replace(config, foreach=self.foreach_optimizer)
        return config

    def kernels(self) -> contextlib.AbstractContextManager[None]:
        return _cuda_attention() if self.name == "cuda" else contextlib.nullcontext()


def target(name: str, capability: tuple[int, int] = HOPPER) -> Target:
    """``capability``: the CUDA device's compute capability (it sizes cuBLAS's workspaces)."""
    if name == "cuda":
        return Target("cuda", CUDA_BLOCK, False, foreach_optimizer=True, workspace_bytes=workspace_bytes(capability))
    if name == "cpu":
        return Target("cpu", 1, count_cpu_rng_states=True, foreach_optimizer=None)
    raise UsageError(f"--target: unknown target {name!r}; choose from {', '.join(TARGETS)}")


def _efficient_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """CUDA's kernel for masked attention in training (flash attention takes no mask)."""
    bias = None
    if attn_mask is not None:
        bias = attn_mask
        if bias.dtype == torch.bool:  # as CUDA's SDPA converts it: a float bias of the mask's shape
            bias = torch.zeros(attn_mask.shape, dtype=query.dtype).masked_fill(~attn_mask, float("-inf"))
        bias = bias.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    needs_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, bias, needs_lse, dropout_p, is_causal, scale=scale
    )[0]


@contextlib.contextmanager
def _cuda_attention() -> Iterator[None]:
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _efficient_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
