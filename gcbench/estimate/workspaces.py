"""cuBLAS's workspaces: device memory a CUDA step holds that no tensor owns, so the tracker cannot see it.

PyTorch gives every cuBLAS handle, per stream, a workspace from the caching allocator the first time
the handle runs a product; it stays allocated (``max_memory_allocated`` counts it) until the process
ends. A training step uses two handles: the thread that runs the forward and autograd's thread for the
device, which runs the backward. Sizes, as PyTorch's ``CublasHandlePool.cpp`` chooses them
(``getChosenWorkspaceSize``; torch 2.4 to 2.11):

- ``CUBLAS_WORKSPACE_CONFIG`` when set: ``:SIZE:COUNT`` pairs in KiB, summed (``:4096:8`` is 32 MiB);
- otherwise ``:4096:2:16:8`` (8 MiB + 128 KiB), or 32 MiB on compute capability 9 to 12 (Hopper,
  Blackwell), which is what NVIDIA's cuBLAS guide recommends there (``cublasSetWorkspace``: 32 MiB
  for Hopper, 4 MiB elsewhere).
- cuBLASLt shares the cuBLAS workspace (``TORCH_CUBLASLT_UNIFIED_WORKSPACE``, on unless set to 0);
  with it off, each handle adds ``CUBLASLT_WORKSPACE_SIZE`` KiB (default 1024).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

KIB = 1024
HOPPER = (9, 0)  # the capability assumed when none is given (the card gcbench's GPU runs are lent)
HANDLES = 2  # the forward's thread and autograd's device thread
_DEFAULT = 4096 * KIB * 2 + 16 * KIB * 8
_LARGE = 4096 * KIB * 8
_LT_DEFAULT_KIB = 1024


def cublas_workspace_bytes(capability: tuple[int, int] = HOPPER, environ: Mapping[str, str] = os.environ) -> int:
    """One handle's cuBLAS workspace on a device of ``capability``."""
    config = environ.get("CUBLAS_WORKSPACE_CONFIG")
    if config:
        pairs = re.findall(r":([0-9]+):([0-9]+)", config)
        if pairs:
            return sum(int(size) * KIB * int(count) for size, count in pairs)
    return _LARGE if 9 <= capability[0] <= 12 else _DEFAULT


def cublaslt_extra_bytes(environ: Mapping[str, str] = os.environ) -> int:
    """What one handle's cuBLASLt workspace adds to its cuBLAS one (nothing while they are unified)."""
    if environ.get("TORCH_CUBLASLT_UNIFIED_WORKSPACE", "1").strip().lower() not in ("0", "false", "off", "no"):
        return 0
    try:
        return int(environ.get("CUBLASLT_WORKSPACE_SIZE", _LT_DEFAULT_KIB)) * KIB
    except ValueError:  # torch warns and keeps its default
        return _LT_DEFAULT_KIB * KIB


def workspace_bytes(capability: tuple[int, int] = HOPPER, environ: Mapping[str, str] = os.environ) -> int:
    """The workspaces a warmed-up training step holds on one CUDA device."""
    return HANDLES * (cublas_workspace_bytes(capability, environ) + cublaslt_extra_bytes(environ))
