"""``gcbench sweep`` end to end: records, resume after kill -9, out of memory, bad input, honest memory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gcbench.cli import main
from gcbench.errors import UsageError
from gcbench.experiment import build_experiment, load_experiment
from gcbench.measure.memory import measure_step_memory, track_step
from gcbench.results import Point, ResultsStore
from gcbench.sweep import run_sweep
from gcbench.sweep.runner import run_point_process

MICRO = """
name = "micro"
[workload]
name = "dpr"
query_length = 8
passage_length = 12
[model]
hidden = 16
layers = 1
heads = 2
vocab = 2000
[sweep]
strategies = ["full", "cache", "accumulate"]
batch_sizes = [4, 8, 16]
chunk_sizes = [4]
device = "cpu"
repeats = 2
max_repeats = 2
rounds = 1
timeout = 120
"""


@pytest.fixture
def micro(tmp_path: Path) -> Path:
    path = tmp_path / "micro.toml"
    path.write_text(MICRO)
    return path


def sweep_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gcbench", "sweep", *args], capture_output=True, text=True, timeout=600
    )


def ids(path: Path) -> list[str]:
    return [r.point.id for r in ResultsStore(path).load()]


@pytest.mark.slow
def test_micro_sweep_end_to_end(micro, tmp_path):
    out = tmp_path / "out"
    done = sweep_cli(str(micro), "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    records = ResultsStore(out / "results.jsonl").load()
    assert len(records) == 9 and all(r.status == "ok" for r in records)
    for r in records:
        assert r.memory.peak_bytes > r.memory.baseline_bytes > 0
        assert r.memory.peak_bytes == r.memory.baseline_bytes + r.memory.step_peak_bytes
        assert r.memory.peak_bytes == max(r.memory.forward_backward_peak_bytes, r.memory.optimizer_peak_bytes)
        assert set(r.memory.breakdown) == {
            "parameters",
            "gradients",
            "optimizer",
            "inputs",
            "activations",
            "temporaries",
        }
        assert abs(r.memory.tracked_peak_bytes - r.memory.peak_bytes) <= 0.01 * r.memory.peak_bytes
        assert len(r.time.samples_s) == 2 and r.time.q1_s <= r.time.median_s <= r.time.q3_s
        assert r.time.examples_per_s == pytest.approx(r.point.batch_size / r.time.median_s)
        assert r.env.torch == torch.__version__ and r.env.device == "cpu" and r.schema == 2
    by_id = {r.point.id: r for r in records}
    assert by_id["full batch=4 chunks=-"].equivalence.reference == "self"
    assert by_id["cache batch=16 chunks=4"].equivalence.max_rel_err < 1e-5
    assert by_id["accumulate batch=16 chunks=4"].equivalence.max_rel_err > 1e-2
    csv = (out / "results.csv").read_text().splitlines()
    assert len(csv) == 10 and "peak_bytes" in csv[0]
    assert "full" in done.stdout and "cache" in done.stdout  # the summary tables


@pytest.mark.slow
def test_resume_after_kill_loses_and_duplicates_nothing(micro, tmp_path):
    out = tmp_path / "killed"
    results = out / "results.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "gcbench", "sweep", str(micro), "--out", str(out), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and (not results.exists() or results.read_bytes().count(b"\n") < 3):
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    before = ids(results)
    assert 3 <= len(before) < 9, "the sweep should have been killed mid-way"
    with open(results, "ab") as f:  # as if the kill had torn a write
        f.write(b'{"schema": 1, "experiment": "mic')
    done = sweep_cli(str(micro), "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    after = ids(results)
    assert after[: len(before)] == before, "finished points are kept, not rerun"
    assert sorted(after) == sorted(p.id for p in load_experiment(str(micro)).points())
    assert len(after) == len(set(after)) == 9
    assert "torn" in done.stderr


@pytest.mark.slow
def test_out_of_memory_is_recorded_and_the_sweep_goes_on(micro, tmp_path):
    out = tmp_path / "oom"
    experiment = load_experiment(
        str(micro),
        {
            "sweep.memory_budget": ("1.2MiB", "--memory-budget"),
            "sweep.strategies": (["full", "cache"], "--strategies"),
            "sweep.equivalence": (False, "--set"),
        },
    )
    outcome = run_sweep(experiment, out)
    status = {r.point.id: r.status for r in outcome.records}
    full = [status[f"full batch={b} chunks=-"] for b in (4, 8, 16)]
    assert "oom" in full, status
    first = full.index("oom")
    assert all(s == "skipped" for s in full[first + 1 :])
    oom = next(r for r in outcome.records if r.status == "oom")
    assert oom.memory.peak_bytes > experiment.sweep.memory_budget and "over the memory budget" in oom.reason
    assert len(outcome.records) == 6, "the cache points ran after full ran out of memory"


@pytest.mark.slow
def test_rounds_time_every_point_again_in_fresh_processes_and_readers_merge_them(micro, tmp_path):
    out = tmp_path / "rounds"
    experiment = load_experiment(
        str(micro),
        {
            "sweep.rounds": (2, "--rounds"),
            "sweep.strategies": (["cache", "full"], "--strategies"),
            "sweep.batch_sizes": ([4, 8], "--batch-sizes"),
            "sweep.equivalence": (False, "--set"),
        },
    )
    outcome = run_sweep(experiment, out)
    stored = ResultsStore(out / "results.jsonl").load()
    grid = ["full batch=4 chunks=-", "cache batch=4 chunks=4", "full batch=8 chunks=-", "cache batch=8 chunks=4"]
    assert [(r.point.id, r.round) for r in stored] == [(p, 1) for p in grid] + [(p, 2) for p in grid]
    assert all(r.status == "ok" and r.time is not None for r in stored), [r.reason for r in stored]
    assert all(r.memory is None and r.equivalence is None for r in stored if r.round == 2)
    # cache is timed in turns with full at its batch, in every round; full, the reference, alone.
    assert all(
        r.paired.reference == "full" and len(r.paired.ratios) == 2 for r in stored if r.point.strategy == "cache"
    )
    assert all(r.paired is None for r in stored if r.point.strategy == "full")
    assert all(r.env.malloc.startswith("glibc") for r in stored) if sys.platform.startswith("linux") else True
    merged = {r.point.id: r for r in outcome.records}
    assert list(merged) == grid and all(r.time.samples_per_round == (2, 2) for r in merged.values())
    assert merged["cache batch=8 chunks=4"].paired.ratios_per_round == (2, 2)
    assert merged["full batch=8 chunks=-"].memory == stored[2].memory  # memory from round 1
    # A round lost (killed before it was stored) is run again, and nothing else; more rounds resume too.
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    again = run_sweep(experiment, out)
    assert (again.ran, again.resumed, again.timed) == (0, 4, 1)
    more = run_sweep(replace(experiment, sweep=replace(experiment.sweep, rounds=3)), out)
    assert (more.ran, more.timed) == (0, 4) and all(len(r.time.rounds) == 3 for r in more.records)


@pytest.mark.slow
def test_memory_is_measured_once_because_two_processes_agree_to_the_byte(micro, tmp_path):
    experiment = load_experiment(str(micro), {"sweep.equivalence": (False, "--set")})
    for point in (Point("full", 16), Point("cache", 16, (4,))):
        first, second = (run_point_process(experiment, point, None, tmp_path) for _ in range(2))
        assert first.memory.peak_bytes > 0 and first.memory == second.memory, point.id


def test_a_crashing_point_is_an_error_record(micro, tmp_path):
    experiment = load_experiment(str(micro))
    record = run_point_process(experiment, Point("cache", 4, (2, 2, 2)), None, tmp_path)
    assert record.status == "error" and "chunk_sizes: got 3 sizes for 2 encoders" in record.reason


HANGING = """
import threading

