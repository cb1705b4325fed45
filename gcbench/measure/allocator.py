"""glibc's malloc made steady for timing: the process's own allocation history stops moving its times.

PyTorch's CPU allocator takes every tensor from malloc. glibc serves a large block (128 KiB and up,
a threshold it raises as such blocks are freed, up to 32 MiB) with a fresh ``mmap``, returns it to the
kernel on ``free``, and trims the heap's top past 128 KiB: each step then touches new pages, and a page
fault per 4 KiB costs what it costs that process at that moment. How much of a step that is depends on
the threshold the process's history has raised it to, so two processes timing the same step differ.

``steady`` (``sweep.malloc``) sets, in each point's process, before anything is timed: no ``mmap`` for
blocks (``M_MMAP_MAX`` 0: every block from the heap, reused once freed), no trimming below 1 GiB
(``M_TRIM_THRESHOLD``), and 64 MiB of padding whenever the heap grows (``M_TOP_PAD``): after the
warm-up the heap holds what a step needs, and later steps fault in few new pages. Memory figures do not
change (they are counted at PyTorch's allocator, not in the process's pages). Elsewhere than glibc
(macOS, musl) there is nothing to set and the times are the platform's own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4  # glibc's mallopt parameters (malloc.h)
STEADY = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 1 << 30, M_TOP_PAD: 64 << 20}
STEADY_DESCRIPTION = "glibc mallopt: no mmap for blocks, trim threshold 1 GiB, top pad 64 MiB"


def steady_allocator() -> str | None:
    """Make glibc's malloc steady in this process (see the module); what was set, or None where nothing could be."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not all(mallopt(parameter, value) == 1 for parameter, value in STEADY.items()):
        return None
    return STEADY_DESCRIPTION
