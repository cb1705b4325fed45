"""verify --steps: exact strategies train the same as the full batch over many steps; accumulation drifts."""

from __future__ import annotations

import json

import pytest
import torch

from gcbench.cli import main
from gcbench.errors import UsageError
from gcbench.report.steps import load_trajectories, steps_figure, write_steps_report
from gcbench.trajectory import STEPS_TOLERANCE, verify_steps
from gcbench.workloads import ModelConfig, WorkloadConfig

TINY = ModelConfig(hidden=16, layers=1, heads=2, features=8, vocab=2000, dropout=0.1)


def tiny(dropout: float = 0.1) -> dict[str, WorkloadConfig]:
    model = ModelConfig(**{**TINY.__dict__, "dropout": dropout})
    return {"dpr": WorkloadConfig(name="dpr", model=model, query_length=6, passage_length=8)}


@pytest.fixture(scope="module")
def twenty_steps():
    torch.set_num_threads(1)
    return {
        t.strategy: t
        for t in verify_steps(
            20, strategies=["cache", "accumulate"], batch_size=8, chunk_sizes=[[3]], configs=tiny(), seed=1
        )
    }


@pytest.mark.slow
def test_cache_stays_within_float64_rounding_for_twenty_steps_with_dropout(twenty_steps):
    cache = twenty_steps["cache"]
    assert len(cache.points) == 20 and cache.precision == "float64" and cache.tolerance == 1e-9
    assert cache.passed
    assert all(p.param_distance <= 1e-9 for p in cache.points)
    assert all(p.loss_diff <= 1e-9 * max(1.0, abs(p.reference_loss)) for p in cache.points)
    assert cache.points[-1].reference_loss < cache.points[0].reference_loss, "it trains: the loss falls"


@pytest.mark.slow
def test_accumulation_visibly_drifts_and_the_drift_grows(twenty_steps):
    accumulate = twenty_steps["accumulate"]
    distances = [p.param_distance for p in accumulate.points]
    assert distances[-1] > 1e3 * STEPS_TOLERANCE["float64"], distances
    assert distances[-1] > distances[0], distances
    assert accumulate.passed, "an inexact strategy is reported, not judged"
    assert not accumulate.exact


def test_an_exact_claim_that_does_not_hold_fails(tmp_path, monkeypatch):
    (tmp_path / "claims.py").write_text(
        "from gcbench.strategies import Accumulate\n\n"
        "class ClaimsExact(Accumulate):\n    name = 'claims-exact'\n    exact = True\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    (wrong,) = verify_steps(3, strategies=["claims:ClaimsExact"], batch_size=6, chunk_sizes=[[2]], configs=tiny(0.0))
    assert wrong.exact and not wrong.passed


@pytest.mark.slow
def test_the_report_round_trips_and_draws_both_panels(twenty_steps, tmp_path):
    trajectories = list(twenty_steps.values())
    paths = write_steps_report(trajectories, tmp_path / "out", "gcbench verify --steps 20")
    assert [p.name for p in paths] == ["steps.json", "steps.png", "report.md"]
    assert load_trajectories(paths[0]) == trajectories
    data = json.loads(paths[0].read_text())
    assert data["trajectories"][0]["points"][0]["loss_diff"] == trajectories[0].points[0].loss_diff
    losses, distances = steps_figure(trajectories).axes
    assert distances.get_yscale() == "log"
    plotted = {line.get_label(): line.get_ydata() for line in distances.get_lines()}
    accumulate = twenty_steps["accumulate"]
    assert list(plotted[accumulate.label]) == [p.param_distance for p in accumulate.points]
    assert [line.get_label() for line in losses.get_lines()] == [t.label for t in trajectories]
    assert "not exact: reported" in paths[2].read_text()


def test_bad_steps():
    with pytest.raises(UsageError, match="--steps must be an int >= 1"):
        verify_steps(0, configs=tiny())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--steps", "-3"], "--steps must be >= 1, got -3"),
        (["--out", "x"], "--experiment and --out go with --steps N"),
        (["--steps", "2", "--nproc", "2"], "--steps runs in one process"),
        (["--steps", "2", "--experiment", "quick", "--workload", "dpr"], "--workload: --experiment names"),
        (["--steps", "2", "--chunk-sizes", "-1"], "--chunk-sizes"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["verify", *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists(), "nothing created before the input is checked"


@pytest.mark.slow
def test_the_command_writes_the_report(tmp_path, capsys):
    torch.set_num_threads(1)
    out = str(tmp_path / "steps")
    with pytest.raises(SystemExit) as exit_:
        main(["verify", "--steps", "2", "--workload", "dpr", "--batch-size", "4", "--chunk-sizes", "3", "--out", out])
    assert exit_.value.code == 0, capsys.readouterr()
    (trajectory,) = load_trajectories(tmp_path / "steps" / "steps.json")
    assert trajectory.strategy == "cache" and trajectory.precision == "float64" and len(trajectory.points) == 2
    command = json.loads((tmp_path / "steps" / "steps.json").read_text())["command"]
    assert command.startswith("gcbench verify --workload dpr") and "--steps 2" in command
    assert (tmp_path / "steps" / "steps.png").stat().st_size > 0
