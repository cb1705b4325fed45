"""The CUDA branches of the sweep, tune and verify, run on the CPU through gcbench's CUDA double.

The double (:mod:`gcbench._cuda_double`) is worth having only if it refuses what CUDA refuses: the first
tests show it turning down what torch's own functions turn down (an unindexed device where no optional
one is allowed, a fraction that is not a float), and that ``resolve_device`` gives what they accept.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gcbench import _cuda_double
from gcbench.device import resolve_device
from gcbench.experiment import build_experiment
from gcbench.measure.memory import limit_cuda_memory, release_memory
from gcbench.results import Point, ResultsStore
from gcbench.sweep.point import InProcess
from gcbench.verify import verify

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cuda_double(monkeypatch):
    monkeypatch.setenv(_cuda_double.ENVIRONMENT, "1")  # processes started from here install it too
    double = _cuda_double.install()
    yield double
    _cuda_double.uninstall()


def tiny(**sweep: object):
    raw = {
        "name": "tiny",
        "workload": {"name": "dpr", "query_length": 8, "passage_length": 12},
        "model": {"hidden": 32, "layers": 1, "heads": 2, "vocab": 2000, "dropout": 0.1},
        "sweep": {
            "strategies": ["full", "cache"],
            "batch_sizes": [8],
            "chunk_sizes": [4],
            "device": "cuda",
            "warmup": 1,
            "repeats": 2,
            "max_repeats": 2,
            **sweep,
        },
    }
    return build_experiment(raw, "tiny", {})


def test_the_double_refuses_an_unindexed_device_where_cuda_does(cuda_double):
    unindexed = torch.device("cuda")  # what resolve_device("cuda") returned before
    with pytest.raises(ValueError, match="specified index"):
        torch.cuda.set_per_process_memory_fraction(0.5, unindexed)
    with pytest.raises(ValueError, match="specified index"):
        limit_cuda_memory(unindexed, 2**20)
    with pytest.raises(ValueError, match="specified index"):
        release_memory(unindexed)
    with pytest.raises(TypeError, match="fraction"):
        torch.cuda.set_per_process_memory_fraction(1, torch.device("cuda:0"))
    with pytest.raises(ValueError, match="cuda device"):
        torch.cuda.memory_allocated(torch.device("cpu"))
    with pytest.raises(RuntimeError, match="invalid device ordinal"):
        torch.cuda.max_memory_allocated(torch.device("cuda:7"))
    with pytest.raises(TypeError, match="ByteTensor"):
        torch.cuda.set_rng_state(torch.zeros(16), "cuda:0")
    torch.cuda.memory_allocated(unindexed)  # the statistics take an optional device: torch accepts these
    torch.cuda.reset_peak_memory_stats(unindexed)


@pytest.mark.parametrize(
    "name", ["cuda", "auto", "cuda:1"], ids=["unindexed", "auto", "indexed"]
)  # not "cuda": a marker
def test_devices_resolve_to_an_index_cuda_accepts(cuda_double, name):
    device = resolve_device(name)
    assert device.type == "cuda" and device.index == (1 if name == "cuda:1" else 0)
    limit_cuda_memory(device, 2**20)
    release_memory(device)


def test_the_double_enforces_its_fraction_and_counts_blocks(cuda_double):
    device = resolve_device("cuda")
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    kept = torch.empty(1000, device=device)
    assert kept.device.type == "cpu"  # kept on the CPU ...
    assert torch.cuda.memory_allocated(device) - before == 4096  # ... and counted in 512-byte blocks
    torch.cuda.set_per_process_memory_fraction(before / cuda_double.allocator.total_memory + 1e-9, device)
    with pytest.raises(torch.OutOfMemoryError):
        torch.zeros(10**6, device=device)
    torch.cuda.set_per_process_memory_fraction(1.0, device)
    assert torch.cuda.max_memory_allocated(device) >= torch.cuda.memory_allocated(device)


def test_a_sweep_point_takes_the_cuda_branch_in_one_process(cuda_double):
    experiment = tiny()
    for point in (Point("full", 8), Point("cache", 8, (4,))):
        record = InProcess(experiment, "x").measure(point)
        assert record.status == "ok", record.reason
        assert record.memory is not None and record.memory.method == "cuda max_memory_allocated"
        assert record.memory.peak_bytes > 0 and record.env.device == "cuda:0"
        assert record.env.device_name == "gcbench CUDA double"


def test_a_budget_on_cuda_is_enforced_by_the_allocator(cuda_double):
    experiment = tiny(memory_budget="64KiB", equivalence=False)
    record = InProcess(experiment, "x").measure(Point("full", 8))
    assert record.status == "oom", record.reason


def test_verify_takes_the_cuda_branch(cuda_double):
    results = verify(["dpr"], ("cache",), device="cuda:0", precision="float32")
    assert results and all(r.passed for r in results)


def test_tune_takes_the_cuda_branch(cuda_double, tmp_path):
    from gcbench.tune import tune

    experiment = tiny(memory_budget="1GiB", rounds=1)
    result = tune(experiment, 8, measure=1)
    assert result.target == "cuda"
    assert result.winner is not None and result.winner.measured_peak_bytes is not None


@pytest.mark.slow
def test_a_two_rank_sweep_on_cuda_runs_through_the_double(tmp_path):
    """A fresh process tree (the fork server starts with the double installed): nccl becomes gloo."""
    config = tmp_path / "ranks.toml"
    config.write_text(
        "\n".join(
            [
                'name = "ranks"',
                '[workload]\nname = "dpr"\nquery_length = 8\npassage_length = 12',
                "[model]\nhidden = 32\nlayers = 1\nheads = 2\nvocab = 2000",
                '[sweep]\nstrategies = ["cache"]\nbatch_sizes = [8]\nchunk_sizes = [2]\ndevice = "cuda"',
                "nproc = 2\nrepeats = 2\nmax_repeats = 2\nrounds = 1\ntimeout = 300",
            ]
        )
    )
    environment = {**os.environ, _cuda_double.ENVIRONMENT: "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "gcbench", "sweep", str(config), "--out", str(tmp_path / "out"), "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    (record,) = ResultsStore(tmp_path / "out" / "results.jsonl").load()
    assert record.status == "ok", record.reason
    assert record.distributed is not None and record.distributed.backend == "nccl"  # gloo underneath
    assert record.env.device == "cuda:0", record.env.device
    assert "cuda max_memory_allocated" in record.memory.method
    assert json.loads(record.to_json())["env"]["device"].startswith("cuda")


def test_float32_checks_on_cuda_run_with_tf32_off_and_the_record_says_what_was_on(cuda_double, monkeypatch):
    import gcbench.measure.equivalence as equivalence
    from gcbench.results.environment import environment
    from gcbench.verify import workload_config

    seen = []
    real = equivalence.backward_in_order

    def spying(*args, **kwargs):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        seen.append(torch.get_float32_matmul_precision())
        return real(*args, **kwargs)

    monkeypatch.setattr(equivalence, "backward_in_order", spying)
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as a user may have set them
    try:
        env = environment(resolve_device("cuda"))
        assert (env.tf32_matmul, env.tf32_cudnn, env.float32_matmul_precision) == (True, True, "high")
        equivalence.check_strategy(workload_config("dpr", 0.0), "cache", 4, (2,), device="cuda:0")
        assert seen == [(False, False), "highest"]
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # given back
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
        torch.set_float32_matmul_precision("highest")
