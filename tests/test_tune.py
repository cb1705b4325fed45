"""``gcbench tune``: the search finds the most graphs that fit, the winner is measured within the budget."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gcbench.errors import UsageError
from gcbench.estimate import Estimator
from gcbench.experiment import load_experiment
from gcbench.measure.stats import Estimate, estimate
from gcbench.results import Point
from gcbench.results.units import format_bytes
from gcbench.tune import DEFAULT_MEASURED, Candidate, TuneResult, _most_kept, _search, _time, paste, render_tune, tune

TINY = """
name = "tiny"
[workload]
name = "dpr"
query_length = 8
passage_length = 12
hard_negatives = 0
[model]
hidden = 32
layers = 1
heads = 2
vocab = 2000
dropout = 0.0
[sweep]
strategies = ["full", "cache"]
batch_sizes = [32]
chunk_sizes = [4]
device = "cpu"
warmup = 1
repeats = 2
max_repeats = 3
max_time = 0.2
rounds = 1
"""
EXAMPLE = Path(__file__).resolve().parents[1] / "experiments" / "bring-your-own"


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


@given(peaks=st.lists(st.integers(0, 1000), min_size=1, max_size=40), limit=st.integers(0, 1000))
def test_bisection_finds_the_most_kept_graphs_that_fit(peaks, limit):
    """Memory grows with the graphs kept: the answer is the largest k whose peak fits, or none."""
    peaks = sorted(peaks)
    chunks = len(peaks) - 1
    found = _most_kept(lambda keep: peaks[chunks if keep == "all" else keep], chunks, limit)
    fitting = [k for k, p in enumerate(peaks) if p <= limit]
    assert (max(found) if found else None) == (max(fitting) if fitting else None)
    assert all(peaks[k] <= limit for k in found)


def test_the_search_keeps_as_many_graphs_as_the_budget_allows(tiny):
    experiment = load_experiment(str(tiny))
    estimator = Estimator(experiment.workload, "float32", "cpu")

    def peak(point: Point) -> int:
        return estimator.predict(experiment.step_config(point)).peak

    full, cached = peak(Point("full", 32)), peak(Point("cache", 32, (4,), 1))
    limit = (full + cached) // 2
    found, refused = _search(estimator, experiment, "cache", 32, limit)
    assert any(line.startswith("full: predicted") for line in refused)  # full does not fit halfway
    chunked = [c for c in found if c.chunk_sizes is not None]
    assert chunked and {c.chunk_sizes for c in chunked} >= {(4, 4), (8, 8)}
    for candidate in chunked:
        assert candidate.predicted_peak_bytes <= limit
        assert isinstance(candidate.keep_graphs, int) and candidate.keep_graphs >= 1
        one_more = Point("cache", 32, candidate.chunk_sizes, candidate.keep_graphs + 1)
        assert peak(one_more) > limit  # the bisection stopped at the last setting that fits


def test_paste_gives_the_call_to_write():
    assert paste(Candidate("cache", (16, 16), 3, 0, 0)) == "GradCache(encoders, loss_fn, chunk_size=16, keep_graphs=3)"
    assert paste(Candidate("cache", (16, 8), "all", 0, 0)) == (
        'GradCache(encoders, loss_fn, chunk_size=[16, 8], keep_graphs="all")'
    )
    assert "no cache" in paste(Candidate("full", None, None, 0, 0))


def test_tune_measures_a_winner_within_the_budget(tiny):
    experiment = load_experiment(str(tiny))
    estimator = Estimator(experiment.workload, "float32", "cpu")
    full = estimator.predict(experiment.step_config(Point("full", 32))).peak
    cached = estimator.predict(experiment.step_config(Point("cache", 32, (4,), 1))).peak
    budget = (full + cached) // 2
    result = tune(replace(experiment, sweep=replace(experiment.sweep, memory_budget=budget)), 32, measure=2)
    winner = result.winner
    assert winner is not None and winner.measured_peak_bytes is not None and winner.time is not None
    assert winner.measured_peak_bytes <= budget and winner.chunk_sizes is not None
    assert result.measured == 2 and len([c for c in result.candidates if c.time]) <= 2
    timed = [c for c in result.candidates if c.time is not None]
    assert winner.time.value == min(c.time.value for c in timed)  # the winner is the fastest measured
    assert all(c.vs_winner is not None and c.vs_winner.rounds == winner.time.rounds for c in timed)
    assert json.loads(json.dumps(result.to_dict()))["call"].startswith("GradCache(")


def test_each_setting_s_time_is_over_the_fastest_turn_by_turn(monkeypatch, tiny):
    """The ratios are of samples taken in the same turn; the fastest by median is the one they are over."""
    experiment = load_experiment(str(tiny))
    candidates = [Candidate("cache", (4,), k, 0, 0) for k in (0, 1, 2)]
    names = [c.point(32).id for c in candidates]
    # Two rounds of four turns: keep 1 is the fastest; keep 0 is twice its time in every turn but one.
    turns = [[1.0, 1.2, 0.9, 1.1], [1.3, 1.0, 1.1, 1.2]]
    times = {
        names[0]: [[2 * t for t in r] for r in turns],
        names[1]: turns,
        names[2]: [[1.5 * t for t in r] for r in turns],
    }
    times[names[0]][1][3] = 5.0
    rounds = iter([{n: tuple(times[n][i]) for n in names} for i in range(2)])
    monkeypatch.setattr("gcbench.tune._in_child", lambda function, experiment, points, log: next(rounds))
    _time(experiment, 32, candidates, 2, lambda _: None)
    for candidate, name in zip(candidates, names):
        assert candidate.time == estimate(times[name])
        paired = [[a / b for a, b in zip(mine, fastest)] for mine, fastest in zip(times[name], turns)]
        assert candidate.vs_winner == estimate(paired)
    assert candidates[0].vs_winner.value == 2.0 and candidates[2].vs_winner.value == 1.5


def interval(value: float) -> Estimate:
    return Estimate(value, value * 0.9, value * 1.2, 3, 30)


def test_render_tune_shows_every_candidate_the_winner_and_its_call():
    from rich.console import Console

    grid = [
        Candidate("cache", (8, 8), 3, 40 * 2**20, 10, 2 * 10**9, 41 * 2**20, interval(0.012), interval(1.0)),
        Candidate("cache", (4, 4), "all", 30 * 2**20, 16, 3 * 10**9, 31 * 2**20, interval(0.015), interval(1.25)),
        Candidate("full", None, None, 50 * 2**20, 2, 10**9, None, note="ran out of memory"),
        Candidate("cache", (2, 2), 0, 20 * 2**20, 64, 4 * 10**9, 60 * 2**20, note="measured peak over the budget"),
        Candidate("cache", (1, 1), 1, 10 * 2**20, 127, 5 * 10**9, 11 * 2**20, interval(0.02), interval(1.6)),
    ]
    result = TuneResult("tiny", 32, 48 * 2**20, 0.05, "cpu", grid, len(grid), ["checkpoint: predicted 99 MiB"])
    console = Console(width=250, record=True)
    for line in render_tune(result):
        console.print(line)
    text = console.export_text()
    assert f"tiny: batch 32, budget {format_bytes(result.budget_bytes)}" in text
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") > 2}
    assert set(rows) == {c.label for c in grid}
    for candidate in grid:
        row = rows[candidate.label]
        assert format_bytes(candidate.predicted_peak_bytes) in row and f"{candidate.flops / 1e9:.3g}" in row
        if candidate.time is not None:
            t, r = candidate.time, candidate.vs_winner
            assert f"{t.value * 1e3:,.1f}" in row and f"{t.low * 1e3:,.1f}-{t.high * 1e3:,.1f}" in row
            assert f"x{r.value:.2f} ({r.low:.2f}-{r.high:.2f})" in row
        else:
            assert candidate.note in row
    winner = grid[0]
    assert result.winner is winner
    assert f"fastest: {winner.label}: {winner.time.value * 1e3:,.1f} ms a step" in text
    assert f"use: {paste(winner)}" in text and "left out: checkpoint: predicted 99 MiB" in text
    assert len(grid) > DEFAULT_MEASURED and f"x{grid[0].vs_winner.value:.3f} the fastest of all 5 measured" in text
    nothing = TuneResult("tiny", 32, 2**20, 0.05, "cpu", grid[2:4], 2)
    lines = render_tune(nothing)
    assert lines[-1] == "nothing measured fits the budget: ran out of memory; measured peak over the budget"


def test_tune_refuses_bad_input_before_measuring(tiny):
    experiment = load_experiment(str(tiny))
    with pytest.raises(UsageError, match="--memory-budget"):
        tune(experiment, 32)
    budgeted = replace(experiment, sweep=replace(experiment.sweep, memory_budget=1 << 30))
    for kwargs, flag in (({"margin": 1.5}, "--margin"), ({"measure": 0}, "--measure")):
        with pytest.raises(UsageError, match=flag):
            tune(budgeted, 32, **kwargs)
    with pytest.raises(UsageError, match="--batch-size"):
        tune(budgeted, 0)


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "--memory-budget"),
        (["--memory-budget", "1GiB", "--measure", "some"], "--measure"),
        (["--memory-budget", "lots"], "--memory-budget"),
    ],
)
def test_tune_cli_bad_input_is_one_line_and_exit_2(tiny, args, message):
    done = subprocess.run(
        [sys.executable, "-m", "gcbench", "tune", str(tiny), "--batch-size", "32", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


@pytest.mark.slow
def test_tune_works_on_a_users_own_workload(tmp_path):
    """A user's factory by import path, from a folder outside the repository, in the measuring processes too."""
    shutil.copy(EXAMPLE / "my_encoders.py", tmp_path / "tune_encoders.py")
    done = subprocess.run(
        [sys.executable, "-m", "gcbench", "tune", "--workload", "tune_encoders:pairs", "--batch-size", "16"]
        + ["--chunk-sizes", "4", "--memory-budget", "1GiB", "--rounds", "1", "--max-time", "0.2", "--measure", "2"]
        + ["--format", "json"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["winner"]["measured_peak_bytes"] <= result["memory_budget_bytes"]
    assert result["winner"]["step_time_s"]["value"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_tune_and_the_sweep_measure_the_same_peak(tiny, tmp_path, device):
    """One protocol: a setting's peak measured by tune's child is the sweep point's ``memory.peak_bytes``, to
    the byte (the quantity both compare with the budget: the allocator's, baseline included); on CUDA both
    under the budget's cap."""
    from gcbench import tune as tune_module
    from gcbench.sweep.runner import run_point_process

    overrides = {"sweep.device": (device, "--device")}
    if device == "cuda":
        overrides["sweep.memory_budget"] = ("2GiB", "--memory-budget")
    experiment = load_experiment(str(tiny), overrides)
    point = Point("cache", 32, (4,))
    by_tune = tune_module._in_child(tune_module._child_peak, experiment, [point], tmp_path / "tune.log")
    record = run_point_process(experiment, point, None, tmp_path)
    assert record.status == "ok" and record.memory is not None
    assert by_tune == record.memory.peak_bytes
