"""Peak memory of one training step, at the allocator, on CUDA and on CPU.

CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, read once after
forward+backward and once after the optimizer step; the baseline is ``memory_allocated`` before the
step (parameters, optimizer state, batch, cuBLAS workspaces after warmup).

CPU: ``torch.cuda`` has nothing to say there (it returns 0 on a CPU build). The profiler records every
allocation and free of the CPU allocator with its size and time; their running sum over the step is
the CPU counterpart of ``max_memory_allocated``. The baseline is the bytes of the storages the step
starts from. Both give the peak above the baseline (``step_peak_bytes``) and the absolute peak.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from gcbench.measure.tracker import PHASES, MemoryTracker, TrackedPeak
from gcbench.training import TrainingStep

CUDA_BLOCK = 512  # the CUDA caching allocator rounds every block up to this


@dataclass(frozen=True)
class MemoryMeasurement:
    method: str
    baseline_bytes: int
    step_peak_bytes: int  # above the baseline
    phase_peak_bytes: dict[str, int]  # above the baseline, per phase of the step
    reserved_bytes: int | None = None  # CUDA: the allocator's cache too (fragmentation)

    @property
    def peak_bytes(self) -> int:
        return self.baseline_bytes + self.step_peak_bytes


def storage_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views counted once)."""
    sizes: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        sizes[storage.data_ptr()] = storage.nbytes()
    return sum(sizes.values())


def measure_step_memory(step: TrainingStep) -> MemoryMeasurement:
    """Peak memory of one step (the caller has warmed up: optimizer state exists)."""
    step.zero_grad()
    if step.device.type == "cuda":
        return _measure_cuda(step)
    if step.device.type == "cpu":
        return _measure_cpu(step)
    raise ValueError(f"memory measurement supports cpu and cuda, not {step.device.type}")


def _measure_cuda(step: TrainingStep) -> MemoryMeasurement:
    cuda = torch.cuda
    cuda.synchronize(step.device)
    baseline = cuda.memory_allocated(step.device)
    cuda.reset_peak_memory_stats(step.device)
    step.forward_backward()
    cuda.synchronize(step.device)
    forward_backward = cuda.max_memory_allocated(step.device) - baseline
    reserved = cuda.max_memory_reserved(step.device)
    cuda.reset_peak_memory_stats(step.device)  # the new peak starts from what is held now
    step.optimizer_step()
    cuda.synchronize(step.device)
    optimizer = cuda.max_memory_allocated(step.device) - baseline
    reserved = max(reserved, cuda.max_memory_reserved(step.device))
    phases = {"forward_backward": forward_backward, "optimizer": optimizer}
    return MemoryMeasurement("cuda max_memory_allocated", baseline, max(phases.values()), phases, reserved)


def _measure_cpu(step: TrainingStep) -> MemoryMeasurement:
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    baseline = storage_bytes(t for tensors in step.resident().values() for t in tensors)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("gcbench::forward_backward"):
            step.forward_backward()
        with record_function("gcbench::optimizer"):
            step.optimizer_step()
    events = prof.profiler.kineto_results.events()
    spans = {
        e.name().split("::")[1]: (e.start_ns(), e.end_ns())
        for e in events
        if e.name() in ("gcbench::forward_backward", "gcbench::optimizer")
    }
    running, peak = 0, 0
    phases = dict.fromkeys(PHASES, 0)
    for event in sorted(
        (e for e in events if e.name() == "[memory]" and e.device_type().name == "CPU"), key=lambda e: e.start_ns()
    ):
        running += event.nbytes()
        peak = max(peak, running)
        for phase, (start, end) in spans.items():
            if start <= event.start_ns() <= end:
                phases[phase] = max(phases[phase], running)
    return MemoryMeasurement("cpu profiler memory events", baseline, peak, phases)


def track_step(step: TrainingStep, block_size: int = 1, count_cpu_rng_states: bool = True) -> tuple[int, TrackedPeak]:
    """Run one step under the dispatch-level tracker: (baseline bytes, peak with its breakdown)."""
    step.zero_grad()
    tracker = MemoryTracker(block_size=block_size, count_cpu_rng_states=count_cpu_rng_states)
    for category, tensors in step.resident().items():
        tracker.register(tensors, category)
    tracker.watch_gradients(step.parameters())
    tracker.reset_peak()
    baseline = tracker.total
    with tracker:
        step.forward_backward()
        tracker.set_phase("optimizer")
        step.optimizer_step()
    return baseline, tracker.result()


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA raises OutOfMemoryError; the CPU allocator a plain RuntimeError."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        phrase in text for phrase in ("out of memory", "can't allocate memory", "not enough memory")
    )


def limit_cuda_memory(device: torch.device, budget: int | None) -> None:
    """Enforce a budget on the caching allocator (the CUDA context comes on top of it)."""
    if device.type != "cuda" or budget is None:
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)


def release_memory(device: torch.device) -> None:
    """Free what a failed or finished measurement held; lift the budget for the equivalence check."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0, device)
