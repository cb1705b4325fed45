"""Each timed step's process CPU time is recorded beside its wall time; the paired cost is reported by both."""

from __future__ import annotations

import json
from pathlib import Path

from gcbench.experiment import build_experiment
from gcbench.report.data import ReportData
from gcbench.report.headline import headline
from gcbench.report.load import Run
from gcbench.results import Point, Record
from gcbench.results.timing import merge_rounds
from gcbench.sweep.point import InProcess


def tiny():
    raw = {
        "name": "tiny",
        "workload": {"name": "dpr", "query_length": 8, "passage_length": 12},
        "model": {"hidden": 32, "layers": 1, "heads": 2, "vocab": 2000},
        "sweep": {
            "strategies": ["full", "cache"],
            "batch_sizes": [8],
            "chunk_sizes": [4],
            "device": "cpu",
            "warmup": 1,
            "repeats": 3,
            "max_repeats": 3,
            "equivalence": False,
        },
    }
    return build_experiment(raw, "tiny", {})


def test_a_tiny_sweep_records_cpu_time_and_the_headline_reports_the_cost_by_both():
    experiment = tiny()
    measurer = InProcess(experiment, "x")
    full = measurer.measure(Point("full", 8))
    cached = measurer.measure(Point("cache", 8, (4,)), reference=Point("full", 8))
    again = measurer.measure(Point("cache", 8, (4,)), round=2, reference=Point("full", 8))
    for record in (full, cached):
        assert record.status == "ok" and record.env.torch_threads == 1  # one thread by default on CPU
        time = record.time
        assert len(time.cpu_samples_s) == len(time.samples_s) and all(s > 0 for s in time.cpu_samples_s)
        assert time.cpu_median_s is not None
    paired = cached.paired
    assert len(paired.cpu_ratios) == len(paired.ratios) and paired.cpu_low <= paired.cpu_ratio <= paired.cpu_high
    read_back = Record.from_dict(json.loads(cached.to_json()))
    assert read_back.time.cpu_samples_s == cached.time.cpu_samples_s and read_back.paired.cpu_ratio == paired.cpu_ratio
    (merged,) = [r for r in merge_rounds([full, cached, again]) if r.point.strategy == "cache"]
    assert len(merged.paired.cpu_ratios) == len(cached.paired.cpu_ratios) + len(again.paired.cpu_ratios)
    cost = headline(ReportData.of([Run("tiny", Path("tiny.jsonl"), (full, merged))]))[2]
    assert "step time by process CPU time (95% CI" in cost and "; by wall time " in cost
    assert "The headline takes the CPU time" in cost
