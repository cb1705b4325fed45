"""One sweep point measured into a Record: in this process, or on W ranks.

:class:`PointMeasurer` holds what every point shares (the record's frame, the memory budget, the
status of a failure, the finishing touches); :class:`InProcess` measures the step here and
:class:`OnRanks` on ``sweep.nproc`` ranks, each rank measuring with the same
:class:`~gcbench.measure.step.StepProtocol` (:meth:`PointMeasurer.protocol`). :func:`measurer` picks one
for an experiment.

On W ranks each rank builds the point's step for the global batch and keeps its shard; a timed
repeat starts behind a barrier and lasts as long as its slowest rank. Rank 0's memory is the record's
``memory``; ``distributed`` adds every rank's peak. On CPU the baseline also counts DDP's gradient
buckets, allocated when DDP wraps the model and so outside the profiler's window (on CUDA
``memory_allocated`` sees them); gloo's and NCCL's own buffers are not torch allocations and are not
counted. The W-rank equivalence check runs with dropout off against one process running ``full`` over
the global batch (see :mod:`gcbench.measure.ranks`).
"""

from __future__ import annotations

import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timezone

import torch
import torch.distributed as dist

from gcbench.device import point_threads, resolve_device
from gcbench.distributed.launch import RankError, RankInfo, launch, resolve_backend
from gcbench.distributed.objective import ddp_bucket_bytes, distribute_step, gathers
from gcbench.errors import UsageError, first_line
from gcbench.experiment import Experiment
from gcbench.measure.allocator import steady_allocator
from gcbench.measure.equivalence import REFERENCE, GradComparison, check_strategy, compare
from gcbench.measure.memory import is_out_of_memory, release_memory
from gcbench.measure.ranks import REFERENCE as RANKS_REFERENCE
from gcbench.measure.ranks import distributed_gradients, reference_gradients, worst
from gcbench.measure.step import StepMeasurement, StepProtocol, UntrackedBaseline
from gcbench.measure.steps import StepsMeasurement
from gcbench.measure.timing import Timing
from gcbench.results.environment import environment
from gcbench.results.records import (
    OVER_BUDGET,
    DistributedResult,
    Environment,
    EquivalenceResult,
    MemoryResult,
    Point,
    Record,
    Status,
    StepsResult,
)
from gcbench.results.timing import paired_result, time_result
from gcbench.results.units import format_bytes
from gcbench.strategies import StrategyTraits, resolve_strategy
from gcbench.training import TrainingStep, build_step

LAUNCH_SHARE = 0.9  # of the point's timeout, for the ranks; the rest is for writing the record


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def bare_record(
    experiment: Experiment, point: Point, status: Status, reason: str | None, git_commit: str | None, round: int = 1
) -> Record:
    """A record of a point that measured nothing: skipped, or ended by a crash, a kill or a timeout."""
    try:
        traits: StrategyTraits | None = resolve_strategy(point.strategy).traits()
    except UsageError:
        traits = None
    return Record(
        experiment.name,
        experiment.fingerprint,
        point,
        status,
        traits=traits,
        reason=reason,
        loss_tile=experiment.workload.loss_tile,
        env=Environment(git_commit=git_commit),
        finished_at=now(),
        round=round,
    )


def memory_result(step: StepMeasurement) -> MemoryResult:
    """A record's memory: the allocator-level peak, the tracker's breakdown of another run of the step, and
    the loss's own peak (of a step whose memory was measured: round 1)."""
    measured, tracked = step.memory, step.tracked
    assert measured is not None and tracked is not None
    return MemoryResult(
        method=measured.method,
        peak_bytes=measured.peak_bytes,
        baseline_bytes=measured.baseline_bytes,
        step_peak_bytes=measured.step_peak_bytes,
        forward_backward_peak_bytes=measured.baseline_bytes + measured.phase_peak_bytes["forward_backward"],
        optimizer_peak_bytes=measured.baseline_bytes + measured.phase_peak_bytes["optimizer"],
        reserved_bytes=measured.reserved_bytes,
        breakdown=tracked.breakdown,
        tracked_peak_bytes=tracked.total,
        loss_peak_bytes=step.loss_peak_bytes,
        steps=steps_result(step.steps) if step.steps is not None else None,
    )


