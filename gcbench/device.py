"""Device and precision: which accelerator, which parameter dtype, which autocast."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from typing import Any, Literal, get_args

import torch

from gcbench.errors import UsageError

# bf16 and fp16: float32 weights under autocast; pure-bf16: bfloat16 weights, gradients and optimizer state (as
# large-embedder recipes train), no autocast and no loss scaling.
Precision = Literal["float64", "float32", "bf16", "fp16", "pure-bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``auto``: the accelerator if there is one, else CPU. Unavailable devices are a UsageError.

    An accelerator always comes back with its index (``cuda`` is ``cuda:N``, N the current device):
    some of CUDA's calls (``set_per_process_memory_fraction``) refuse a device without one.
    """
    if name == "auto":
        accelerator = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
        if accelerator is not None and torch.accelerator.is_available():
            return _indexed(accelerator)
        return _indexed(torch.device("cuda")) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device: {name!r} is not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device: {name} requested but this torch build sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device: {name} requested but only {torch.cuda.device_count()} CUDA devices exist")
    return _indexed(device)


def _indexed(device: torch.device) -> torch.device:
    index: int | None = device.index  # None for a bare "cuda", whatever the stubs say
    if device.type == "cpu" or index is not None:
        return device
    return torch.device(device.type, torch.get_device_module(device.type).current_device())


def point_threads(requested: int, device: torch.device) -> int:
    """Torch threads for one point (or rank): what the experiment asks, else one on CPU, where torch's
    default (every core) on a shared machine made a step 50x slower without a word; 0 elsewhere (torch's)."""
    if requested:
        return requested
    return 1 if device.type == "cpu" else 0


def oversubscribed(threads: int, processes: int = 1) -> str | None:
    """A note when ``threads`` x ``processes`` exceed the cores free now (cores less the 1-minute load,
    rounded up)."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return None
    free = max(0.0, cores - load)
    wanted = threads * processes
    if wanted <= math.ceil(free):  # a core half free still runs one thread
        return None
    threads_said = f"{wanted} torch thread{'s' if wanted != 1 else ''}"
    return f"{threads_said} with {free:.1f} of {cores} cores free (load {load:.1f}): times are stretched"


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


def float32_settings() -> dict[str, Any]:
    """What decides float32 arithmetic on CUDA (TF32 rounds matmul inputs to 10 bits of mantissa)."""
    return {
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


@contextlib.contextmanager
def exact_float32(precision: str, device: torch.device) -> Iterator[None]:
    """An exactness check in float32 (or float64) on CUDA runs with TF32 off, cuDNN's and matmul's, and
    "highest" matmul precision; the settings come back afterwards. Nothing changes elsewhere."""
    if device.type != "cuda" or precision not in ("float32", "float64"):
        yield
        return
    saved = float32_settings()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved["tf32_matmul"]
        torch.backends.cudnn.allow_tf32 = saved["tf32_cudnn"]
        torch.set_float32_matmul_precision(saved["float32_matmul_precision"])