import torch
from torch import nn

from gcbench import UserWorkload


class Hangs(nn.Linear):
    def forward(self, x):
        threading.Event().wait()  # never set: the step never ends, however fast the machine
        return super().forward(x)


def build(seed):
    make = lambda n, g: [torch.randn(n, 4, generator=g), torch.randn(n, 4, generator=g)]
    return UserWorkload([Hangs(4, 4), Hangs(4, 4)], make, loss_fn=lambda a, b: (a @ b.T).sum())
"""


def test_a_point_that_never_ends_is_a_timeout(tmp_path, monkeypatch):
    """A step that waits forever (not one that is merely slow, which a fast machine would finish) is ended at
    the point's timeout and recorded as such."""
    (tmp_path / "hanging_encoders.py").write_text(HANGING)
    monkeypatch.syspath_prepend(str(tmp_path))
    raw = {"workload": {"name": "hanging_encoders:build"}, "sweep": {"timeout": 1.0, "device": "cpu"}}
    experiment = build_experiment(raw, "hanging", {})
    record = run_point_process(experiment, Point("full", 4), None, tmp_path)
    assert record.status == "timeout" and "timeout" in record.reason


def test_results_of_another_experiment_are_refused(micro, tmp_path, capsys):
    out = tmp_path / "other"
    experiment = load_experiment(
        str(micro), {"sweep.batch_sizes": ([4], "--batch-sizes"), "sweep.strategies": (["full"], "--strategies")}
    )
    run_sweep(experiment, out)
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "sweep",
                str(micro),
                "--out",
                str(out),
                "--set",
                "model.hidden=32",
                "--batch-sizes",
                "4",
                "--strategies",
                "full",
            ]
        )
    assert exit_.value.code == 2 and "--fresh" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, args, expected",
    [
        ("name = [unclosed", [], "not valid TOML"),
        (MICRO, ["--strategies", "full,warp"], "--strategies: unknown value 'warp'"),
        (MICRO, ["--batch-sizes", "8,-4"], "--batch-sizes: must be >= 1, got -4"),
        (MICRO, ["--chunk-sizes", "0"], "--chunk-sizes: must be >= 1"),
        (MICRO, ["--memory-budget", "lots"], "--memory-budget: 'lots' is not a memory size"),
        (MICRO, ["--precision", "int4"], "--precision: unknown value 'int4'"),
        (MICRO, ["--set", "model.colour=3"], "--set model.colour: unknown key"),
        (MICRO.replace("[sweep]", "[sweep]\nbogus = 1"), [], "unknown key sweep.bogus"),
        (MICRO.replace('name = "dpr"', 'name = "dpx"'), [], "workload.name: unknown value 'dpx'"),
        (MICRO.replace("heads = 2", "heads = 3"), [], "must be a multiple of model.heads"),
        (MICRO, ["--repeats", "0"], "--repeats: must be >= 1"),
    ],
)
def test_bad_experiments_exit_2_before_any_work(tmp_path, capsys, content, args, expected):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", str(path), "--out", str(out), *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and expected in err, err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists(), "nothing may start before the input is checked"


