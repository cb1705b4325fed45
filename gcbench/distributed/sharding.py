"""Wrap a model for W ranks as each sharded engine does, and read its full gradients back.

- :func:`shard_fsdp2`: ``fully_shard`` on each repeated layer (:func:`~gcbench.cache.layers.repeated_layers`)
  and on the root: one sharded unit per layer, the rest (embeddings, pooler) in the root's unit;
- :func:`deepspeed_engine`: ``deepspeed.initialize`` at a ZeRO stage with AdamW, on CPU (``DS_ACCELERATOR=cpu``,
  ``torch_adam``) as on CUDA; it joins the process group already running;
- :func:`full_gradients`: each parameter's whole gradient on every rank, whatever holds it (a plain
  ``.grad``, an FSDP2 ``DTensor``, a ZeRO partition).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gcbench.cache.layers import repeated_layers
from gcbench.cache.sharded import fsdp_modules, is_deepspeed_engine
from gcbench.errors import UsageError

ZERO_STAGES = (0, 1, 2, 3)


def shard_fsdp2(model: nn.Module, units: Sequence[nn.Module] | None = None) -> nn.Module:
    """``fully_shard`` each of ``units`` (default: the repeated layers), then the root; returns the root."""
    from torch.distributed.fsdp import fully_shard

    for unit in repeated_layers(model) if units is None else units:
        if unit is not model:
            fully_shard(unit)
    fully_shard(model)
    return model


def deepspeed_engine(
    model: nn.Module,
    stage: int,
    device: torch.device,
    *,
    lr: float = 1e-3,
    micro_batch: int = 1,
    zero: dict[str, Any] | None = None,
) -> Any:
    """A DeepSpeed engine over ``model`` at ZeRO ``stage`` (0-3) with AdamW, in this rank's process group;
    ``zero``: more ``zero_optimization`` settings (bucket sizes, say)."""
    if stage not in ZERO_STAGES:
        raise ValueError(f"ZeRO stage must be one of {ZERO_STAGES}, got {stage!r}")
    deepspeed = import_deepspeed(device)
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    for name, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", rank), ("LOCAL_WORLD_SIZE", world)):
        os.environ.setdefault(name, str(value))  # what deepspeed.initialize checks for; the group is up already
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage, **(zero or {})},
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "torch_adam": True}},
        "wall_clock_breakdown": False,
    }
    trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters only
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)
    return engine


def import_deepspeed(device: torch.device) -> Any:
    """``deepspeed``, told which accelerator before it loads; a missing package is a usage error."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    try:
        import deepspeed
    except ImportError:
        raise UsageError("sharding: ZeRO needs deepspeed; pip install 'gcbench[deepspeed]'") from None
    deepspeed.utils.logger.setLevel(logging.WARNING)
    return deepspeed


def full_gradients(module: nn.Module) -> list[Tensor]:
    """Every parameter's whole gradient (zeros where it has none), in ``named_parameters`` order."""
    if is_deepspeed_engine(module):
        from deepspeed.utils import safe_get_full_grad

        inner: nn.Module = module.module  # type: ignore[assignment]
        grads = [safe_get_full_grad(p) for p in inner.parameters()]
        params = list(inner.parameters())
    else:
        params = list(module.parameters())
        grads = [p.grad for p in params]
        if fsdp_modules(module):
            grads = [g.full_tensor() if g is not None and hasattr(g, "full_tensor") else g for g in grads]
    return [
        (g.detach().clone() if g is not None else torch.zeros(_full_shape(p), dtype=p.dtype))
        for g, p in zip(grads, params)
    ]


def _full_shape(param: Tensor) -> torch.Size:
    ds_shape = getattr(param, "ds_shape", None)  # a ZeRO-3 parameter's own shape (its data is a partition)
    return torch.Size(ds_shape) if ds_shape is not None else param.shape
