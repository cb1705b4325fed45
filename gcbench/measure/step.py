"""Everything measured of one training step in the process that runs it, in the order that keeps it honest.

Warm-up first (optimizer state, lazy initialisation, cuBLAS workspaces), then, when asked, one step
for the allocator-level peak, one under the dispatch tracker for the breakdown (it slows the step, so
it is measured apart) and the loss alone (:mod:`gcbench.measure.loss`), then the timed steps. The
reference step (``full`` at the same batch) is built only after the memory is measured, so the peak is
the point's alone; it is warmed up and timed in turns with the point
(:func:`~gcbench.measure.timing.time_in_turns`). A single process and every rank of a multi-rank point
run this same sequence; a rank adds what DDP holds outside the profiler's window, a barrier before each
timed step and an agreement on when to stop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from gcbench.measure.loss import loss_memory
from gcbench.measure.memory import (
    CUDA_BLOCK,
    MemoryMeasurement,
    is_out_of_memory,
    measure_step_memory,
    release_memory,
    track_step,
)
from gcbench.measure.steps import StepsMeasurement, measure_steps
from gcbench.measure.timing import RepeatPolicy, Timing, time_in_turns
from gcbench.measure.tracker import TrackedPeak
from gcbench.training import TrainingStep

STEP, REFERENCE = "step", "reference"


@dataclass(frozen=True)
class StepMeasurement:
    memory: MemoryMeasurement | None  # the allocator's peak (None: not asked for)
    tracked: TrackedPeak | None  # the dispatch tracker's breakdown, from another run of the step
    timing: Timing
    loss_peak_bytes: int | None = None  # the loss's own forward and backward, run alone (None: a peer's loss
    # or not asked for)
    reference_timing: Timing | None = None  # the reference's, turn by turn with ``timing``
    unpaired: str | None = None  # why a reference asked for was not timed
    steps: StepsMeasurement | None = None  # memory step by step over new batches (``steps`` > 1)

    @property
    def ratios(self) -> tuple[float, ...]:
        """The step's time over the reference's, turn by turn (nothing when the reference was not timed)."""
        if self.reference_timing is None:
            return ()
        return tuple(a / b for a, b in zip(self.timing.samples_s, self.reference_timing.samples_s))


@dataclass(frozen=True)
class UntrackedBaseline:
    """Bytes the step starts from that the profiler cannot see (DDP's buckets, allocated before it)."""

    what: str
    bytes: int


def measure_step(
    step: TrainingStep,
    warmup: int,
    policy: RepeatPolicy,
    *,
    memory: bool = True,
    reference: Callable[[], TrainingStep] | None = None,
    untracked: UntrackedBaseline | None = None,
    before_each: Callable[[], None] | None = None,
    agree: Callable[[bool], bool] | None = None,
    fall_back: bool = True,
    steps: int = 1,
) -> StepMeasurement:
    """Warm up, measure memory (``memory``), then time ``step``, in turns with the step ``reference``
    builds when there is one. ``fall_back``: a reference that runs out of memory leaves the step timed
    alone (one process; ranks must fail together instead)."""
    for _ in range(warmup):
        step()
    measured, tracked, loss_peak = None, None, None
    if memory:
        measured = measure_step_memory(step)
        if untracked is not None and step.device.type == "cpu":  # on CUDA memory_allocated sees them already
            measured = replace(
                measured,
                method=f"{measured.method} + {untracked.what}",
                baseline_bytes=measured.baseline_bytes + untracked.bytes,
            )
        block = CUDA_BLOCK if step.device.type == "cuda" else 1
        _, tracked = track_step(step, block, count_cpu_rng_states=step.device.type == "cpu")
        loss_peak = loss_memory(step, block)
    over_steps = measure_steps(step, steps) if memory and steps > 1 else None
    candidates: dict[str, Callable[[], object]] = {STEP: step}
    unpaired = None
    if reference is not None:
        release_memory(step.device)  # lifts a CUDA budget: it held the point's own peak, measured above
        try:
            candidates[REFERENCE] = reference()
            for _ in range(warmup):
                candidates[REFERENCE]()
        except Exception as error:
            if not (fall_back and is_out_of_memory(error)):
                raise
            unpaired = "the reference step does not fit beside this one"
        if unpaired is not None:  # out of the except block: the exception no longer pins the tensors
            candidates.pop(REFERENCE, None)
            release_memory(step.device)
    turns = time_in_turns(candidates, step.device, policy, before_each=before_each, agree=agree)
    reference_timing = turns.timing(REFERENCE) if REFERENCE in candidates else None
    return StepMeasurement(measured, tracked, turns.timing(STEP), loss_peak, reference_timing, unpaired, over_steps)
