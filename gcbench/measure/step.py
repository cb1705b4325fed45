"""How a training step is measured, the one way: :class:`StepProtocol` (set-up, warm-up, budget, peak, time).

In the spirit of ``torch.utils.benchmark``'s ``Timer`` and ``Measurement``: one object holds the
conditions (warm-up steps, the repeat policy, the memory budget, what ranks add) and measures a step
with them, alone or in turns with others. Sweep points (one process and every rank), tune's peaks and
tune's timed turns all go through it; nothing else measures a step. The order that keeps it honest:

1. **set-up**: the budget caps the CUDA caching allocator (``set_per_process_memory_fraction``), so a
   step that does not fit runs out of memory as it would on a card of that size (on CPU nothing is
   capped; the sweep compares the peak with the budget afterwards);
2. **warm-up** (optimizer state, lazy initialisation, cuBLAS workspaces), under the cap;
3. **memory**, when asked: one step for the allocator-level peak (``max_memory_allocated`` on CUDA: the
   quantity the sweep and tune compare with the budget), one under the dispatch tracker for the
   breakdown (it slows the step, so it is measured apart) and the loss alone;
4. **timing**, always under the same conditions: the memory is released (``empty_cache``) and the cap
   lifted, the reference (or the other candidates) built and warmed up, and the step warmed up again,
   so every step is timed uncapped and warm whether it is paired or not; then the timed turns
   (:func:`~gcbench.measure.timing.time_in_turns`). A rank adds what DDP holds outside the profiler's
   window, a barrier before each timed step and an agreement on when to stop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch

from gcbench.measure.loss import loss_memory
from gcbench.measure.memory import (
    CUDA_BLOCK,
    MemoryMeasurement,
    is_out_of_memory,
    limit_cuda_memory,
    measure_step_memory,
    release_memory,
    track_step,
)
from gcbench.measure.steps import StepsMeasurement, measure_steps
from gcbench.measure.timing import RepeatPolicy, Timing, Turns, time_in_turns
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

    @property
    def cpu_ratios(self) -> tuple[float, ...]:
        """The same ratios by the process's CPU time (nothing where it was not taken)."""
        if self.reference_timing is None:
            return ()
        pairs = zip(self.timing.cpu_samples_s, self.reference_timing.cpu_samples_s)
        return tuple(a / b for a, b in pairs if b > 0)


@dataclass(frozen=True)
class UntrackedBaseline:
    """Bytes the step starts from that the profiler cannot see (DDP's buckets, allocated before it)."""

    what: str
    bytes: int


@dataclass(frozen=True)
class StepProtocol:
    """The conditions a step is measured under (see the module); :meth:`measure`, :meth:`peak`, :meth:`turns`.

    ``budget``: bytes the CUDA allocator is capped to while the step is warmed up and its memory measured
    (None: no cap). ``untracked``: bytes a rank holds outside the profiler's view (DDP's buckets).
    ``before_each`` runs before every timed call (a barrier across ranks); ``agree`` turns this process's
    wish to stop timing into the ranks' shared decision. ``fall_back``: a reference that does not fit
    leaves the step timed alone (one process; ranks must fail together instead).
    """

    warmup: int
    policy: RepeatPolicy
    budget: int | None = None
    untracked: UntrackedBaseline | None = None
    before_each: Callable[[], None] | None = None
    agree: Callable[[bool], bool] | None = None
    fall_back: bool = True
    steps: int = 1  # > 1: memory also measured step by step over new batches (``sweep.steps``)

    def set_up(self, device: torch.device) -> None:
        """Cap the allocator to the budget (CUDA) before the first step runs."""
        limit_cuda_memory(device, self.budget)

    def warm(self, step: TrainingStep) -> None:
        step.warm_up(self.warmup)  # the optimizer's state exists from here, whatever a GradScaler skipped

    def peak(self, step: TrainingStep) -> MemoryMeasurement:
        """The allocator-level peak of ``step`` after set-up and warm-up (what tune checks a pick with)."""
        self.set_up(step.device)
        self.warm(step)
        return self._memory(step)

    def measure(
        self, step: TrainingStep, *, memory: bool = True, reference: Callable[[], TrainingStep] | None = None
    ) -> StepMeasurement:
        """Set up, warm up, measure memory (``memory``), then time ``step``, in turns with the step
        ``reference`` builds when there is one."""
        self.set_up(step.device)
        self.warm(step)
        measured, tracked, loss_peak = None, None, None
        if memory:
            measured = self._memory(step)
            block = CUDA_BLOCK if step.device.type == "cuda" else 1
            _, tracked = track_step(step, block, count_cpu_rng_states=step.device.type == "cpu")
            loss_peak = loss_memory(step, block)
        over_steps = measure_steps(step, self.steps) if memory and self.steps > 1 else None
        candidates: dict[str, TrainingStep] = {STEP: step}
        unpaired = None
        release_memory(step.device)  # the cap held the step's own peak, measured above; timing runs uncapped
        if reference is not None:
            try:
                candidates[REFERENCE] = reference()
                self.warm(candidates[REFERENCE])
            except Exception as error:
                if not (self.fall_back and is_out_of_memory(error)):
                    raise
                unpaired = "the reference step does not fit beside this one"
            if unpaired is not None:  # out of the except block: the exception no longer pins the tensors
                candidates.pop(REFERENCE, None)
                release_memory(step.device)
        self.warm(step)  # again, after the release: every step is timed warm, paired or not
        turns = self._time(candidates, step.device)
        reference_timing = turns.timing(REFERENCE) if REFERENCE in candidates else None
        return StepMeasurement(measured, tracked, turns.timing(STEP), loss_peak, reference_timing, unpaired, over_steps)

    def turns(self, steps: Mapping[str, TrainingStep], device: torch.device) -> Turns:
        """Several steps built in this process, warmed up, then timed in turns under the timing conditions
        of :meth:`measure` (uncapped, released, warm). The policy's time cap is for a pair of steps: it
        grows with their number."""
        release_memory(device)
        for step in steps.values():
            self.warm(step)
        policy = replace(self.policy, max_time_s=self.policy.max_time_s * len(steps) / 2)
        return replace(self, policy=policy)._time(dict(steps), device)

    def _memory(self, step: TrainingStep) -> MemoryMeasurement:
        measured = measure_step_memory(step)
        if self.untracked is not None and step.device.type == "cpu":  # on CUDA memory_allocated sees them already
            measured = replace(
                measured,
                method=f"{measured.method} + {self.untracked.what}",
                baseline_bytes=measured.baseline_bytes + self.untracked.bytes,
            )
        return measured

    def _time(self, candidates: Mapping[str, Callable[[], object]], device: torch.device) -> Turns:
        return time_in_turns(candidates, device, self.policy, before_each=self.before_each, agree=self.agree)
