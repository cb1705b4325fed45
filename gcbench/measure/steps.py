"""Memory over many steps, each on a new batch (new lengths): what one step's peak does not show.

With lengths that vary from step to step, the caching allocator keeps blocks of the shapes it has seen;
on CUDA its reserved memory grows past the allocated peak (fragmentation), which one reading after one
step cannot show. ``sweep.steps = K`` runs K steps after the point's own measurement, each on the batch
of the next seed (new lengths drawn), and records per step the allocated peak, and on CUDA the reserved
peak and their difference; on CPU the process's resident set after each step. The point's own batch is
put back afterwards, so its timing is unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from gcbench.cache.batching import row_lengths
from gcbench.device import param_dtype
from gcbench.measure.memory import measure_step_memory
from gcbench.training import TrainingStep


@dataclass(frozen=True)
class StepsMeasurement:
    """Per step, in order: bytes."""

    allocated_peak_bytes: tuple[int, ...]  # the allocator's peak of each step (absolute)
    reserved_peak_bytes: tuple[int, ...] = ()  # CUDA: the caching allocator's reserved peak of each step
    resident_bytes: tuple[int, ...] = ()  # CPU: the process's resident set after each step
    tokens: tuple[int, ...] = ()  # real (unpadded) tokens of each step's batch

    @property
    def fragmentation_bytes(self) -> tuple[int, ...]:
        """Reserved minus allocated, per step (CUDA)."""
        return tuple(r - a for r, a in zip(self.reserved_peak_bytes, self.allocated_peak_bytes))


def resident_bytes() -> int | None:
    """This process's resident set (Linux ``/proc/self/statm``); None elsewhere."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def batch_tokens(step: TrainingStep) -> int:
    """Real tokens of the step's batch: every unmasked position of every input with a mask."""
    lengths = (row_lengths(batch) for batch in step.batches)
    return sum(sum(found) for found in lengths if found is not None)


def measure_steps(step: TrainingStep, count: int) -> StepsMeasurement:
    """``count`` steps, step ``k`` on the batch of seed ``config.seed + 1 + k`` (step 0: the point's own)."""
    config, device = step.config, step.device
    own = step.batches
    allocated, reserved, resident, tokens = [], [], [], []
    try:
        for k in range(count):
            step.batches = (
                own
                if k == 0
                else step.workload.batches(
                    config.batch_size, seed=config.seed + 1 + k, device=device, dtype=param_dtype(config.precision)
                )
            )
            tokens.append(batch_tokens(step))
            measured = measure_step_memory(step)
            allocated.append(measured.peak_bytes)
            if device.type == "cuda":
                reserved.append(int(measured.reserved_bytes or 0))
            else:
                rss = resident_bytes()
                if rss is not None:
                    resident.append(rss)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    finally:
        step.batches = own
    return StepsMeasurement(tuple(allocated), tuple(reserved), tuple(resident), tuple(tokens))
