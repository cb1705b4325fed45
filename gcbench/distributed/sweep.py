"""One sweep point on W ranks (``gcbench sweep --nproc N``): memory per rank, global throughput, one Record.

Each rank builds the point's step for the global batch, keeps its shard and measures like
:func:`gcbench.sweep.worker.measure_point`: warmup, the allocator-level peak, the dispatch tracker's
breakdown, then timed repeats. Every repeat starts behind a barrier and each rank synchronises its
device before reading the clock; a repeat takes as long as its slowest rank. Rank 0's memory is the
record's ``memory``; ``distributed`` adds every rank's peak. On CPU the baseline also counts DDP's
gradient buckets, allocated when DDP wraps the model and so outside the profiler's window (on CUDA
``memory_allocated`` sees them); gloo's and NCCL's own buffers are not torch allocations and are not
counted. Each point's ranks are fresh processes, so peak statistics start from zero.

Equivalence (with ``sweep.equivalence``): one more W-rank step with dropout off, against one process
running ``full`` over the global batch (see :mod:`gcbench.distributed.verify`); n/a, with the reason,
when that reference does not fit on one device.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

import torch
import torch.distributed as dist

from gcbench.device import resolve_device
from gcbench.distributed.launch import RankError, RankInfo, launch, resolve_backend
from gcbench.distributed.objective import ddp_bucket_bytes, distribute_step, gathers
from gcbench.distributed.verify import REFERENCE, distributed_gradients, reference_gradients, worst
from gcbench.measure.equivalence import GradComparison, compare
from gcbench.measure.memory import CUDA_BLOCK, measure_step_memory, track_step
from gcbench.measure.timing import Timing, time_calls
from gcbench.sweep.config import Experiment, format_bytes
from gcbench.sweep.environment import environment
from gcbench.sweep.records import EquivalenceResult, MemoryResult, Point, Record
from gcbench.sweep.worker import first_line, is_out_of_memory, limit_cuda_memory, memory_result, release_memory, time_result
from gcbench.training import build_step

LAUNCH_SHARE = 0.9  # of the point's timeout, for the ranks; the rest is for writing the record


@dataclass(frozen=True)
class RankMeasurement:
    """What one rank sends back."""

    memory: MemoryResult
    samples_s: tuple[float, ...]
    threads: int
    equivalence: GradComparison | str | None  # a comparison, why there is none (n/a), or not asked for


def measure_point_distributed(experiment: Experiment, point: Point, env_extra: dict[str, Any] | None = None) -> Record:
    """Measure ``point`` (its batch size is the global batch) on ``experiment.sweep.nproc`` ranks.

    A rank that fails ends the point: ``status="oom"`` when it ran out of memory, ``"error"`` with
    that rank's message otherwise, ``"timeout"`` when the ranks hang past the point's timeout.
    """
    sweep = experiment.sweep
    started = time.perf_counter()
    device = resolve_device(sweep.device)
    backend = resolve_backend(sweep.backend, device)
    record = Record(experiment.name, experiment.fingerprint, point, "ok",
                    env={**environment(device), **(env_extra or {})},
                    distributed={"world_size": sweep.nproc, "backend": backend})
    try:
        ranks = launch(_measure_rank, sweep.nproc, (experiment, point), device=device, backend=backend,
                       timeout=sweep.timeout * LAUNCH_SHARE, threads=sweep.threads)
    except RankError as error:
        record.status = "oom" if error.exception is not None and is_out_of_memory(error.exception) else "error"
        record.reason = first_line(error)
    except TimeoutError as error:
        record.status, record.reason = "timeout", str(error)
    else:
        _fill(record, ranks, sweep.memory_budget)
    record.finished_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    record.wall_s = time.perf_counter() - started
    return record


def _fill(record: Record, ranks: list[RankMeasurement], budget: int | None) -> None:
    point = record.point
    peaks = [r.memory.peak_bytes or 0 for r in ranks]
    # A repeat ends when its slowest rank does.
    timing = Timing(tuple(max(samples) for samples in zip(*(r.samples_s for r in ranks))))
    record.memory = ranks[0].memory
    record.time = time_result(timing, point.batch_size)
    record.distributed = {
        **(record.distributed or {}), "local_batch_size": point.batch_size // len(ranks),
        "negatives": "global" if gathers(point.strategy) else "per rank",
        "peak_max_bytes": max(peaks), "peak_mean_bytes": statistics.mean(peaks), "rank_peak_bytes": peaks,
        "rank_median_s": [statistics.median(r.samples_s) for r in ranks], "threads_per_rank": ranks[0].threads,
    }
    if budget is not None and max(peaks) > budget:
        record.status = "oom"
        record.reason = f"peak {format_bytes(max(peaks))} of rank {peaks.index(max(peaks))} is over the memory " \
                        f"budget {format_bytes(budget)}"
    else:
        record.equivalence = _equivalence_result([r.equivalence for r in ranks])


def _equivalence_result(results: list[GradComparison | str | None]) -> EquivalenceResult | None:
    if any(r is None for r in results):
        return None
    notes = [r for r in results if isinstance(r, str)]
    if notes:
        return EquivalenceResult(REFERENCE, note=notes[0])
    c = worst([r for r in results if isinstance(r, GradComparison)])
    return EquivalenceResult(REFERENCE, c.max_abs_err, c.max_rel_err, c.cosine, c.loss_diff)


# In each rank ---------------------------------------------------------------------------------------

def _measure_rank(info: RankInfo, experiment: Experiment, point: Point) -> RankMeasurement:
    sweep = experiment.sweep
    limit_cuda_memory(info.device, sweep.memory_budget)
    step = distribute_step(build_step(experiment.step_config(point), info.device))
    for _ in range(sweep.warmup):
        step()
    measured = measure_step_memory(step)
    if info.device.type == "cpu":
        measured = replace(measured, method=f"{measured.method} + DDP gradient buckets",
                           baseline_bytes=measured.baseline_bytes + ddp_bucket_bytes(step.strategy.objective.encoders))
    _, tracked = track_step(step, CUDA_BLOCK if info.device.type == "cuda" else 1,
                            count_cpu_rng_states=info.device.type == "cpu")
    samples: list[float] = []
    for _ in range(sweep.repeats):
        _barrier(info)
        samples.extend(time_calls(step, 1, info.device).samples_s)
    memory = memory_result(measured, tracked)
    del step
    release_memory(info.device)
    equivalence = _equivalence(experiment, point, info.device) if sweep.equivalence else None
    return RankMeasurement(memory, tuple(samples), torch.get_num_threads(), equivalence)


def _barrier(info: RankInfo) -> None:
    """Every rank starts the timed step together (NCCL wants to be told the device)."""
    dist.barrier(device_ids=[info.device.index] if info.device.type == "cuda" else None)


def _equivalence(experiment: Experiment, point: Point, device: torch.device) -> GradComparison | str:
    model = replace(experiment.workload.model, dropout=0.0)
    config = replace(experiment.step_config(point), workload=replace(experiment.workload, model=model))
    grads, loss = distributed_gradients(config, device)
    try:
        ref_grads, ref_loss = reference_gradients(config, device)
    except Exception as error:  # noqa: BLE001
        if not is_out_of_memory(error):
            raise
        release_memory(device)
        return f"n/a: the single-process reference over the global batch does not fit ({first_line(error)})"
    return compare(grads, ref_grads, loss, ref_loss)
