"""A series of batches from a few fake steps (gcbench.estimate.series): the same predictions as a fake step
at every point, byte for byte, on every shipped experiment, and the number of fake steps held."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from gcbench.estimate import plan as plan_module
from gcbench.estimate.estimator import Estimator
from gcbench.estimate.plan import estimate_experiment
from gcbench.estimate.series import predict_series
from gcbench.experiment import load_experiment, shipped
from gcbench.results.records import Prediction

BATCHES = [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


def prediction(peak: int, loss: int = 7) -> Prediction:
    return Prediction(
        target="cuda",
        peak_bytes=peak,
        baseline_bytes=1000,
        forward_backward_peak_bytes=peak,
        optimizer_peak_bytes=1000,
        breakdown={"parameters": 1000, "activations": peak - 1000},
        loss_peak_bytes=loss,
        seconds=0.5,
    )


def counted(peak_of):
    calls: list[int] = []

    def predict(batch: int) -> Prediction:
        calls.append(batch)
        return prediction(peak_of(batch), loss=batch)

    return predict, calls


def same(a: Prediction, b: Prediction) -> bool:
    return replace(a, seconds=None) == replace(b, seconds=None)


def test_a_quadratic_series_takes_four_steps_and_a_check_at_the_largest():
    predict, calls = counted(lambda b: 1000 + 48 * b + 3 * b * b)
    found = predict_series(predict, BATCHES, loss_peak=lambda b: b)
    assert calls == [8, 16, 32, 64, 4096]
    assert all(same(found[b], prediction(1000 + 48 * b + 3 * b * b, loss=b)) for b in BATCHES)


def test_a_peak_that_moves_to_the_score_matrix_is_stepped_through():
    """Negative control: the activations' line until 1024, then the score matrix's square; a fit from the
    small batches is wrong at the large ones, and the check at the largest batch catches it."""
    peak = lambda b: max(5_000_000 + 4096 * b, 4 * b * b)  # noqa: E731
    predict, calls = counted(peak)
    found = predict_series(predict, BATCHES, loss_peak=lambda b: b)
    assert all(same(found[b], prediction(peak(b), loss=b)) for b in BATCHES)
    assert 4096 in calls and len(calls) > 5
    wrong = 5_000_000 + 4096 * 4096  # what the line through the small batches says at 4096
    assert found[4096].peak_bytes != wrong


def test_without_fit_every_batch_is_a_step():
    predict, calls = counted(lambda b: 1000 + 48 * b)
    predict_series(predict, BATCHES, loss_peak=lambda b: b, fit=False)
    assert calls == BATCHES


def test_a_step_that_grows_faster_than_a_square_is_never_read_off():
    predict, calls = counted(lambda b: 1000 + b**3)
    found = predict_series(predict, BATCHES, loss_peak=lambda b: b)
    assert calls == BATCHES and found[4096].peak_bytes == 1000 + 4096**3


TINY_DPR = {
    "model.hidden": 32,
    "model.layers": 1,
    "model.heads": 2,
    "model.ffn": 64,
    "model.vocab": 2000,
    "workload.query_length": 8,
    "workload.passage_length": 16,
}


def count_steps(monkeypatch) -> list[Estimator]:
    made: list[Estimator] = []

    class Counting(Estimator):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(plan_module, "Estimator", Counting)
    return made


@pytest.mark.slow
def test_the_dpr_table_takes_a_held_number_of_fake_steps(monkeypatch):
    """The guard against falling back to a step per point: the DPR grid (4 strategies x 10 batches, chunk
    advice for 3 memories at 4096; a one-layer model, the same grid) in 38 fake steps, not 40 + 8."""
    made = count_steps(monkeypatch)
    experiment = load_experiment("dpr-bert-base", {k: (v, "--set") for k, v in TINY_DPR.items()})
    estimate_experiment(experiment, "cuda", [2**20, 2**22, 2**24])
    assert made[0].fake_steps == 38


def strip(plan):
    rows = [(r.point, r.prediction and replace(r.prediction, seconds=None), r.error) for r in plan.rows]
    return rows, plan.advice


# Full size, twice each: minutes for the tile-heavy and BERT-base grids, so those run only when asked
# (GCBENCH_HEAVY=1 pytest tests/test_estimate_series.py); the DPR grid's count of steps is held above.
HEAVY = {"dpr-bert-base", "tiled-loss-clip", "tiled-loss-simclr", "peers-minilm"}


@pytest.mark.slow
@pytest.mark.parametrize("name", shipped())
def test_every_shipped_experiment_is_predicted_as_by_a_step_per_point(name):
    if name in HEAVY and not os.environ.get("GCBENCH_HEAVY"):
        pytest.skip(f"{name}: full-size fast-against-full comparison, run with GCBENCH_HEAVY=1")
    experiment = load_experiment(name)
    memories = [11 * 2**30, 24 * 2**30, 80 * 2**30]
    fast = estimate_experiment(experiment, "cuda", memories)
    full = estimate_experiment(experiment, "cuda", memories, fit=False)
    assert strip(fast) == strip(full)
