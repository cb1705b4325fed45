"""gcbench.distributed on CPU with gloo: W-rank gradients equal one process's over the global batch.

Ranks fork from a preloaded forkserver (a tenth of a second); the first launch starts it (seconds).
Each launch still runs several checks.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from gcbench.distributed import (
    GatherLoss,
    LocalLoss,
    RankCollectives,
    RankError,
    RankInfo,
    all_gather_with_grad,
    distribute_step,
    gather_rows,
    gathers,
    launch,
    rank_loss,
    resolve_backend,
    shard,
)
from gcbench.errors import UsageError
from gcbench.experiment import build_experiment
from gcbench.losses import InBatchSoftmax, NTXent, SigmoidLoss, SymmetricInfoNCE
from gcbench.measure.equivalence import GradComparison, compare
from gcbench.measure.ranks import check_distributed, distributed_gradients, reference_gradients, worst
from gcbench.results import DistributedResult, Point, Record
from gcbench.sweep.point import OnRanks
from gcbench.training import StepConfig, build_step
from gcbench.verify import verify_distributed, workload_config
from gcbench.workloads import build_workload

F64 = 1e-10


def case(
    name: str,
    strategy: str,
    *,
    tied: bool = False,
    batch: int = 12,
    chunks: Sequence[int] = (5, 5),
    precision: str = "float64",
) -> StepConfig:
    config = workload_config(name, 0.0, tied)  # gcbench verify's model, with a vocabulary quicker to build
    return StepConfig(
        replace(config, model=replace(config.model, vocab=2000)), strategy, batch, tuple(chunks), precision
    )


def assert_no_rank_left() -> None:
    assert multiprocessing.active_children() == []


# Without processes ------------------------------------------------------------------------------


def test_shards_in_rank_order_are_the_global_batch():
    workload = build_workload(workload_config("dpr", 0.0))  # passages: 2 per query
    batches = workload.batches(12, seed=1)
    shards = [shard(batches, rank, 3) for rank in range(3)]
    for i, batch in enumerate(batches):
        for key in batch:
            assert torch.equal(torch.cat([s[i][key] for s in shards]), batch[key])
    assert shards[1][0]["input_ids"].shape[0] == 4 and shards[1][1]["input_ids"].shape[0] == 8
    assert shards[1][1]["input_ids"].untyped_storage().nbytes() == shards[1][1]["input_ids"].nbytes  # a copy
    with pytest.raises(ValueError, match="12 rows do not split evenly over 5 ranks"):
        shard(batches, 0, 5)


def test_the_worst_rank_is_reported_and_nan_is_worst():
    good, nan = GradComparison(1e-9, 1e-8, 1.0, 1.0, 1.0), GradComparison(math.nan, math.nan, math.nan, 1.0, 1.0)
    assert worst([nan, good]) is nan and worst([good, nan]) is nan
    assert worst([good, GradComparison(1e-9, 1e-8, 1.0, 1.5, 1.0)]).loss == 1.5


def test_which_strategies_gather_and_bad_arguments():
    assert [s for s in ("full", "cache", "cache-rerun", "checkpoint", "accumulate") if gathers(s)] == [
        "full",
        "cache",
        "cache-rerun",
        "checkpoint",
    ]
    assert resolve_backend("auto", "cpu") == "gloo"
    with pytest.raises(UsageError, match="nccl needs CUDA"):
        resolve_backend("nccl", "cpu")
    with pytest.raises(UsageError, match="--nproc"):
        launch(print, 0)
    with pytest.raises(UsageError, match="--dropout"):
        verify_distributed(2, dropout=0.1)
    with pytest.raises(UsageError, match="split evenly"):
        verify_distributed(2, batch_size=7)
    with pytest.raises(UsageError, match="--workload: unknown workload 'nope'"):
        verify_distributed(2, ["nope"])


# Exactness --------------------------------------------------------------------------------------


def test_two_ranks_equal_one_process_full_batch():
    """cache, cache-rerun, full (gathered) and checkpoint on every workload and a tied encoder."""
    cases = [
        case(name, strategy, tied=tied)
        for name, tied in (("dpr", False), ("clip", False), ("simclr", False), ("dpr", True))
        for strategy in ("cache", "full")
    ]
    cases += [case("dpr", "cache-rerun", chunks=(4, 5)), case("clip", "checkpoint"), case("simclr", "checkpoint")]
    cases += [
        replace(case("dpr", "cache", tied=tied), keep_graphs=keep) for tied in (False, True) for keep in (3, "all")
    ]
    for config, comparison in zip(cases, check_distributed(cases, 2)):
        label = f"{config.workload.name} tied={config.workload.tied} {config.strategy} keep={config.keep_graphs}"
        assert comparison.max_rel_err <= F64, (label, comparison)
        assert comparison.loss_diff <= F64 * abs(comparison.reference_loss), (label, comparison)


def test_three_ranks_through_verify_distributed():
    results = verify_distributed(
        3, ("dpr", "clip", "simclr"), ("cache",), precision="float64", batch_size=9, chunk_sizes=(2,)
    )
    assert [(r.workload, r.strategy, r.chunk_sizes) for r in results] == [
        ("dpr", "cache", (2, 2)),
        ("clip", "cache", (2, 2)),
        ("simclr", "cache", (2, 2)),
    ]
    for r in results:
        assert r.passed and r.comparison.max_rel_err <= F64, r


# The local loss ---------------------------------------------------------------------------------


def test_tiled_local_loss_on_two_and_three_ranks_equals_one_process_whole():
    """Each rank its own rows, in tiles that do not divide them, against one process computing the whole loss."""
    for nproc, batch, tile in ((2, 12, 4), (3, 9, 2)):
        cases = [
            replace(c, workload=replace(c.workload, loss_tile=tile))
            for c in (
                case(name, strategy, batch=batch, chunks=(2, 2))
                for name in ("dpr", "clip", "simclr")
                for strategy in ("cache", "full")
            )
        ]
        for config, comparison in zip(cases, check_distributed(cases, nproc)):
            label = f"{nproc} ranks {config.workload.name} {config.strategy}"
            assert comparison.max_rel_err <= F64, (label, comparison)
            assert comparison.loss_diff <= F64 * abs(comparison.reference_loss), (label, comparison)


LOCAL_LOSSES = {
    "dpr": lambda tile: InBatchSoftmax(0.5, tile_size=tile),
    "clip": lambda tile: SymmetricInfoNCE(0.2, tile_size=tile),
    "simclr": lambda tile: NTXent(0.5, tile_size=tile),
    "siglip": lambda tile: SigmoidLoss(0.2, -1.0, tile_size=tile),
}


class _KeepOwnRows(RankCollectives):
    """GatherLoss's backward (this rank's rows, times W) under the local loss: right only if every rank's
    loss were the same, which the local loss's are not."""

    def gather(self, tensors):
        return gather_rows(tensors, self.group)

    def total(self, part):
        return part


