"""A step's memory over its time, with its phases marked: where a peak comes from, not only how high it is.

The dispatch-level tracker (:mod:`gcbench.measure.tracker`) sees every storage created and freed; here it
also records the running total after each op, and the engine's and strategies' phase marks
(:mod:`gcbench.cache.phases`: encode without graph, loss and cache, re-encode and backward of each chunk;
for ``full``, encode with graph, loss and backward) with the optimizer step. Times are those of the
tracked run, which the tracker slows: read them as the order and share of the step, not its speed.

``sweep.timeline = true`` records, after the sweep, one step of the reference (``full``) and one of the
first caching setting at one batch (:func:`gcbench.sweep.timeline.timeline_points`), in a child process, into
``timeline.json``; the report draws them side by side (``figures/timeline.png``). On CUDA each is also
recorded with ``torch.cuda.memory._record_memory_history`` and its snapshot saved beside it
(``timeline-<strategy>.pickle``, for https://pytorch.org/memory_viz).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from gcbench.cache.phases import listening, phase
from gcbench.measure.memory import CUDA_BLOCK
from gcbench.measure.tracker import MemoryTracker
from gcbench.training import TrainingStep

TIMELINE_FILE = "timeline.json"
MAX_SAMPLES = 4000  # per step: enough for a figure 800 px wide, small enough to commit


class TimelineTracker(MemoryTracker):
    """The tracker, also keeping (time, bytes held) after every op and the phases' spans."""

    def __init__(self, block_size: int = 1, count_cpu_rng_states: bool = False) -> None:
        super().__init__(block_size, count_cpu_rng_states)
        self.started = time.perf_counter()
        self.samples: list[tuple[float, int]] = []
        self.phases: list[list[Any]] = []  # [name, start, end]
        self._open: dict[str, int] = {}

    def _update_peak(self) -> None:
        super()._update_peak()
        self.samples.append((time.perf_counter() - self.started, self.total))

    def mark(self, name: str, starting: bool) -> None:
        now = time.perf_counter() - self.started
        if starting:
            self._open[name] = len(self.phases)
            self.phases.append([name, now, now])
        elif name in self._open:
            self.phases[self._open.pop(name)][2] = now


@dataclass(frozen=True)
class StepTimeline:
    """One step: bytes held over time (from what the step starts from), its phases and its peak."""

    label: str
    times_s: tuple[float, ...]
    bytes: tuple[int, ...]
    phases: tuple[tuple[str, float, float], ...]
    baseline_bytes: int
    peak_bytes: int
    snapshot: str | None = None  # CUDA: the memory_viz snapshot's file name


def record_timeline(step: TrainingStep, label: str) -> StepTimeline:
    """One tracked step of ``step`` (warmed up by the caller): its memory after every op and its phases."""
    step.zero_grad()
    cuda = step.device.type == "cuda"
    tracker = TimelineTracker(CUDA_BLOCK if cuda else 1, count_cpu_rng_states=not cuda)
    for category, tensors in step.resident().items():
        tracker.register(tensors, category)
    tracker.watch_gradients(step.parameters())
    tracker.reset_peak()
    baseline = tracker.total
    tracker.samples.clear()
    tracker.started = time.perf_counter()
    with tracker, listening(tracker.mark):
        step.forward_backward()
        tracker.set_phase("optimizer")
        with phase("optimizer step"):
            step.optimizer_step()
    samples = _thinned(tracker.samples, MAX_SAMPLES)
    return StepTimeline(
        label,
        tuple(round(t, 6) for t, _ in samples),
        tuple(b for _, b in samples),
        tuple((name, round(start, 6), round(end, 6)) for name, start, end in tracker.phases),
        baseline,
        tracker.peak,
    )


def _thinned(samples: list[tuple[float, int]], most: int) -> list[tuple[float, int]]:
    """At most about ``most`` samples, keeping the largest of each stretch (so the peak survives)."""
    if len(samples) <= most:
        return samples
    stride = -(-len(samples) // most)
    return [max(samples[i : i + stride], key=lambda s: s[1]) for i in range(0, len(samples), stride)]


def cuda_snapshot(step: TrainingStep, path: Path) -> str | None:
    """CUDA: one more step under ``torch.cuda.memory._record_memory_history``, its snapshot saved to ``path``
    for memory_viz; None (and nothing written) elsewhere or when this torch has no such API."""
    memory = getattr(torch.cuda, "memory", None)
    if step.device.type != "cuda" or not hasattr(memory, "_record_memory_history"):
        return None
    try:
        memory._record_memory_history(max_entries=200_000)  # type: ignore[union-attr]
        step()
        torch.cuda.synchronize(step.device)
        memory._dump_snapshot(str(path))  # type: ignore[union-attr]
    except (RuntimeError, TypeError, AttributeError) as error:
        print(f"no memory snapshot: {error}", flush=True)
        return None
    finally:
        with contextlib.suppress(RuntimeError, TypeError):
            memory._record_memory_history(enabled=None)  # type: ignore[union-attr]
    return path.name


def write_timelines(timelines: Sequence[StepTimeline], point: str, path: Path) -> None:
    payload = {"point": point, "steps": [asdict(t) for t in timelines]}
    path.write_text(json.dumps(payload, separators=(",", ":")) + "\n")


def read_timelines(path: Path) -> tuple[str, list[StepTimeline]]:
    data = json.loads(path.read_text())
    steps = [
        StepTimeline(
            s["label"],
            tuple(s["times_s"]),
            tuple(s["bytes"]),
            tuple((p[0], p[1], p[2]) for p in s["phases"]),
            s["baseline_bytes"],
            s["peak_bytes"],
            s.get("snapshot"),
        )
        for s in data["steps"]
    ]
    return str(data["point"]), steps
