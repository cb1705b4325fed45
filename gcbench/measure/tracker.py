"""Dispatch-level memory accounting: every tensor storage an op creates, by category, with the peak.

It sees what goes through PyTorch's dispatcher, so it runs unchanged on real tensors (the sweep's
breakdown of a measured step) and on fake ones (``gcbench estimate``, which allocates nothing).
A storage is counted once however many views share it, from the op that creates it until it is
freed. ``block_size`` models an allocator's rounding (CUDA's caching allocator: 512 bytes).

Categories: ``parameters``, ``gradients``, ``optimizer`` (state) and ``inputs`` are registered up
front (and gradients re-tagged as autograd accumulates them); a new storage is an ``activation``
when created in forward, a ``temporary`` when created inside backward or the optimizer step.

One allocation bypasses the dispatcher: ``torch.get_rng_state()`` (5 KiB of CPU memory a call, one
per chunk in GradCache, one per layer under checkpointing). ``count_cpu_rng_states`` counts it, for a
CPU target; on a GPU it is host memory, outside ``max_memory_allocated``. It is seen returning through
a profile function of this thread (``sys.setprofile``, set only while counting, chained to any other,
and off inside each op, where the fake tensors' Python dispatch would make it costly): no module
attribute is replaced, so other threads are unaffected and callers that imported it by name are seen.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_GET_RNG_STATE = torch.random.get_rng_state.__code__  # torch.get_rng_state, whatever name it is called by
CATEGORIES = ("parameters", "gradients", "optimizer", "inputs", "activations", "temporaries")
PHASES = ("forward_backward", "optimizer")


@dataclass(frozen=True)
class TrackedPeak:
    """The peak over a tracked region: total bytes and what they were at that moment."""

    total: int
    breakdown: dict[str, int]
    phase_peaks: dict[str, int]


class MemoryTracker(TorchDispatchMode):
    def __init__(self, block_size: int = 1, count_cpu_rng_states: bool = False) -> None:
        super().__init__()
        self.block_size = block_size
        self.count_cpu_rng_states = count_cpu_rng_states
        self._outer_profile: Any = None
        self._storages: dict[int, tuple[weakref.ref, int, str]] = {}
        self.current = dict.fromkeys(CATEGORIES, 0)
        self.total = 0
        self.phase = PHASES[0]
        self.peak = 0
        self.peak_breakdown = dict(self.current)
        self.phase_peaks = dict.fromkeys(PHASES, 0)
        self._hooks: list[Any] = []

    # Registration ------------------------------------------------------------------------------
    def register(self, tensors: Iterable[Tensor | None], category: str) -> None:
        """Count tensors that exist before tracking starts (or re-tag them) as ``category``."""
        for tensor in tensors:
            if tensor is not None:
                self._track(tensor, category, retag=True)
        self._update_peak()

    def watch_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Re-tag each ``.grad`` as a gradient when autograd accumulates it (frozen parameters get none: LoRA)."""
        for p in parameters:
            if not p.requires_grad:
                continue
            self._hooks.append(
                p.register_post_accumulate_grad_hook(lambda param: self._track(param.grad, "gradients", retag=True))
            )

    def set_phase(self, phase: str) -> None:
        self.phase = phase

    def result(self) -> TrackedPeak:
        return TrackedPeak(self.peak, dict(self.peak_breakdown), dict(self.phase_peaks))

    def reset_peak(self) -> None:
        self.peak, self.peak_breakdown = self.total, dict(self.current)
        self.phase_peaks = dict.fromkeys(PHASES, 0)

    def __enter__(self) -> MemoryTracker:
        if self.count_cpu_rng_states:
            self._outer_profile = sys.getprofile()
            sys.setprofile(self._profile)
        return super().__enter__()

    def __exit__(self, *args: Any) -> None:
        if self.count_cpu_rng_states:
            sys.setprofile(self._outer_profile)
            self._outer_profile = None
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        super().__exit__(*args)

    def _profile(self, frame: Any, event: str, arg: Any) -> None:
        """Count each CPU RNG state as ``torch.get_rng_state`` returns it (a profile function of this thread)."""
        if event == "return" and frame.f_code is _GET_RNG_STATE and isinstance(arg, Tensor):
            self._track(arg, "temporaries")
            self._update_peak()
        if self._outer_profile is not None:
            self._outer_profile(frame, event, arg)

    # Accounting --------------------------------------------------------------------------------
    def _rounded(self, nbytes: int) -> int:
        return -(-nbytes // self.block_size) * self.block_size

    def _track(self, tensor: Tensor, category: str, retag: bool = False) -> None:
        try:
            storage = tensor.untyped_storage()
        except (NotImplementedError, RuntimeError):  # sparse or storage-less tensor subclasses
            return
        key = id(storage)
        nbytes = self._rounded(storage.nbytes())
        known = self._storages.get(key)
        if known is not None and known[0]() is storage:
            _, old_bytes, old_category = known
            new_category = category if retag else old_category
            if (old_bytes, old_category) != (nbytes, new_category):
                self._add(old_category, -old_bytes)
                self._add(new_category, nbytes)
                self._storages[key] = (known[0], nbytes, new_category)
            return

        def release(_: weakref.ReferenceType[torch.UntypedStorage]) -> None:
            self._free(key)

        ref = weakref.ref(storage, release)
        self._storages[key] = (ref, nbytes, category)
        self._add(category, nbytes)

    def _free(self, key: int) -> None:
        known = self._storages.pop(key, None)
        if known is not None:
            self._add(known[2], -known[1])

    def _add(self, category: str, nbytes: int) -> None:
        self.current[category] += nbytes
        self.total += nbytes

    def _update_peak(self) -> None:
        if self.total > self.phase_peaks[self.phase]:
            self.phase_peaks[self.phase] = self.total
        if self.total > self.peak:
            self.peak = self.total
            self.peak_breakdown = dict(self.current)

    def _new_category(self) -> str:
        if self.phase == "optimizer" or torch._C._current_graph_task_id() != -1:
            return "temporaries"
        return "activations"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if self.count_cpu_rng_states:  # no op calls torch.get_rng_state: the profile function sleeps inside one
            sys.setprofile(self._outer_profile)
            try:
                out = func(*args, **(kwargs or {}))
            finally:
                sys.setprofile(self._profile)
        else:
            out = func(*args, **(kwargs or {}))
        category = self._new_category()
        for item in tree_flatten(out)[0]:
            if isinstance(item, Tensor):
                self._track(item, category)
        self._update_peak()
        return out
