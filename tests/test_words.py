"""What a report says happened: one rule for "within the budget", and a threshold passed named as such."""

from __future__ import annotations

from pathlib import Path

from gcbench.report.data import ReportData
from gcbench.report.headline import headline
from gcbench.report.load import Run, load_runs
from gcbench.report.tables import every_point

MIXED = Path(__file__).parent / "fixtures" / "report" / "mixed.jsonl"
MiB = 2**20


def test_under_a_report_budget_the_headline_and_the_tables_agree():
    """40 MiB: full's ok batch 32 (47.64 MiB) is over it. Every line and the points table must say so."""
    data = ReportData.of(load_runs([MIXED]), 40 * MiB)
    full_line, memory_line, cost_line = headline(data)
    assert full_line.startswith("full went over the 40.00 MiB budget at batch 32 (47.64 MiB)")
    assert "batch 32" not in memory_line and "batch 32" not in cost_line  # neither compares where full did not fit
    table = every_point(data).frame
    full = table[table["series"] == "full"].set_index("batch")
    assert full.loc[32, "status"] == "over the budget" and full.loc[16, "status"] == "ok"


def test_a_threshold_passed_is_over_the_budget_and_a_refusal_is_out_of_memory():
    data = ReportData.of(load_runs([MIXED]), 64 * MiB)
    outcome = data.points.set_index(["series", "batch_size"])["outcome"]
    assert outcome[("full", 64)] == "over the budget"  # its reason: the measured peak passed the threshold
    assert outcome[("checkpoint", 16)] == "out of memory"  # its reason: the allocator's "can't allocate memory"
    assert headline(data)[0].startswith("full went over the 64.00 MiB budget at batch 64")
    no_budget = ReportData.of([Run("quick", MIXED, load_runs([MIXED])[0].records)])
    assert headline(no_budget)[0].startswith("full went over its memory budget at batch 64")


def test_a_cpu_point_runs_one_thread_unless_told_and_an_oversubscribed_start_is_flagged(monkeypatch):
    import os

    import torch

    from gcbench.device import oversubscribed, point_threads
    from gcbench.results.environment import environment

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert point_threads(0, cpu) == 1 and point_threads(4, cpu) == 4 and point_threads(0, cuda) == 0
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 1.0, 1.0))
    assert oversubscribed(1) is None
    note = oversubscribed(4)
    assert note is not None and "4 torch threads with 0.5 of 2 cores free" in note
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert environment(cpu).oversubscribed == note  # recorded with the point, shown beside its times


def test_an_unknown_key_names_the_closest_known_one(tmp_path):
    import pytest

    from gcbench.errors import UsageError
    from gcbench.experiment import load_experiment

    path = tmp_path / "typo.toml"
    path.write_text('[workload]\nname = "dpr"\n[sweep]\nbatch_size = [8]\n')
    with pytest.raises(UsageError, match=r"unknown key sweep.batch_size; did you mean 'sweep.batch_sizes'\?"):
        load_experiment(str(path))
    path.write_text('[workload]\nname = "dpr"\n[sweeps]\n')
    with pytest.raises(UsageError, match=r"unknown key 'sweeps'; did you mean 'sweep'\?"):
        load_experiment(str(path))


def test_the_workload_flag_overrides_the_files_factory(tmp_path):
    """docs/cli.md: flags override the file's keys. --workload pkg:fn means what the file's factory means."""
    import shutil

    from gcbench.experiment import load_experiment

    example = Path(__file__).resolve().parents[1] / "experiments" / "bring-your-own"
    for file in example.iterdir():
        shutil.copy(file, tmp_path)
    (tmp_path / "wide.py").write_text(
        "from my_encoders import pairs\n\n\ndef wide_pairs(seed):\n    return pairs(seed)\n"
    )
    path = tmp_path / "bring-your-own.toml"  # it sets factory = "my_encoders:pairs"
    experiment = load_experiment(str(path), {"workload.name": ("wide:wide_pairs", "--workload")})
    assert experiment.workload.factory is None and experiment.workload.name == "wide:wide_pairs"


def test_a_loss_tile_for_a_loss_that_cannot_tile_is_refused_in_one_line(tmp_path):
    """Only gcbench's losses tile: --loss-tile on a user's own loss function is refused (exit 2), not ignored."""
    import os
    import subprocess
    import sys

    from gcbench.losses import InBatchSoftmax, tiling_loss
    from gcbench.workloads.user import FirstTwoInfoNCE

    assert tiling_loss(InBatchSoftmax()) is not None and tiling_loss(FirstTwoInfoNCE()) is not None
    assert tiling_loss(lambda a, b: (a @ b.T).logsumexp(1).mean()) is None
    (tmp_path / "own_loss.py").write_text(
        "import torch\nfrom torch import nn\nfrom gcbench import UserWorkload\n\n\n"
        "def my_loss(a, b):\n    return (a @ b.T).logsumexp(1).mean()\n\n\n"
        "def pairs(seed):\n    torch.manual_seed(seed)\n    encoder = nn.Linear(4, 3)\n"
        "    batches = lambda n, g: [torch.randn(n, 4, generator=g)] * 2\n"
        "    return UserWorkload([encoder, encoder], batches, loss_fn=my_loss)\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "gcbench", "verify", "--workload", "own_loss:pairs", "--loss-tile", "4"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(root)},
        timeout=300,
        check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--loss-tile" in done.stderr and "my_loss cannot compute in tiles" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_tune_says_one_round_and_why_a_row_is_blank_and_no_flops_is_not_zero():
    from rich.console import Console

    from gcbench.measure.stats import Estimate
    from gcbench.tune import Candidate, TuneResult, render_tune

    timed = Candidate("cache", (8, 8), 1, 10 * MiB, 4, flops=3_170_304, measured_peak_bytes=9 * MiB)  # a user's
    timed.time = timed.vs_winner = Estimate(0.010, 0.009, 0.011, 1, 5)
    unmeasured = Candidate("cache", (4, 4), 1, 8 * MiB, 8, flops=0)
    unmeasured.note = "not measured: ranked below the 1 measured (--measure all measures every one)"
    console = Console(record=True, width=240)
    for line in render_tune(TuneResult("mine", 16, 12 * MiB, 0.1, "cpu", [timed, unmeasured], 1)):
        console.print(line)
    text = console.export_text()
    assert "1 round)" in text and "1 rounds" not in text
    assert "not measured: ranked below the 1 measured" in text and "n/a" in text and "0.00317" in text


def test_the_gradient_error_figure_explains_its_markers_and_draws_the_tolerance():
    from gcbench.report.figures import gradient_error_figure

    figure = gradient_error_figure(ReportData.of(load_runs([MIXED])))
    labels = [text.get_text() for legend in figure.legends for text in legend.get_texts()]
    assert any("tolerance" in label and "1e-05" in label for label in labels)
    hollow = [line for ax in figure.axes for line in ax.get_lines() if line.get_markerfacecolor() == "white"]
    assert not hollow, "hollow markers (noisy times) have no meaning for gradients and no legend entry"
