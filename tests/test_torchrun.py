"""gcbench under torch's own launcher: ``torchrun`` starts the ranks, gcbench joins them (env:// rendezvous).

The slow tests start real launchers: two elastic agents meeting through a c10d rendezvous, as two nodes
would (one rank each), and one agent with two ranks running a sweep point.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gcbench.distributed import LaunchedRanks, is_leader, ranks_wanted
from gcbench.errors import UsageError
from gcbench.experiment import build_experiment
from gcbench.sweep.runner import run_sweep

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def test_outside_torchrun_nothing_is_launched(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert LaunchedRanks.from_environment() is None and is_leader() and ranks_wanted(1) == 1


def test_torchrun_variables_are_read(monkeypatch):
    variables = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    for name, value in {**variables, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    assert LaunchedRanks.from_environment() == LaunchedRanks(3, 4, 1, 2)
    assert not is_leader() and ranks_wanted(1) == 4 and ranks_wanted(2) == 2


def test_a_sweep_asking_for_other_ranks_than_torchrun_started_creates_nothing(monkeypatch, tmp_path):
    for name, value in {"RANK": "0", "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    experiment = build_experiment({"sweep": {"nproc": 2, "device": "cpu"}}, "two", {})
    with pytest.raises(UsageError, match="torchrun started 4 ranks .* not 2"):
        run_sweep(experiment, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_environment() -> dict[str, str]:
    """This test process's environment without any rank of its own (a test may run under torchrun too)."""
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    return {name: value for name, value in os.environ.items() if name not in drop}


@pytest.mark.slow
def test_verify_on_two_nodes_through_torchs_elastic_launcher(tmp_path):
    """Two agents, one rank each, meet at a c10d rendezvous; rank 0 prints the table, both exit 0."""
    endpoint = f"127.0.0.1:{free_port()}"
    agent = [*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d"]
    agent += ["--rdzv-endpoint", endpoint, "--rdzv-id", "gcbench-test"]
    check = ["-m", "gcbench", "verify", "--workload", "dpr,clip", "--precision", "float64", "--batch-size", "8"]
    check += ["--chunk-sizes", "3", "--strategies", "cache", "--loss-tile", "3"]
    nodes = [
        subprocess.Popen(
            [*agent, *check], cwd=tmp_path, env=clean_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=300)[0].decode() for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    tables = [output for output in outputs if "gradient equivalence" in output]
    assert len(tables) == 1, outputs  # only rank 0 speaks
    assert "2 ranks vs 1 process" in tables[0] and tables[0].count("pass") == 2 and "FAIL" not in tables[0]


@pytest.mark.slow
def test_a_sweep_point_under_torchrun(tmp_path):
    """``torchrun -m gcbench sweep``: the point runs on torchrun's two ranks, rank 0 keeps a record per round."""
    experiment = tmp_path / "tiny.toml"
    experiment.write_text(
        """
name = "tiny"
[workload]
name = "simclr"
query_length = 8
loss_tile = 5
[model]
hidden = 32
layers = 1
heads = 2
vocab = 2000
[sweep]
strategies = ["cache"]
batch_sizes = [8]
chunk_sizes = [4]
device = "cpu"
repeats = 2
rounds = 2
"""
    )
    out = tmp_path / "out"
    command = [*TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "gcbench", "sweep", str(experiment)]
    done = subprocess.run(
        [*command, "--out", str(out), "--quiet"], env=clean_environment(), capture_output=True, timeout=300
    )
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    first, second = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert second["round"] == 2 and second["status"] == "ok" and second["time"]["samples_s"]  # timed again, in place
    record = first
    assert record["status"] == "ok" and record["loss_tile"] == 5, record
    assert record["distributed"]["world_size"] == 2 and record["distributed"]["local_batch_size"] == 4
    assert record["equivalence"]["max_rel_err"] <= 1e-5
    assert Path(out / "report.md").exists()