def _local_loss_rank(info: RankInfo) -> dict[str, float]:
    """Per loss and way: the worst relative error of this rank's loss, representation gradients (times 1/W,
    as DDP's mean will) and loss-parameter gradients against one process over the global batch."""
    generator = torch.Generator().manual_seed(0)
    batch, width, world = 6 * info.world_size, 5, info.world_size
    errors: dict[str, float] = {}
    for name, make in LOCAL_LOSSES.items():
        rows = [batch, 2 * batch if name == "dpr" else batch]
        everything = [torch.randn(n, width, generator=generator, dtype=torch.float64) for n in rows]
        reference = make(None).double()
        leaves = [t.clone().requires_grad_() for t in everything]
        expected = reference(*leaves)
        expected.backward()
        for way, tile in (("local", None), ("local tiled", 4), ("gathered", None), ("own rows only", None)):
            loss = make(tile).double()
            if way == "gathered":
                wrapped = rank_loss(loss, local=False)
            else:
                wrapped = LocalLoss(loss)
                if way == "own rows only":
                    wrapped.collectives = _KeepOwnRows()
            local = [t.clone().requires_grad_() for t in shard(everything, info.rank, world)]
            value = wrapped(*local)
            value.backward()
            mine = [leaf.grad.tensor_split(world)[info.rank] for leaf in leaves]
            errors[f"{name} {way}"] = max(
                float((value.detach() - expected.detach()).abs() / expected.detach().abs()),
                *(float((g.grad / world - m).abs().max() / m.abs().max()) for g, m in zip(local, mine)),
                *(
                    float((p.grad - q.grad).abs().max() / q.grad.abs().max())
                    for p, q in zip(loss.parameters(), reference.parameters())
                ),
            )
    return errors


@pytest.mark.parametrize("nproc", [2, 3])
def test_the_local_loss_and_the_gathered_one_give_the_global_gradients(nproc):
    """Every built-in loss, untiled and tiled; the temperature's gradient too. A local loss that sends back
    only this rank's rows (GatherLoss's backward) is wrong: the reduce-scatter is what makes it exact."""
    for rank, errors in enumerate(launch(_local_loss_rank, nproc)):
        for label, error in errors.items():
            if label.endswith("own rows only"):
                assert error > 1e-3, (rank, label, error)
            else:
                assert error <= 1e-12, (rank, label, error)
    assert_no_rank_left()