def steps_result(steps: StepsMeasurement) -> StepsResult:
    return StepsResult(
        steps.allocated_peak_bytes,
        steps.reserved_peak_bytes,
        steps.fragmentation_bytes,
        steps.resident_bytes,
        steps.tokens,
    )


def timed(record: Record, measured: StepMeasurement, reference: Point | None) -> None:
    """Fill the record's ``time`` (one round) and, when the reference was timed in turns, ``paired``."""
    env = record.env
    timing = measured.timing
    record.time = time_result(
        [timing.samples_s], record.point.batch_size, env.load_average_1m, env.cpu_cores, timing.cpu_samples_s
    )
    if reference is not None and measured.reference_timing is not None:
        medians = [measured.reference_timing.median_s]
        record.paired = paired_result(reference.strategy, [measured.ratios], medians, [measured.cpu_ratios])


def equivalence_result(comparison: GradComparison | str, reference: str) -> EquivalenceResult:
    """A comparison's numbers, or why there are none (a note)."""
    if isinstance(comparison, str):
        return EquivalenceResult(reference, note=comparison)
    c = comparison
    return EquivalenceResult(reference, c.max_abs_err, c.max_rel_err, c.cosine, c.loss_diff)


class PointMeasurer(ABC):
    """Measures the points of one experiment; what is shared by one process and W ranks."""

    def __init__(self, experiment: Experiment, git_commit: str | None = None) -> None:
        self.experiment = experiment
        self.git_commit = git_commit

    def measure(self, point: Point, round: int = 1, reference: Point | None = None) -> Record:
        """``point``'s record; round 1 measures everything, a later round its time alone. ``reference``:
        the point to time in turns with this one (the reference strategy at the same batch, which ran ok)."""
        started = time.perf_counter()
        sweep = self.experiment.sweep
        device = resolve_device(sweep.device)
        if point_threads(sweep.threads, device):
            torch.set_num_threads(point_threads(sweep.threads, device))
        malloc = steady_allocator() if sweep.malloc == "steady" else None
        record = Record(
            self.experiment.name,
            self.experiment.fingerprint,
            point,
            "ok",
            traits=resolve_strategy(point.strategy).traits(),
            loss_tile=self.experiment.workload.loss_tile,
            env=environment(device, self.git_commit, malloc),
            round=round,
        )
        self.run(point, device, record, reference)
        budget = sweep.memory_budget
        if record.status == "ok" and record.memory is not None and budget is not None:
            peak = max(
                record.memory.peak_bytes or 0, (record.distributed.peak_max_bytes or 0) if record.distributed else 0
            )
            if peak > budget:
                rank = (
                    "" if record.distributed is None else f" of rank {record.distributed.rank_peak_bytes.index(peak)}"
                )
                record.status = "oom"
                threshold = " (a threshold: nothing on CPU refuses the memory)" if device.type == "cpu" else ""
                record.reason = f"peak {format_bytes(peak)}{rank} is {OVER_BUDGET} {format_bytes(budget)}{threshold}"
                record.equivalence = None
        record.finished_at = now()
        record.wall_s = time.perf_counter() - started
        return record

    @abstractmethod
    def run(self, point: Point, device: torch.device, record: Record, reference: Point | None) -> None:
        """Fill ``record`` (memory, time, equivalence in round 1, time alone later; or a failed status with
        its reason)."""

    def protocol(self) -> StepProtocol:
        """How this experiment's steps are measured (the same for one process, a rank, and tune)."""
        return self.experiment.step_protocol()

    def reference_step(self, reference: Point | None, device: torch.device) -> Callable[[], TrainingStep] | None:
        """What builds the reference's step, to be timed in turns with the point's."""
        if reference is None:
            return None
        return lambda: build_step(self.experiment.step_config(reference), device)