def test_unknown_experiment_name(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", "no-such-experiment"])
    assert exit_.value.code == 2 and "quick" in capsys.readouterr().err


class KnownAllocation:
    """A stand-in training step whose forward+backward holds exactly 96 MiB at its peak."""

    device = torch.device("cpu")
    size = 96 * 2**20

    def __init__(self) -> None:
        self.weights = torch.zeros(1024)

    def zero_grad(self) -> None:
        pass

    def forward_backward(self) -> None:
        block = torch.empty(self.size, dtype=torch.uint8)
        block.fill_(1)
        del block

    def optimizer_step(self) -> None:
        self.weights.add_(1.0)

    def parameters(self):
        return []

    def resident(self):
        return {"parameters": [self.weights]}


def test_cpu_memory_measure_matches_a_known_allocation():
    step = KnownAllocation()
    measured = measure_step_memory(step)
    assert measured.baseline_bytes == 4096
    assert abs(measured.step_peak_bytes - step.size) <= 0.01 * step.size
    assert abs(measured.phase_peak_bytes["forward_backward"] - step.size) <= 0.01 * step.size
    assert measured.phase_peak_bytes["optimizer"] < 0.01 * step.size
    baseline, tracked = track_step(step)
    assert baseline == 4096 and abs(tracked.total - baseline - step.size) <= 0.01 * step.size
    assert tracked.breakdown["activations"] == step.size


@pytest.mark.slow
def test_quick_experiment_cache_memory_grows_far_slower_than_full(tmp_path):
    experiment = load_experiment(
        "quick",
        {
            "sweep.batch_sizes": ([16, 256], "--batch-sizes"),
            "sweep.strategies": (["full", "cache"], "--strategies"),
            "sweep.chunk_sizes": ([[16]], "--chunk-sizes"),
            "sweep.equivalence": (False, "--set"),
            "sweep.repeats": (1, "--repeats"),
            "sweep.rounds": (1, "--rounds"),
        },
    )
    records = {r.point.id: r.memory.peak_bytes for r in run_sweep(experiment, tmp_path).records}
    full_growth = records["full batch=256 chunks=-"] - records["full batch=16 chunks=-"]
    cache_growth = records["cache batch=256 chunks=16"] - records["cache batch=16 chunks=16"]
    assert full_growth > 20 * max(cache_growth, 1), (full_growth, cache_growth)
    assert records["cache batch=256 chunks=16"] < records["full batch=256 chunks=-"] / 4


@pytest.mark.slow
def test_sweep_on_two_ranks_records_per_rank_memory(micro, tmp_path):
    out = tmp_path / "ranks"
    done = sweep_cli(
        str(micro), "--out", str(out), "--quiet", "--nproc", "2", "--strategies", "full,cache", "--batch-sizes", "8"
    )
    assert done.returncode == 0, done.stderr
    records = ResultsStore(out / "results.jsonl").load()
    assert [r.status for r in records] == ["ok", "ok"], [r.reason for r in records]
    for r in records:
        d = r.distributed
        assert d.world_size == 2 and d.backend == "gloo" and len(d.rank_peak_bytes) == 2
        assert d.peak_max_bytes >= d.peak_mean_bytes > 0 and d.local_batch_size == 4
        assert r.time.examples_per_s == pytest.approx(8 / r.time.median_s)
    cache = next(r for r in records if r.point.strategy == "cache")
    assert cache.equivalence.max_rel_err < 1e-5


def test_keep_graphs_is_a_grid_dimension_of_the_strategies_that_keep_graphs(micro):
    experiment = load_experiment(
        str(micro),
        {"sweep.keep_graphs": ([0, 2, "all"], "--keep-graphs"), "sweep.batch_sizes": ([8], "--batch-sizes")},
    )
    assert [p.id for p in experiment.points()] == [
        "full batch=8 chunks=-",
        "cache batch=8 chunks=4 keep=0",
        "cache batch=8 chunks=4 keep=2",
        "cache batch=8 chunks=4 keep=all",
        "accumulate batch=8 chunks=4",
    ]
    assert experiment.points()[1].series == "cache (chunk 4, keep 0)"
    default = load_experiment(str(micro), {"sweep.batch_sizes": ([8], "--batch-sizes")})
    assert default.fingerprint == experiment.fingerprint  # a grid dimension: extending it resumes
    assert [p.keep_graphs for p in default.points()] == [None, None, None]
    with pytest.raises(UsageError, match="sweep.keep_graphs: none of the strategies"):
        load_experiment(
            str(micro), {"sweep.keep_graphs": ([2], "--keep-graphs"), "sweep.strategies": (["full"], "--strategies")}
        )
    with pytest.raises(UsageError, match="--keep-graphs"):
        load_experiment(str(micro), {"sweep.keep_graphs": ([-1], "--keep-graphs")})