def test_the_local_loss_takes_losses_split_by_rows():
    with pytest.raises(TypeError, match="LocalLoss needs a loss split by rows"):
        LocalLoss(lambda q, p: (q @ p.T).sum())  # type: ignore[arg-type]
    assert isinstance(rank_loss(lambda q, p: (q @ p.T).sum()), GatherLoss)
    assert isinstance(rank_loss(NTXent()), LocalLoss) and isinstance(rank_loss(NTXent(), local=False), GatherLoss)


# All-reduce count, accumulate, the gather's checks: one launch ------------------------------------


def _counting_hook(calls, bucket):  # no annotations: DDP compares them with dist.GradBucket, not a string
    calls.append(bucket.index())
    return allreduce_hook(None, bucket)  # the default all-reduce, counted


def _checks_rank(info: RankInfo) -> dict[str, object]:
    out: dict[str, object] = {}
    counts: dict[str, list[list[list[int]]]] = {}
    for config in (
        case("dpr", "cache", chunks=(2, 3)),
        case("dpr", "cache", tied=True, chunks=(2, 3)),
        case("simclr", "cache-rerun", chunks=(2, 2)),
        case("dpr", "full"),
    ):
        step = distribute_step(build_step(config, info.device))
        calls: dict[int, list[int]] = {}
        for encoder in step.strategy.objective.encoders:
            assert isinstance(encoder, DistributedDataParallel)
            if id(encoder) not in calls:
                encoder.register_comm_hook(calls.setdefault(id(encoder), []), _counting_hook)
        per_step = []
        for _ in range(2):  # DDP rebuilds its buckets after the first step
            for c in calls.values():
                c.clear()
            step()
            per_step.append([list(c) for c in calls.values()])
        counts[f"{config.workload.name} tied={config.workload.tied} {config.strategy}"] = per_step
    for c in calls.values():  # control: the hook sees every synchronised backward, here two plain ones
        c.clear()
    for _ in range(2):
        step.strategy.objective.encoders[0](**step.batches[0]).sum().backward()
    out["control"] = next(iter(calls.values()))
    out["all-reduces"] = counts
    # accumulate: per-rank negatives, DDP averages: one process's accumulate when micro-batches align
    accumulate = case("dpr", "accumulate", chunks=(3, 3))
    grads, loss = distributed_gradients(accumulate, info.device)
    for reference in ("accumulate", "full"):
        ref_grads, ref_loss = reference_gradients(accumulate, info.device, reference)
        out[f"accumulate vs {reference}"] = compare(grads, ref_grads, loss, ref_loss)
    try:
        all_gather_with_grad(torch.zeros(3 + info.rank, 2))
    except ValueError as error:
        out["unequal"] = str(error)
    labels = torch.arange(2) + 2 * info.rank
    out["labels"] = GatherLoss(lambda reps, labels: labels, gather_kwargs=("labels",))(
        torch.zeros(2, 1), labels=labels
    ).tolist()
    return out


def test_one_all_reduce_per_step_accumulate_and_gather_checks():
    results = launch(_checks_rank, 2)
    counted = results[0]["all-reduces"]
    for label, steps in counted.items():  # a rank backwards 3 + 4 chunks per dpr cache step, 3 + 3 for simclr
        for per_module in steps:
            for calls in per_module:  # every bucket of every distinct module reduced exactly once per step
                assert calls and sorted(calls) == list(range(len(calls))), (label, steps)
    buckets = len(counted["dpr tied=False full"][1][0])
    assert sorted(results[0]["control"]) == sorted(list(range(buckets)) * 2)
    assert len(counted["dpr tied=True cache"][0]) == 1  # one DDP module for the tied encoder
    for rank in results:
        same = rank["accumulate vs accumulate"]
        assert same.max_rel_err <= F64 and same.loss_diff <= F64, same
        assert rank["accumulate vs full"].max_rel_err > 1e-3  # the negatives it misses
        assert rank["unequal"].startswith("all-gather: ranks hold different numbers of rows")
        assert "rank 0 has 3, rank 1 has 4" in rank["unequal"]
        assert rank["labels"] == [0, 1, 2, 3]
    assert_no_rank_left()


# Failures ---------------------------------------------------------------------------------------


def _failing_rank(info: RankInfo) -> None:
    if info.rank == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()  # waits for a peer that is gone


def test_a_failing_rank_ends_the_run_with_its_message():
    """Its own error, not the launcher's 60 s wall clock (that would be a TimeoutError), ends the run."""
    with pytest.raises(RankError) as caught:
        launch(_failing_rank, 2, timeout=60)
    error = caught.value
    assert error.rank == 1 and str(error) == "rank 1: ValueError: boom on rank 1"
    assert isinstance(error.exception, ValueError) and "_failing_rank" in error.traceback
    assert_no_rank_left()