class InProcess(PointMeasurer):
    """The point's step in this process (the sweep runs it in a child process of its own)."""

    def run(self, point: Point, device: torch.device, record: Record, reference: Point | None) -> None:
        sweep = self.experiment.sweep
        first = record.round == 1
        protocol = self.protocol()
        try:
            protocol.set_up(device)  # before the step is built: its parameters count against the budget too
            step = build_step(self.experiment.step_config(point), device)
            measured = protocol.measure(step, memory=first, reference=self.reference_step(reference, device))
            del step
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            record.status, record.reason = "oom", first_line(error)
            record.memory = MemoryResult("cuda max_memory_allocated" if peak else "n/a", peak)
            release_memory(device)
            return
        timed(record, measured, reference)
        if measured.unpaired:
            print(f"timed alone: {measured.unpaired}", flush=True)  # to the point's log
        release_memory(device)
        if not first:
            return
        record.memory = memory_result(measured)
        within = sweep.memory_budget is None or (record.memory.peak_bytes or 0) <= sweep.memory_budget
        if sweep.equivalence and within:
            record.equivalence = self._equivalence(point, device)

    def _equivalence(self, point: Point, device: torch.device) -> EquivalenceResult:
        if resolve_strategy(point.strategy).reference:
            return EquivalenceResult("self", note=f"{point.strategy} is the reference")
        experiment = self.experiment
        try:
            result = check_strategy(
                experiment.workload,
                point.strategy,
                point.batch_size,
                point.chunk_sizes,
                precision=experiment.sweep.precision,
                device=device,
                seed=experiment.sweep.seed,
                keep_graphs=point.keep_graphs,
                chunk_tokens=point.chunk_tokens,
            )
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            release_memory(device)
            return EquivalenceResult(
                REFERENCE, note=f"n/a: the full-batch reference does not fit ({first_line(error)})"
            )
        return equivalence_result(result, REFERENCE)


@dataclass(frozen=True)
class RankMeasurement:
    """What one rank sends back."""

    measured: StepMeasurement
    threads: int
    equivalence: GradComparison | str | None  # a comparison, why there is none (n/a), or not asked for


class OnRanks(PointMeasurer):
    """The point on ``sweep.nproc`` ranks (its batch size is the global batch).

    A rank that fails ends the point: ``oom`` when it ran out of memory, ``error`` with that rank's
    message otherwise, ``timeout`` when the ranks hang past the point's timeout.
    """

    def run(self, point: Point, device: torch.device, record: Record, reference: Point | None) -> None:
        sweep = self.experiment.sweep
        backend = resolve_backend(sweep.backend, device)
        record.distributed = DistributedResult(sweep.nproc, backend)
        try:
            ranks = launch(
                _measure_rank,
                sweep.nproc,
                (self.experiment, point, record.round, reference),
                device=device,
                backend=backend,
                timeout=sweep.timeout * LAUNCH_SHARE,
                threads=point_threads(sweep.threads, device),
            )
        except RankError as error:
            record.status = "oom" if error.exception is not None and is_out_of_memory(error.exception) else "error"
            record.reason = first_line(error)
            return
        except TimeoutError as error:
            record.status, record.reason = "timeout", str(error)
            return
        timed(record, slowest_rank(r.measured for r in ranks), reference)
        record.distributed = replace(
            record.distributed,
            local_batch_size=point.batch_size // len(ranks),
            negatives="global" if gathers(point.strategy) else "per rank",
            rank_median_s=tuple(r.measured.timing.median_s for r in ranks),
            threads_per_rank=ranks[0].threads,
        )
        first = ranks[0].measured
        if first.memory is None:
            return  # a timing round
        peaks = [r.measured.memory.peak_bytes for r in ranks if r.measured.memory is not None]
        record.memory = memory_result(first)
        record.distributed = replace(
            record.distributed,
            peak_max_bytes=max(peaks),
            peak_mean_bytes=statistics.mean(peaks),
            rank_peak_bytes=tuple(peaks),
        )
        results = [r.equivalence for r in ranks]
        if all(r is not None for r in results):
            notes = [r for r in results if isinstance(r, str)]
            comparisons = [r for r in results if isinstance(r, GradComparison)]
            record.equivalence = equivalence_result(notes[0] if notes else worst(comparisons), RANKS_REFERENCE)


