"""One sweep point, measured inside its own process: peak memory, step time, gradient equivalence.

Order matters: warmup (optimizer state, lazy initialisation, cuBLAS workspaces), then one step for the
allocator-level peak, one under the dispatch tracker for the breakdown (it slows the step, so it is
measured apart), then the timed repeats. The equivalence check comes last on freshly built models, so
its reference graph cannot disturb the peak.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from gcbench.device import resolve_device
from gcbench.measure.equivalence import REFERENCE, check_strategy
from gcbench.measure.memory import CUDA_BLOCK, MemoryMeasurement, measure_step_memory, track_step
from gcbench.measure.timing import Timing, time_calls
from gcbench.measure.tracker import TrackedPeak
from gcbench.sweep.config import Experiment, format_bytes
from gcbench.sweep.environment import environment
from gcbench.sweep.records import EquivalenceResult, MemoryResult, Point, Record, TimeResult
from gcbench.training import build_step


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA raises OutOfMemoryError; the CPU allocator a plain RuntimeError."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        phrase in text for phrase in ("out of memory", "can't allocate memory", "not enough memory"))


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:500]


def measure_point(experiment: Experiment, point: Point, env_extra: dict[str, Any] | None = None) -> Record:
    sweep = experiment.sweep
    if sweep.nproc > 1:
        from gcbench.distributed.sweep import measure_point_distributed  # it imports this module

        return measure_point_distributed(experiment, point, env_extra)
    started = time.perf_counter()
    if sweep.threads:
        torch.set_num_threads(sweep.threads)
    device = resolve_device(sweep.device)
    record = Record(experiment.name, experiment.fingerprint, point, "ok",
                    env={**environment(device), **(env_extra or {})})
    limit_cuda_memory(device, sweep.memory_budget)
    try:
        memory, timing = _measure(experiment, point, device)
    except Exception as error:  # noqa: BLE001 - every failure is a result
        if not is_out_of_memory(error):
            raise
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        record.status, record.reason = "oom", first_line(error)
        record.memory = MemoryResult("cuda max_memory_allocated" if peak else "n/a", peak)
    else:
        record.memory, record.time = memory, timing
        if sweep.memory_budget is not None and memory.peak_bytes is not None and \
                memory.peak_bytes > sweep.memory_budget:
            record.status = "oom"
            record.reason = (f"peak {format_bytes(memory.peak_bytes)} is over the memory budget "
                             f"{format_bytes(sweep.memory_budget)}")
    release_memory(device)
    if record.status == "ok" and sweep.equivalence:
        record.equivalence = _equivalence(experiment, point, device)
    record.finished_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    record.wall_s = time.perf_counter() - started
    return record


def _measure(experiment: Experiment, point: Point, device: torch.device) -> tuple[MemoryResult, TimeResult]:
    step = build_step(experiment.step_config(point), device)
    for _ in range(experiment.sweep.warmup):
        step()
    measured = measure_step_memory(step)
    _, tracked = track_step(step, CUDA_BLOCK if device.type == "cuda" else 1,
                            count_cpu_rng_states=device.type == "cpu")
    timing = time_calls(step, experiment.sweep.repeats, device)
    return memory_result(measured, tracked), time_result(timing, point.batch_size)


def memory_result(measured: MemoryMeasurement, tracked: TrackedPeak) -> MemoryResult:
    """A record's memory: the allocator-level peak, and the tracker's breakdown of another run of the step."""
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
    )


def time_result(timing: Timing, examples: int) -> TimeResult:
    q1, q3 = timing.quartiles_s
    return TimeResult(timing.median_s, q1, q3, list(timing.samples_s), examples / timing.median_s)


def _equivalence(experiment: Experiment, point: Point, device: torch.device) -> EquivalenceResult:
    if point.strategy == "full":
        return EquivalenceResult("self", note="full is the reference")
    step = experiment.step_config(point)
    try:
        result = check_strategy(experiment.workload, point.strategy, point.batch_size, step.chunk_sizes,
                                precision=experiment.sweep.precision, device=device, seed=experiment.sweep.seed)
    except Exception as error:  # noqa: BLE001
        if not is_out_of_memory(error):
            raise
        release_memory(device)
        return EquivalenceResult(REFERENCE, note=f"n/a: the full-batch reference does not fit ({first_line(error)})")
    return EquivalenceResult(REFERENCE, result.max_abs_err, result.max_rel_err, result.cosine, result.loss_diff)


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


# The child process ------------------------------------------------------------------------------

def child_main(experiment_data: dict[str, Any], point_data: dict[str, Any], env_extra: dict[str, Any],
               result_path: str, log_path: str) -> None:
    """Entry point of a point's process: output to a log, the record to ``result_path``."""
    _die_with_parent()
    gc.freeze()  # what the fork server imported stays put: each gc.collect() here skips it
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    experiment, point = Experiment.from_dict(experiment_data), Point.from_dict(point_data)
    try:
        record = measure_point(experiment, point, env_extra)
    except BaseException as error:  # noqa: BLE001 - a crash is a result too
        traceback.print_exc()
        record = Record(experiment.name, experiment.fingerprint, point, "error", reason=first_line(error),
                        env=env_extra, finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    sys.stdout.flush()
    sys.stderr.flush()
    temporary = Path(result_path + ".tmp")
    temporary.write_text(record.to_json())
    temporary.replace(result_path)


def _die_with_parent() -> None:
    """Linux: end this point's process if the process that started it dies (kill -9 of the sweep)."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
