"""``gcbench estimate``: predictions without allocation agree with allocator-level measurements."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.functional import scaled_dot_product_attention

from gcbench.cli import main
from gcbench.estimate import EstimateError, Estimator
from gcbench.estimate.plan import chunk_candidates, recommend_chunks
from gcbench.experiment import build_experiment, load_experiment
from gcbench.measure.memory import measure_step_memory
from gcbench.results import Point
from gcbench.sweep import run_sweep
from gcbench.training import build_step
from gcbench.workloads import TEXT_TOWERS, ModelConfig, TextTower, WorkloadConfig
from gcbench.workloads.tasks import random_tokens

QUICK_POINTS = [
    Point("full", 64),
    Point("cache", 256, (8,)),
    Point("cache", 100, (32,)),
    Point("accumulate", 128, (32,)),
    Point("checkpoint", 128),
    Point("cache-rerun", 48, (8,)),
    Point("cache", 128, (16,), 5),
    Point("cache", 64, (16,), "all"),
]


@pytest.fixture(scope="module")
def quick():
    return load_experiment("quick")


@pytest.fixture(scope="module")
def quick_cpu_estimator(quick):
    return Estimator(quick.workload, quick.sweep.precision, "cpu", quick.sweep.seed, quick.optimizer)


def measured_peak(experiment, point) -> int:
    step = build_step(experiment.step_config(point), torch.device("cpu"))
    for _ in range(experiment.sweep.warmup):
        step()
    return measure_step_memory(step).peak_bytes


@pytest.mark.parametrize("point", QUICK_POINTS, ids=lambda p: p.id)
def test_cpu_prediction_within_5_percent_of_the_allocator(quick, quick_cpu_estimator, point):
    predicted = quick_cpu_estimator.predict(quick.step_config(point)).peak_bytes
    measured = measured_peak(quick, point)
    assert abs(predicted - measured) <= 0.05 * measured, (predicted, measured)
    # The control: an estimate that forgot AdamW's two moments (a real past mistake's size) is caught.
    optimizer = quick_cpu_estimator.predict(quick.step_config(point)).breakdown["optimizer"]
    assert abs(predicted - optimizer - measured) > 0.05 * measured, (predicted - optimizer, measured)


TINY = WorkloadConfig("dpr", ModelConfig(hidden=16, layers=1, heads=2, vocab=2000), query_length=8, passage_length=12)


@pytest.mark.parametrize(
    "point",
    [
        Point("cache", 40, (4,)),
        Point("cache", 37, (5, 3)),
        Point("cache-rerun", 24, (4,)),
        Point("accumulate", 30, (4,)),
        Point("cache", 9, (16,)),
        Point("cache", 40, (4,), 0),
        Point("cache", 40, (4,), 7),
        Point("cache", 37, (5, 3), 12),
        Point("cache", 24, (4,), "all"),
    ],
    ids=lambda p: p.id,
)
@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_skipping_repeated_chunks_changes_no_byte(point, target):
    from gcbench.training import StepConfig

    config = StepConfig(TINY, point.strategy, point.batch_size, point.chunk_sizes, keep_graphs=point.keep_graphs)
    skipping = Estimator(TINY, "float32", target).predict(config)
    running = Estimator(TINY, "float32", target, skip_repeats=False).predict(config)
    assert skipping.peak_bytes == running.peak_bytes
    assert skipping.breakdown == running.breakdown


def test_cuda_target_models_the_device():
    from gcbench.training import StepConfig

    config = StepConfig(TINY, "full", 8)
    cpu = Estimator(TINY, "float32", "cpu")
    cuda = Estimator(TINY, "float32", "cuda")
    assert cuda.optimizer_config.foreach is True and cpu.optimizer_config.foreach is None
    cpu_peak, cuda_peak = cpu.predict(config), cuda.predict(config)
    assert cuda_peak.peak_bytes % 512 == 0 and cuda_peak.peak_bytes > cpu_peak.peak_bytes


def test_the_cuda_target_runs_cuda_s_attention_kernel_and_puts_torch_s_back(monkeypatch):
    """For the prediction only, SDPA is CUDA's memory-efficient kernel (its log-sum-exp kept, not the
    probabilities); afterwards torch's own function is back, for the CPU target and for the user's code."""
    from gcbench.estimate import target
    from gcbench.training import StepConfig

    called: list[str] = []
    kernel = target._efficient_attention
    monkeypatch.setattr(target, "_efficient_attention", lambda *a, **k: called.append("cuda") or kernel(*a, **k))
    torch_sdpa = F.scaled_dot_product_attention
    Estimator(TINY, "float32", "cpu").predict(StepConfig(TINY, "full", 8))
    assert called == [] and F.scaled_dot_product_attention is torch_sdpa  # the CPU target keeps torch's kernel
    Estimator(TINY, "float32", "cuda").predict(StepConfig(TINY, "full", 8))
    assert called and F.scaled_dot_product_attention is torch_sdpa


def _aten_ops(fn) -> set[str]:
    """The aten ops ``fn`` dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    with Record() as record:
        fn()
    return record.ops


