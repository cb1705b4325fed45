"""After a sweep (``sweep.timeline = true``): the timeline of one step of ``full`` and of the first caching
setting at one batch, side by side in the report (see :mod:`gcbench.measure.timeline`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from gcbench.device import resolve_device
from gcbench.experiment import Experiment
from gcbench.measure.memory import release_memory
from gcbench.measure.timeline import TIMELINE_FILE, cuda_snapshot, record_timeline, write_timelines
from gcbench.processes import run_child
from gcbench.results.records import Point, Record
from gcbench.strategies import resolve_strategy
from gcbench.training import build_step
from gcbench.typed import dump, load

TARGET_CHUNKS = 8  # a caching setting with about this many chunks of its first input: each one visible


def timeline_points(experiment: Experiment, records: Sequence[Record]) -> list[Point]:
    """The reference and the first exact caching strategy at the largest batch where both ran ok; of the
    caching strategy's settings there, the one with the number of chunks nearest ``TARGET_CHUNKS``."""
    ok = [r for r in records if r.status == "ok" and r.round == 1]
    names = experiment.sweep.strategies
    reference = next((n for n in names if resolve_strategy(n).reference), None)
    cached = next((n for n in names if resolve_strategy(n).caches_representations and resolve_strategy(n).exact), None)
    if reference is None or cached is None:
        return []
    full_batches = {r.point.batch_size for r in ok if r.point.strategy == reference}
    candidates = [r.point for r in ok if r.point.strategy == cached and r.point.batch_size in full_batches]
    if not candidates:
        return []
    batch = max(p.batch_size for p in candidates)

    def distance(point: Point) -> float:
        size = (point.chunk_sizes or (batch,))[0] if point.chunk_tokens is None else batch
        return abs(batch / size - TARGET_CHUNKS)

    chosen = min((p for p in candidates if p.batch_size == batch), key=distance)
    return [Point(reference, batch), chosen]


def run_timelines(experiment: Experiment, records: Sequence[Record], out_dir: Path) -> Path | None:
    """Record the timelines in a child process into ``out_dir/timeline.json``; None when there is no pair to
    draw or the child failed (its output goes to ``logs/timeline.log``)."""
    points = timeline_points(experiment, records)
    if not points:
        return None
    path = out_dir / TIMELINE_FILE
    path.unlink(missing_ok=True)
    log = out_dir / "logs" / "timeline.log"
    run_child(
        _child,
        (experiment.to_dict(), [dump(p) for p in points], str(out_dir)),
        timeout=experiment.sweep.timeout,
        log=log,
    )
    return path if path.exists() else None


def _child(experiment_data: dict[str, Any], point_data: list[dict[str, Any]], out_dir: str) -> None:
    experiment = Experiment.from_dict(experiment_data)
    points = [load(Point, data) for data in point_data]
    sweep = experiment.sweep
    if sweep.threads:
        import torch

        torch.set_num_threads(sweep.threads)
    device = resolve_device(sweep.device)
    timelines = []
    for point in points:
        step = build_step(experiment.step_config(point), device)
        for _ in range(sweep.warmup):
            step()
        timeline = record_timeline(step, point.series)
        name = f"timeline-{point.strategy}.pickle"
        snapshot = cuda_snapshot(step, Path(out_dir) / name)
        timelines.append(timeline if snapshot is None else replace(timeline, snapshot=snapshot))
        del step
        release_memory(device)
    write_timelines(timelines, f"batch {points[0].batch_size}", Path(out_dir) / TIMELINE_FILE)