def _hanging_rank(info: RankInfo) -> None:
    if info.rank == 0:
        dist.all_reduce(torch.ones(1))  # rank 1 never joins
    time.sleep(60)


def test_a_hung_collective_ends_by_its_timeout():
    """The collective's 1.5 s timeout, a RankError of rank 0, ends it, not the launcher's 60 s wall clock."""
    with pytest.raises(RankError) as caught:
        launch(_hanging_rank, 2, timeout=60, collective_timeout=1.5)
    assert caught.value.rank == 0 and "timed out" in str(caught.value).lower()
    assert_no_rank_left()


def test_a_hung_run_ends_by_the_wall_clock():
    with pytest.raises(TimeoutError, match=r"did not finish within 3 s .*ranks \[0, 1\] were still running"):
        launch(_hanging_rank, 2, timeout=3)
    assert_no_rank_left()


def _pid_rank(info: RankInfo, folder: str) -> None:
    (Path(folder) / f"{info.rank}.pid").write_text(str(os.getpid()))
    time.sleep(60)


def _launcher(folder: str) -> None:
    launch(_pid_rank, 2, (folder,), timeout=60)


def _ended(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().split()[2] == "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_killed_launcher_leaves_no_rank(tmp_path):
    """As a sweep point's process killed at its timeout: the ranks it launched end with it."""
    launcher = multiprocessing.get_context("forkserver").Process(target=_launcher, args=(str(tmp_path),))
    launcher.start()
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("*.pid"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
    assert len(pids) == 2
    launcher.kill()
    launcher.join()
    deadline = time.monotonic() + 300  # a guard against hanging here, not a time the test claims
    while not all(map(_ended, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(map(_ended, pids))


# The sweep point -------------------------------------------------------------------------------


def tiny_experiment(**sweep: object):
    raw = {
        "name": "tiny",
        "workload": {"name": "dpr", "query_length": 8, "passage_length": 12},
        "model": {"hidden": 32, "layers": 1, "heads": 2, "vocab": 2000, "dropout": 0.1},
        "sweep": {
            "strategies": ["cache"],
            "batch_sizes": [8],
            "chunk_sizes": [2],
            "device": "cpu",
            "warmup": 1,
            "repeats": 3,
            "max_repeats": 3,
            "nproc": 2,
            **sweep,
        },
    }
    return build_experiment(raw, "tiny", {})


def test_measure_point_distributed_makes_one_record():
    experiment = tiny_experiment()
    record = OnRanks(experiment, "x").measure(Point("cache", 8, (2,)))
    assert record.status == "ok", record.reason
    d = record.distributed
    assert d.world_size == 2 and d.backend == "gloo" and d.local_batch_size == 4
    assert d.negatives == "global" and len(d.rank_peak_bytes) == 2 and min(d.rank_peak_bytes) > 0
    assert record.memory.peak_bytes == d.rank_peak_bytes[0] and d.peak_max_bytes >= d.peak_mean_bytes
    assert "DDP gradient buckets" in record.memory.method
    assert len(record.time.samples_s) == 3 and record.time.examples_per_s == pytest.approx(8 / record.time.median_s)
    assert record.equivalence.max_rel_err <= 1e-5 and "dropout off" in record.equivalence.reference
    assert record.env.git_commit == "x"
    assert Record.from_dict(json.loads(record.to_json())).distributed == d
    assert_no_rank_left()


def test_a_timing_round_on_ranks_times_the_point_in_turns_with_the_reference():
    experiment = tiny_experiment(strategies=["full", "cache"], equivalence=False, max_repeats=50, max_time=0.0)
    record = OnRanks(experiment).measure(Point("cache", 8, (2,)), round=2, reference=Point("full", 8))
    assert record.status == "ok" and record.round == 2, record.reason
    assert record.memory is None and record.equivalence is None and record.distributed.rank_peak_bytes == ()
    # The ranks agreed to stop together: as many turns as the minimum (no time left), a ratio for each.
    assert len(record.time.samples_s) == 3 and len(record.paired.ratios) == 3
    assert record.paired.reference == "full" and record.paired.low <= record.paired.ratio <= record.paired.high
    assert_no_rank_left()


def test_measure_point_distributed_reports_a_failing_rank():
    experiment = tiny_experiment(equivalence=False)
    record = OnRanks(experiment).measure(Point("cache", 8, (2, 2, 2)))
    assert record.status == "error" and "chunk_sizes: got 3 sizes for 2 encoders" in record.reason
    assert record.reason.startswith("RankError: rank ") and record.distributed == DistributedResult(2, "gloo")
    budget = OnRanks(replace(experiment, sweep=replace(experiment.sweep, memory_budget=1000))).measure(
        Point("cache", 8, (2,))
    )
    assert budget.status == "oom" and "over the memory budget" in budget.reason