def test_cuda_attention_reaches_a_model_that_imported_it_by_name():
    """The CUDA target's attention kernel is chosen by a function mode, scoped to the estimate: a model that
    did ``from torch.nn.functional import scaled_dot_product_attention`` gets it too, and the module
    attribute is never replaced. Without the mode (the negative control) the CPU kernel runs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from gcbench.estimate.target import target

    fake = FakeTensorMode()  # the estimate's tensors: CUDA's kernel has no CPU implementation to run for real
    with fake:
        q, k, v = (torch.randn(2, 2, 5, 4, requires_grad=True) for _ in range(3))
        mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)

    def attend() -> None:
        with fake:
            scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()

    original = F.scaled_dot_product_attention
    with target("cuda").kernels():
        assert F.scaled_dot_product_attention is original
        inside = _aten_ops(attend)
    with target("cpu").kernels():
        cpu = _aten_ops(attend)
    assert "aten._scaled_dot_product_efficient_attention" in inside

    def checkpointed() -> None:  # recomputed inside backward: the same kernel, or the checkpoint refuses
        with fake:
            out = torch.utils.checkpoint.checkpoint(
                lambda q: scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.1), q, use_reentrant=False
            )
            out.sum().backward()

    with target("cuda").kernels():
        recomputed = _aten_ops(checkpointed)
    assert "aten._scaled_dot_product_efficient_attention_backward" in recomputed
    assert (
        "aten._scaled_dot_product_efficient_attention" not in cpu
        and "aten._scaled_dot_product_flash_attention_for_cpu" in cpu
    )


def test_cpu_rng_states_are_counted_however_the_function_is_reached():
    """The tracker counts each ``torch.get_rng_state()`` (a CPU tensor made outside the dispatcher) without
    replacing the attribute: called by name too; not counted when not asked (the negative control)."""
    from torch import get_rng_state

    from gcbench.measure.tracker import MemoryTracker

    original = torch.get_rng_state
    held = []
    for count in (True, False):
        with MemoryTracker(count_cpu_rng_states=count) as tracker:
            assert torch.get_rng_state is original
            held += [get_rng_state(), torch.get_rng_state()]
        assert tracker.result().total == (2 * held[0].nbytes if count else 0)


def test_eager_attention_needs_more_memory_than_fused():
    from dataclasses import replace

    from gcbench.training import StepConfig

    eager = replace(TINY, model=replace(TINY.model, attention="eager"))
    fused = Estimator(TINY, "float32", "cuda").predict(StepConfig(TINY, "full", 16)).peak_bytes
    spelt_out = Estimator(eager, "float32", "cuda").predict(StepConfig(eager, "full", 16)).peak_bytes
    assert spelt_out > fused


class DataDependent(nn.Module):
    def __init__(self, config: ModelConfig, length: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(config.vocab, config.hidden)

    def forward(self, input_ids, attention_mask):
        kept = self.embed(input_ids)[attention_mask.bool()]  # a data-dependent shape
        return kept.sum(0, keepdim=True).expand(input_ids.shape[0], -1)


def test_data_dependent_op_is_named_not_a_crash(monkeypatch):
    from gcbench.training import StepConfig

    monkeypatch.setitem(TEXT_TOWERS, "data-dependent", TextTower(DataDependent, random_tokens))
    config = WorkloadConfig(
        "dpr", ModelConfig(kind="data-dependent", hidden=8, vocab=2000), query_length=4, passage_length=4
    )
    with pytest.raises(EstimateError, match="nonzero|index"):
        Estimator(config, "float32", "cpu").predict(StepConfig(config, "full", 4))


def test_chunk_candidates_keep_the_proportions():
    assert chunk_candidates((16, 8), [64, 128])[:4] == [(2, 1), (4, 2), (8, 4), (16, 8)]
    assert chunk_candidates((16, 8), [64, 128])[-1] == (64, 128)
    assert chunk_candidates((8,), [5, 10]) == [(1, 1), (2, 2), (4, 4), (5, 8), (5, 10)]


def test_chunk_advice_picks_the_largest_that_fits(quick, quick_cpu_estimator):
    advice = recommend_chunks(quick_cpu_estimator, quick, "cache", 256, 40 * 2**20)
    assert advice.chunk_sizes is not None and advice.peak_bytes <= 40 * 2**20
    tried = dict(advice.tried)
    bigger = [c for c in tried if c[0] > advice.chunk_sizes[0]]
    assert all(tried[c] > 40 * 2**20 for c in bigger) and bigger, "a larger chunk was tried and did not fit"
    nothing = recommend_chunks(quick_cpu_estimator, quick, "cache", 256, 10 * 2**20)
    assert nothing.chunk_sizes is None and "parameters, gradients and optimizer state" in nothing.reason


def test_chunk_advice_blames_the_whole_loss_at_once():
    """No chunk size shrinks the score matrix: the advice says so after one probe, and names the tiled loss."""
    raw = {"workload": {"name": "simclr"}, "model": {"kind": "mlp", "hidden": 16, "features": 8}}
    raw["sweep"] = {"strategies": ["cache"], "batch_sizes": [4096], "chunk_sizes": [64]}
    for tile, hint in ((0, True), (256, False)):
        experiment = build_experiment({**raw, "workload": {"name": "simclr", "loss_tile": tile}}, "loss", {})
        estimator = Estimator(experiment.workload, "float32", "cpu")
        advice = recommend_chunks(estimator, experiment, "cache", 4096, 2**20 if tile else 64 * 2**20)
        assert advice.chunk_sizes is None and "the loss alone needs" in advice.reason, advice.reason
        assert ("workload.loss_tile" in advice.reason) == hint and len(advice.tried) == 1


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def test_estimate_cli_formats(capsys):
    small = ["quick", "--target", "cpu", "--batch-sizes", "8,64", "--strategies", "full,cache", "--chunk-sizes", "8"]
    code, out, _ = run_cli(capsys, "estimate", *small, "--format", "json", "--device-memory", "30MiB")
    data = json.loads(out)
    assert code == 0 and len(data["predictions"]) == 4
    # The largest batch is the one its own predictions give: the largest whose peak, and every smaller
    # batch's, fits 30 MiB.
    peaks = sorted((r["batch_size"], r["peak_bytes"]) for r in data["predictions"] if r["strategy"] == "full")
    fitting = [batch for i, (batch, _) in enumerate(peaks) if all(p <= 30 * 2**20 for _, p in peaks[: i + 1])]
    assert data["largest_batch"]["full"][str(30 * 2**20)] == (max(fitting) if fitting else None)
    assert fitting and len(fitting) < len(peaks)  # the budget falls between the two batches: a real choice
    assert data["chunk_advice"][0]["chunk_sizes"]
    code, out, _ = run_cli(capsys, "estimate", *small, "--format", "csv")
    assert code == 0 and out.splitlines()[0].startswith("strategy,batch_size") and len(out.splitlines()) == 5
    code, out, _ = run_cli(capsys, "estimate", *small)
    assert code == 0 and "largest batch that fits" in out and "recommended chunk sizes" in out


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--device-memory", "lots"], "--device-memory"),
        (["--batch-size", "0"], "--batch-size"),
        (["--target", "tpu"], "--target"),
        (["--batch-sizes", "x"], "--batch-sizes"),
    ],
)
def test_estimate_bad_input_exits_2(capsys, args, flag):
    code, _, err = run_cli(capsys, "estimate", "quick", *args)
    assert code == 2 and flag in err and len(err.strip().splitlines()) == 1


def test_sweep_predict_records_and_skips(quick, tmp_path):
    experiment = load_experiment(
        "quick",
        {
            "sweep.batch_sizes": ([16, 512], "--batch-sizes"),
            "sweep.strategies": (["full"], "--strategies"),
            "sweep.memory_budget": ("100MiB", "--memory-budget"),
            "sweep.predict": (True, "--predict"),
            "sweep.equivalence": (False, "--set"),
            "sweep.repeats": (1, "--repeats"),
            "sweep.rounds": (1, "--rounds"),
        },
    )
    records = {r.point.batch_size: r for r in run_sweep(experiment, tmp_path).records}
    assert records[16].status == "ok"
    assert (
        abs(records[16].prediction.peak_bytes - records[16].memory.peak_bytes) <= 0.05 * records[16].memory.peak_bytes
    )
    assert records[512].status == "skipped" and records[512].reason.startswith("skipped (predicted)")


@pytest.mark.slow
def test_two_rank_prediction_includes_gathered_reps_and_ddp(tmp_path):
    experiment = load_experiment(
        "quick",
        {
            "sweep.batch_sizes": ([16, 128], "--batch-sizes"),
            "sweep.strategies": (["full", "cache"], "--strategies"),
            "sweep.chunk_sizes": ([[8]], "--chunk-sizes"),
            "sweep.nproc": (2, "--nproc"),
            "sweep.predict": (True, "--predict"),
            "sweep.equivalence": (False, "--set"),
            "sweep.repeats": (1, "--repeats"),
            "sweep.rounds": (1, "--rounds"),
        },
    )
    records = run_sweep(experiment, tmp_path).records
    assert len(records) == 4
    for r in records:
        assert r.status == "ok" and r.prediction.world_size == 2
        measured = r.distributed.peak_max_bytes
        assert abs(r.prediction.peak_bytes - measured) <= 0.05 * measured, r.point.id


def test_estimate_cli_names_a_data_dependent_op_in_rows_and_advice(monkeypatch, capsys):
    from gcbench.cli import main

    monkeypatch.setitem(TEXT_TOWERS, "data-dependent", TextTower(DataDependent, random_tokens))
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "estimate",
                "quick",
                "--set",
                "model.kind=data-dependent",
                "--strategies",
                "full,cache",
                "--batch-sizes",
                "8",
                "--chunk-sizes",
                "4",
                "--target",
                "cpu",
                "--format",
                "json",
            ]
        )
    assert exit_.value.code == 0
    plan = json.loads(capsys.readouterr().out)
    assert all("depends on tensor values" in row["error"] for row in plan["predictions"])
    assert plan["chunk_advice"] and all(
        a["chunk_sizes"] is None and "depends on tensor values" in a["reason"] for a in plan["chunk_advice"]
    )
