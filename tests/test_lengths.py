"""Variable lengths and token-budget chunks: exact against the full batch (float64), with controls that bite."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gcbench.cache import GradCache
from gcbench.cache.batching import row_lengths, take_rows, token_chunks, trim_padding
from gcbench.cli import main
from gcbench.errors import UsageError
from gcbench.estimate import Estimator
from gcbench.experiment.experiment import build_experiment
from gcbench.measure.equivalence import check_strategy, compare, gradients
from gcbench.strategies import make_strategy
from gcbench.training import StepConfig
from gcbench.workloads import ModelConfig, WorkloadConfig, build_workload
from gcbench.workloads.lengths import MSMARCO, parse_lengths
from gcbench.workloads.shapes import shapes_only

TINY = ModelConfig(hidden=16, layers=1, heads=2, vocab=2000, dropout=0.0)


def tiny(passage_lengths: str = "lognormal:10:0.8", dropout: float = 0.0, **fields: object) -> WorkloadConfig:
    model = ModelConfig(hidden=16, layers=1, heads=2, vocab=2000, dropout=dropout)
    return WorkloadConfig(model=model, query_length=12, passage_length=40, passage_lengths=passage_lengths, **fields)


# Token chunks as a partition ------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=60), st.integers(64, 400))
def test_token_chunks_partition_the_rows_within_the_budget(lengths: list[int], budget: int) -> None:
    chunks = token_chunks(lengths, budget)
    assert sorted(row for chunk in chunks for row in chunk) == list(range(len(lengths)))
    for chunk in chunks:
        assert len(chunk) * max(lengths[r] for r in chunk) <= budget
        assert list(chunk) == sorted(chunk)  # batch order inside a chunk
    # longest first: no row of a later chunk is longer than any row of an earlier one
    for earlier, later in itertools.pairwise(chunks):
        assert min(lengths[r] for r in earlier) >= max(lengths[r] for r in later)


def test_a_budget_below_the_longest_row_is_refused() -> None:
    with pytest.raises(ValueError, match="chunk_tokens: a budget of 10 tokens is smaller than the longest row"):
        token_chunks([3, 11, 2], 10)


# Lengths ---------------------------------------------------------------------------------------------------


def test_lengths_follow_the_distribution_and_the_cap() -> None:
    g = torch.Generator().manual_seed(0)
    fixed = parse_lengths("fixed", 40, "k").draw(50, 40, g)
    assert fixed.tolist() == [40] * 50
    uniform = parse_lengths("uniform:5", 40, "k").draw(2000, 40, g)
    assert uniform.min() == 5 and uniform.max() == 40
    tail = MSMARCO.draw(20000, 512, g).double()
    assert 60 <= tail.median() <= 70  # the documented median, 65 tokens
    assert tail.max() == 512 or tail.max() > 300  # a long tail, capped


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("uniform:0", "LOW an integer from 1 to the cap"),
        ("uniform:41", "LOW an integer from 1 to the cap"),
        ("lognormal:-3:0.5", "MEDIAN > 0"),
        ("lognormal:30:-1", "SIGMA >= 0"),
        ("lognormal:30", "two parameters"),
        ("lognormal:x:1", "not a number"),
        ("zipf", "not a length distribution"),
        ("fixed:3", "takes no parameters"),
    ],
)
def test_impossible_distributions_name_the_key(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"workload.passage_lengths: .*{message}"):
        WorkloadConfig(passage_length=40, passage_lengths=text)


def test_padding_is_trimmed_per_chunk_to_its_longest_row() -> None:
    workload = build_workload(tiny())
    passages = workload.batches(6, seed=1)[1]
    lengths = row_lengths(passages)
    assert lengths is not None and len(lengths) == 12
    chunk = take_rows(passages, slice(0, 3), lengths)
    assert chunk["input_ids"].shape == (3, max(lengths[:3]))
    assert chunk["attention_mask"].shape == (3, max(lengths[:3]))
    assert trim_padding(passages, 40) is passages


def test_lengths_are_known_under_fake_tensors_and_match_the_real_ones() -> None:
    real = row_lengths(build_workload(tiny()).batches(5, seed=1)[1])
    with shapes_only():
        fake = row_lengths(build_workload(tiny()).batches(5, seed=1)[1])
    assert real == fake


# Exactness ---------------------------------------------------------------------------------------------------


def _full_gradients(config: WorkloadConfig, batch: int) -> tuple[list[torch.Tensor], float]:
    workload = build_workload(config, dtype=torch.float64)
    batches = workload.batches(batch, seed=1, dtype=torch.float64)
    loss = make_strategy("full", workload.objective).forward_backward(batches)
    return gradients(workload.objective.parameters()), float(loss)


@settings(max_examples=12, deadline=None)
@given(
    st.integers(2, 9),
    st.sampled_from(["lognormal:8:0.9", "uniform:1", "fixed", "msmarco"]),
    st.integers(40, 160),
    st.sampled_from([0, 1, "all"]),
)
def test_token_chunks_equal_the_full_batch_in_float64(batch: int, lengths: str, budget: int, keep: object) -> None:
    """No dropout: the full batch padded to its longest row, one forward, against chunks by tokens (rows sorted
    by length, each chunk padded to its own longest row): the same gradients to float64 rounding."""
    config = tiny(lengths)
    reference, reference_loss = _full_gradients(config, batch)
    workload = build_workload(config, dtype=torch.float64)
    batches = workload.batches(batch, seed=1, dtype=torch.float64)
    objective = workload.objective
    engine = GradCache(objective.encoders, objective.loss_fn, chunk_tokens=budget, keep_graphs=keep)  # type: ignore[arg-type]
    loss = engine(*batches)
    result = compare(gradients(objective.parameters()), reference, float(loss), reference_loss)
    assert result.passes(1e-12), result


def test_control_order_not_restored_fails() -> None:
    """The check bites: chunks by tokens whose representations reach the loss in sorted order (not the batch's)
    give other gradients."""
    config = tiny("lognormal:8:0.9")
    reference, reference_loss = _full_gradients(config, 7)
    workload = build_workload(config, dtype=torch.float64)
    batches = workload.batches(7, seed=1, dtype=torch.float64)
    objective = workload.objective
    engine = GradCache(objective.encoders, objective.loss_fn, chunk_tokens=48)
    steps = engine.encode_steps(*batches)
    lengths = [row_lengths(b) for b in batches]
    reps: list[list[torch.Tensor]] = [[], []]
    for i, rows in steps:
        reps[i].append(objective.encoders[i](**take_rows(batches[i], rows, lengths[i])))
    loss = objective.loss_fn(*(torch.cat(r) for r in reps))  # sorted order: wrong pairs
    loss.backward()
    result = compare(gradients(objective.parameters()), reference, float(loss.detach()), reference_loss)
    assert not result.passes(1e-6)


def test_token_chunks_with_dropout_against_the_mask_consistent_reference() -> None:
    result = check_strategy(tiny(dropout=0.1), "cache", 7, precision="float64", chunk_tokens=(48,))
    assert result.passes(1e-10), result
    control = check_strategy(tiny(dropout=0.1), "accumulate", 7, (3,), precision="float64")
    assert not control.passes(1e-6)


def test_engine_needs_one_way_of_chunking() -> None:
    objective = build_workload(tiny()).objective
    with pytest.raises(TypeError, match="or give chunk_tokens"):
        GradCache(objective.encoders, objective.loss_fn)
    with pytest.raises(ValueError, match="not both"):
        GradCache(objective.encoders, objective.loss_fn, 4, chunk_tokens=64)
    with pytest.raises(ValueError, match="chunks by rows only"):
        make_strategy("accumulate", objective, chunk_tokens=64)


# The estimate ---------------------------------------------------------------------------------------------------


def test_the_estimate_predicts_token_chunks_and_sees_their_lengths() -> None:
    """Under fake tensors the chunks are the ones the real step forms (the lengths travel beside the mask), and a
    larger budget predicts a larger peak."""
    config = tiny()
    estimator = Estimator(config, "float32", "cpu")
    small = estimator.predict(StepConfig(config, "cache", 64, chunk_tokens=(64,)))
    large = estimator.predict(StepConfig(config, "cache", 64, chunk_tokens=(1024,)))
    assert small.peak_bytes < large.peak_bytes
    step_config = StepConfig(config, "cache", 64, chunk_tokens=(64,))
    workload = build_workload(config)
    real = make_strategy("cache", workload.objective, chunk_tokens=64).encode_steps(workload.batches(64, seed=1))
    assert estimator.token_chunk_count(step_config) == len(real)


# Experiments: bad input before any work -------------------------------------------------------------------------


def _experiment(sweep: dict[str, object], workload: dict[str, object] | None = None) -> None:
    raw = {
        "workload": {"name": "dpr", "query_length": 8, "passage_length": 48, **(workload or {})},
        "model": {"hidden": 16, "layers": 1, "heads": 2, "vocab": 2000},
        "sweep": {"strategies": ["full", "cache"], "batch_sizes": [4], "device": "cpu", **sweep},
    }
    build_experiment(raw, "x.toml", {})


def test_experiment_checks_token_budgets_and_distributions() -> None:
    _experiment({"chunk_tokens": [48, [8, 96]]})
    with pytest.raises(UsageError, match="sweep.chunk_tokens: a budget of 40 tokens is smaller than the longest row"):
        _experiment({"chunk_tokens": [40]})
    with pytest.raises(UsageError, match="sweep.chunk_tokens: none of the strategies chunks by tokens"):
        _experiment({"chunk_tokens": [48], "strategies": ["full", "accumulate"]})
    with pytest.raises(UsageError, match="workload.passage_lengths"):
        _experiment({}, {"passage_lengths": "lognormal:0:1"})
    with pytest.raises(UsageError, match="sweep.chunk_tokens"):
        _experiment({"chunk_tokens": [0]})


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["sweep", "quick", "--chunk-tokens", "20"], "sweep.chunk_tokens"),
        (["sweep", "quick", "--set", "workload.passage_lengths=lognormal:10:-2"], "workload.passage_lengths"),
        (["sweep", "quick", "--steps", "0"], "--steps"),
        (["sweep", "quick", "--set", "sweep.steps=0"], "sweep.steps"),
        (["estimate", "quick", "--chunk-tokens", "8"], "sweep.chunk_tokens"),
        (
            ["tune", "quick", "--batch-size", "8", "--memory-budget", "1GiB", "--chunk-tokens", "8"],
            "sweep.chunk_tokens",
        ),
        (["verify", "--chunk-tokens", "8"], "--chunk-tokens"),
    ],
)
def test_bad_lengths_budgets_and_steps_exit_2_naming_the_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str], key: str
) -> None:
    out_dir = tmp_path / "out"
    extra = ["--out", str(out_dir)] if args[0] == "sweep" else []
    with pytest.raises(SystemExit) as exit_:
        main([*args, *extra])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and key in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out_dir.exists()
