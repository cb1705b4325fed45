"""Device and precision: which accelerator, which parameter dtype, which autocast."""

from __future__ import annotations

import contextlib
from typing import Any, Literal, get_args

import torch

from gcbench.errors import UsageError

# bf16 and fp16: float32 weights under autocast; pure-bf16: bfloat16 weights, gradients and optimizer state (as
# large-embedder recipes train), no autocast and no loss scaling.
Precision = Literal["float64", "float32", "bf16", "fp16", "pure-bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``auto``: the accelerator if there is one, else CPU. Unavailable devices are a UsageError."""
    if name == "auto":
        accelerator = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
        if accelerator is not None and torch.accelerator.is_available():
            return accelerator
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device: {name!r} is not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device: {name} requested but this torch build sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device: {name} requested but only {torch.cuda.device_count()} CUDA devices exist")
    return device


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise UsageError(f"--precision: unknown value {precision!r}; choose from {', '.join(PRECISIONS)}")
    return precision


def param_dtype(precision: str) -> torch.dtype:
    """Parameters are float64 for a float64 run, bfloat16 for pure-bf16, float32 otherwise (autocast does the rest)."""
    return {"float64": torch.float64, "pure-bf16": torch.bfloat16}.get(precision, torch.float32)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if precision in _AUTOCAST:
        return torch.autocast(device_type=device.type, dtype=_AUTOCAST[precision])
    return contextlib.nullcontext()


def grad_scaler(precision: str, device: torch.device, init_scale: float = 2.0**16) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling; the other precisions do not."""
    return torch.amp.GradScaler(device.type, init_scale=init_scale) if precision == "fp16" else None


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.get_device_module(device.type).synchronize(device)
