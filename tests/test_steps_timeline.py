"""Memory over many steps (sweep.steps) and the timeline of one step (sweep.timeline)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gcbench.cache.phases import listening, phase
from gcbench.errors import UsageError
from gcbench.experiment.experiment import build_experiment
from gcbench.measure.memory import track_step
from gcbench.measure.steps import measure_steps
from gcbench.measure.timeline import read_timelines, record_timeline, write_timelines
from gcbench.report.data import ReportData
from gcbench.report.load import Run
from gcbench.report.memory_steps import steps_figure
from gcbench.report.timeline import timeline_figure
from gcbench.results.records import MemoryResult, Point, Record, StepsResult
from gcbench.sweep.timeline import timeline_points
from gcbench.training import StepConfig, build_step
from gcbench.workloads import ModelConfig, WorkloadConfig

TINY = WorkloadConfig(
    model=ModelConfig(hidden=16, layers=1, heads=2, vocab=2000),
    query_length=8,
    passage_length=40,
    passage_lengths="lognormal:10:0.8",
)


def test_steps_draw_new_lengths_and_measure_each_step() -> None:
    step = build_step(StepConfig(TINY, "cache", 6, chunk_tokens=(64,)), torch.device("cpu"))
    step()
    own = step.batches
    measured = measure_steps(step, 4)
    assert len(measured.allocated_peak_bytes) == 4 and len(measured.resident_bytes) == 4
    assert len(set(measured.tokens)) > 1  # new lengths each step
    assert step.batches is own  # the point's own batch is back for its timing
    assert measured.reserved_peak_bytes == () and measured.fragmentation_bytes == ()  # CPU


def test_steps_below_one_is_refused_naming_the_key() -> None:
    raw = {"sweep": {"steps": 0, "device": "cpu"}}
    with pytest.raises(UsageError, match="sweep.steps"):
        build_experiment(raw, "x.toml", {})


def test_phases_reach_a_listener_and_cost_nothing_without_one() -> None:
    heard: list[tuple[str, bool]] = []
    with phase("alone"):
        pass
    with listening(lambda name, starting: heard.append((name, starting))), phase("a"), phase("b"):
        pass
    assert heard == [("a", True), ("b", True), ("b", False), ("a", False)]


def test_the_timeline_of_cache_marks_its_phases_in_order_and_keeps_the_peak() -> None:
    step = build_step(StepConfig(TINY, "cache", 6, (4,)), torch.device("cpu"))
    step()
    timeline = record_timeline(step, "cache")
    names = [name for name, _, _ in timeline.phases]
    assert names[0] == "encode without graph" and names[1] == "loss and cache"
    assert names[2].startswith("backward of the kept graph")  # keep_graphs=1: the last chunk's, first
    assert all(n.startswith("re-encode and backward") for n in names[3:-1]) and names[-1] == "optimizer step"
    assert len(names) == 2 + 2 + 3 + 1  # 2 query chunks + 3 passage chunks
    starts = [start for _, start, _ in timeline.phases]
    assert starts == sorted(starts)
    assert max(timeline.bytes) == timeline.peak_bytes
    _, tracked = track_step(step)  # the same tracker's peak, in a run of its own
    assert timeline.peak_bytes == tracked.total


def test_the_timeline_of_full_marks_its_phases() -> None:
    step = build_step(StepConfig(TINY, "full", 6), torch.device("cpu"))
    step()
    names = [name for name, _, _ in record_timeline(step, "full").phases]
    assert names == ["encode with graph", "loss and backward", "optimizer step"]


def _record(point: Point, steps: StepsResult | None = None) -> Record:
    return Record("x", "f", point, "ok", memory=MemoryResult("m", 100, steps=steps))


def test_timeline_points_pick_full_and_cache_at_the_largest_common_batch() -> None:
    experiment = build_experiment(
        {"sweep": {"strategies": ["full", "cache"], "batch_sizes": [8, 64], "chunk_sizes": [4, 8], "device": "cpu"}},
        "x.toml",
        {},
    )
    records = [_record(Point("full", 8)), _record(Point("cache", 8, (4,))), _record(Point("cache", 64, (8,)))]
    records += [_record(Point("cache", 64, (4,)))]
    assert timeline_points(experiment, records) == [Point("full", 8), Point("cache", 8, (4,))]
    records.append(_record(Point("full", 64)))
    assert timeline_points(experiment, records) == [Point("full", 64), Point("cache", 64, (8,))]


def test_the_report_draws_steps_and_the_timeline(tmp_path: Path) -> None:
    steps = StepsResult((10, 12, 11), resident_bytes=(1000, 1500, 1700), tokens=(5, 6, 7))
    records = (_record(Point("cache", 8, (4,)), steps), _record(Point("cache", 8, None, None, (64,)), steps))
    step = build_step(StepConfig(TINY, "cache", 6, (4,)), torch.device("cpu"))
    step()
    write_timelines([record_timeline(step, "cache (chunk 4)")], "batch 6", tmp_path / "timeline.json")
    assert read_timelines(tmp_path / "timeline.json")[1][0].label == "cache (chunk 4)"
    data = ReportData.of([Run("run", tmp_path / "results.jsonl", records)])
    figure = steps_figure(data)
    assert figure is not None
    left, right = figure.axes[:2]
    assert list(right.get_lines()[0].get_ydata()) == [0, 500, 700]  # growth since step 1, in bytes
    assert timeline_figure(data) is not None
    (tmp_path / "timeline.json").unlink()
    assert timeline_figure(data) is None
