"""Everything measured of one training step in the process that runs it, in the order that keeps it honest.

Warm-up first (optimizer state, lazy initialisation, cuBLAS workspaces), then one step for the
allocator-level peak, one under the dispatch tracker for the breakdown (it slows the step, so it is
measured apart), then the timed repeats, and last the loss alone (:mod:`gcbench.measure.loss`).
A single process and every rank of a multi-rank point run this same sequence; a rank adds what DDP
holds outside the profiler's window and a barrier before each timed step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from gcbench.measure.loss import loss_memory
from gcbench.measure.memory import CUDA_BLOCK, MemoryMeasurement, measure_step_memory, track_step
from gcbench.measure.timing import Timing, time_calls
from gcbench.measure.tracker import TrackedPeak
from gcbench.training import TrainingStep


@dataclass(frozen=True)
class StepMeasurement:
    memory: MemoryMeasurement  # the allocator's peak
    tracked: TrackedPeak  # the dispatch tracker's breakdown, from another run of the step
    timing: Timing
    loss_peak_bytes: int | None  # the loss's own forward and backward, run alone (None: a peer's loss)


@dataclass(frozen=True)
class UntrackedBaseline:
    """Bytes the step starts from that the profiler cannot see (DDP's buckets, allocated before it)."""

    what: str
    bytes: int


def measure_step(
    step: TrainingStep,
    warmup: int,
    repeats: int,
    *,
    untracked: UntrackedBaseline | None = None,
    before_each: Callable[[], None] | None = None,
) -> StepMeasurement:
    for _ in range(warmup):
        step()
    memory = measure_step_memory(step)
    if untracked is not None and step.device.type == "cpu":  # on CUDA memory_allocated sees them already
        memory = replace(
            memory, method=f"{memory.method} + {untracked.what}", baseline_bytes=memory.baseline_bytes + untracked.bytes
        )
    block = CUDA_BLOCK if step.device.type == "cuda" else 1
    _, tracked = track_step(step, block, count_cpu_rng_states=step.device.type == "cpu")
    samples: list[float] = []
    for _ in range(repeats):
        if before_each is not None:
            before_each()
        samples.extend(time_calls(step, 1, step.device).samples_s)
    return StepMeasurement(memory, tracked, Timing(tuple(samples)), loss_memory(step, block))
