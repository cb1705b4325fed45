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
import inspect
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

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

    def kernels(self) -> contextlib.AbstractContextManager[object]:
        """The target's kernels for the ops whose memory differs from CPU's, scoped to this thread's calls."""
        return CudaAttention() if self.name == "cuda" else contextlib.nullcontext()


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


class CudaAttention(TorchFunctionMode):
    """Every ``scaled_dot_product_attention`` call runs CUDA's memory-efficient kernel while the mode is on:
    a function mode sees the call however the model reached the function (``F.``, or imported by name).

    A mode is off while it handles a call, so whatever runs inside a call it handles goes unseen; the
    backward pass is run with the mode back on, so a checkpoint's recomputation in it gets the kernel its
    forward got.
    """

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return _efficient_attention(*args, **kwargs)
        if func is torch.Tensor.backward or func is torch.autograd.backward:
            with self:
                _run_backward(func, args, kwargs)
            return None
        return func(*args, **kwargs)


def _run_backward(func: Any, args: Any, kwargs: Any) -> None:
    """What ``Tensor.backward`` and ``torch.autograd.backward`` do after their torch-function check (the mode
    would handle them again): the same gradients into the engine."""
    if func is torch.Tensor.backward:
        bound = inspect.signature(torch.Tensor.backward).bind(*args, **kwargs)
        tensors, grads = bound.arguments["self"], bound.arguments.get("gradient")
    else:
        bound = inspect.signature(torch.autograd.backward).bind(*args, **kwargs)
        tensors, grads = bound.arguments["tensors"], bound.arguments.get("grad_tensors")
    create = bool(bound.arguments.get("create_graph", False))
    retain = bound.arguments.get("retain_graph")
    inputs = bound.arguments.get("inputs")
    outputs = (tensors,) if isinstance(tensors, Tensor) else tuple(tensors)
    inputs = () if inputs is None else (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    grads = torch.autograd._make_grads(
        outputs, torch.autograd._tensor_or_tensors_to_tuple(grads, len(outputs)), is_grads_batched=False
    )
    torch.autograd.graph._engine_run_backward(
        outputs,
        grads,
        create if retain is None else retain,
        create,
        inputs,
        allow_unreachable=True,
        accumulate_grad=True,
    )