def slowest_rank(measured: Iterable[StepMeasurement]) -> StepMeasurement:
    """The ranks' timings as one: a timed step (and the reference's, turn by turn) ends when its slowest rank does."""
    ranks = list(measured)

    def slowest(timings: list[Timing | None]) -> Timing | None:
        if any(t is None for t in timings):
            return None
        present = [t for t in timings if t is not None]
        wall = tuple(max(samples) for samples in zip(*(t.samples_s for t in present)))
        return Timing(wall, tuple(max(samples) for samples in zip(*(t.cpu_samples_s for t in present))))

    timing = slowest([r.timing for r in ranks])
    assert timing is not None
    return replace(ranks[0], timing=timing, reference_timing=slowest([r.reference_timing for r in ranks]))


def _measure_rank(
    info: RankInfo, experiment: Experiment, point: Point, round: int, reference: Point | None
) -> RankMeasurement:
    sweep = experiment.sweep
    if sweep.malloc == "steady":
        steady_allocator()
    protocol = experiment.step_protocol()
    protocol.set_up(info.device)  # before the step is built: its parameters count against the budget too
    step = distribute_step(build_step(experiment.step_config(point), info.device))
    buckets = UntrackedBaseline("DDP gradient buckets", ddp_bucket_bytes(step.strategy.objective.encoders))

    def reference_step() -> TrainingStep:
        assert reference is not None
        return distribute_step(build_step(experiment.step_config(reference), info.device))

    protocol = replace(
        protocol,
        untracked=buckets,
        before_each=lambda: _barrier(info),
        agree=lambda stop: _all_agree(stop, info.device),
        fall_back=False,  # ranks run the same turns: one rank cannot go on alone
    )
    measured = protocol.measure(step, memory=round == 1, reference=reference_step if reference is not None else None)
    del step
    release_memory(info.device)
    check = sweep.equivalence and round == 1
    equivalence = _rank_equivalence(experiment, point, info.device) if check else None
    return RankMeasurement(measured, torch.get_num_threads(), equivalence)


def _barrier(info: RankInfo) -> None:
    """Every rank starts the timed step together (NCCL wants to be told the device)."""
    dist.barrier(device_ids=[info.device.index] if info.device.type == "cuda" else None)


def _all_agree(stop: bool, device: torch.device) -> bool:
    """Stop timing only when every rank would (each rank's clock and spread are its own)."""
    flag = torch.tensor([int(stop)], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _rank_equivalence(experiment: Experiment, point: Point, device: torch.device) -> GradComparison | str:
    model = replace(experiment.workload.model, dropout=0.0)
    config = replace(experiment.step_config(point), workload=replace(experiment.workload, model=model))
    grads, loss = distributed_gradients(config, device)
    try:
        ref_grads, ref_loss = reference_gradients(config, device)
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        release_memory(device)
        return f"n/a: the single-process reference over the global batch does not fit ({first_line(error)})"
    return compare(grads, ref_grads, loss, ref_loss)


def measurer(experiment: Experiment, git_commit: str | None = None) -> PointMeasurer:
    """The measurer for the experiment's ranks: this process, or ``sweep.nproc`` of them."""
    return (OnRanks if experiment.sweep.nproc > 1 else InProcess)(experiment, git_commit)
