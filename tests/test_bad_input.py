"""Bad input as a new user gives it: one line naming the argument, exit 2, no traceback, nothing created.

And the two other ways a command ends early: an estimate that cannot run under fake tensors (exit 1),
and ``--retry-failed``, which runs again only what failed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from gcbench.cli import main
from gcbench.results import ResultsStore, current
from gcbench.workloads import TEXT_TOWERS, ModelConfig, TextTower

MICRO = [
    "--set",
    "model.hidden=16",
    "--set",
    "model.heads=2",
    "--set",
    "model.layers=1",
    "--set",
    "model.vocab=2000",
    "--set",
    "workload.query_length=8",
    "--set",
    "workload.passage_length=8",
    "--device",
    "cpu",
    "--repeats",
    "1",
    "--rounds",
    "1",
    "--quiet",
]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    out, err = capsys.readouterr()
    return int(exit_.value.code or 0), out, err


def one_line(err: str) -> bool:
    return len(err.strip().splitlines()) == 1 and "Traceback" not in err


def files_under(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*")) if folder.exists() else []


@pytest.mark.parametrize(
    "args, names",
    [
        (["sweep", "quick", "--batch-sizes", "8,,16"], "--batch-sizes: empty item"),
        (["sweep", "quick", "--strategies", "full,"], "--strategies: empty item"),
        (["sweep", "quick", "--device", "quantum"], "'quantum' is not a device"),
        (["sweep", "quick", "--fresh", "--retry-failed"], "--retry-failed"),
        (["verify", "--tolerance", "-1"], "--tolerance must be > 0"),
        (["verify", "--tolerance", "0"], "--tolerance must be > 0"),
        (["verify", "--workload", "dpr,,clip"], "--workload: empty item"),
        (["estimate", "quick", "--device-memory", "11GiB,"], "--device-memory: empty item"),
        (["report", "reports/quick", "--memory-budget", "lots"], "--memory-budget: 'lots' is not a memory size"),
    ],
)
def test_bad_values_exit_2_naming_the_flag(capsys, tmp_path, monkeypatch, args, names):
    monkeypatch.chdir(tmp_path)  # nothing may appear here either
    code, _, err = run(capsys, *args)
    assert code == 2 and names in err and one_line(err), err
    assert files_under(tmp_path) == []


@pytest.mark.parametrize(
    "old, new, command",
    [
        ("--dtype", "--precision", "verify"),
        ("--strategy", "--strategies", "verify"),
        ("--chunk-size", "--chunk-sizes", "verify"),
        ("--budget", "--memory-budget", "report"),
        ("--batch", "--batch-size", "estimate"),
    ],
)
def test_old_flag_spellings_name_the_new_one(capsys, old, new, command):
    code, _, err = run(capsys, command, old, "1")
    assert code == 2 and f"{old} is now {new}" in err and one_line(err), err


def test_an_unwritable_out_folder_is_named_before_any_work(capsys):
    code, _, err = run(capsys, "sweep", "quick", "--out", "/proc/forbidden", "--batch-sizes", "8")
    assert code == 2 and "--out: cannot write results to /proc/forbidden" in err and one_line(err), err


def test_a_bad_device_is_named_before_results_of_another_experiment(capsys, tmp_path):
    out = tmp_path / "out"
    code, _, _ = run(
        capsys,
        "sweep",
        "quick",
        *MICRO,
        "--strategies",
        "full",
        "--batch-sizes",
        "4",
        "--out",
        str(out),
        "--set",
        "sweep.equivalence=false",
        "--set",
        "sweep.predict=false",
    )
    assert code == 0
    before = files_under(out)
    for device in ("quantum", "cuda:7" if torch.cuda.is_available() else "cuda"):
        code, _, err = run(capsys, "sweep", "quick", "--set", "model.hidden=32", "--device", device, "--out", str(out))
        assert code == 2 and "--device" in err and "fingerprint" not in err and one_line(err), err
    assert files_under(out) == before


class BuiltFromData(nn.Module):
    """A model whose constructor depends on tensor values: it cannot even be built under fake tensors."""

    def __init__(self, config: ModelConfig, length: int) -> None:
        super().__init__()
        width = int(torch.arange(4).nonzero().shape[0])  # a data-dependent shape at build time
        self.embed = nn.Embedding(config.vocab, config.hidden + width - 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)[:, 0]


def random_ids(config: ModelConfig, rows: int, length: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(1000, config.vocab, (rows, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture
def unpredictable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(TEXT_TOWERS, "built-from-data", TextTower(BuiltFromData, random_ids))


def test_estimate_exits_1_when_the_model_cannot_be_built_under_fake_tensors(capsys, unpredictable):
    code, out, err = run(capsys, "estimate", "quick", "--set", "model.kind=built-from-data", "--batch-sizes", "8")
    assert code == 1 and "gcbench estimate: error: cannot predict without allocating" in err and one_line(err), err
    assert out == ""


def test_sweep_predict_fails_before_creating_anything(capsys, tmp_path, unpredictable):
    out = tmp_path / "out"
    code, _, err = run(
        capsys, "sweep", "quick", *MICRO, "--set", "model.kind=built-from-data", "--out", str(out), "--predict"
    )
    assert code == 1 and "gcbench sweep: error: --predict: cannot predict without allocating" in err, err
    assert one_line(err) and not out.exists()


def test_retry_failed_reruns_errors_and_timeouts_and_keeps_the_rest(capsys, tmp_path):
    out = tmp_path / "out"
    args = [
        "sweep",
        "quick",
        *MICRO,
        "--strategies",
        "full,cache",
        "--batch-sizes",
        "4",
        "--chunk-sizes",
        "2",
        "--out",
        str(out),
        "--set",
        "sweep.equivalence=false",
        "--set",
        "sweep.predict=false",
    ]
    assert run(capsys, *args)[0] == 0
    results = out / "results.jsonl"
    lines = results.read_text().splitlines()
    failed = json.loads(lines[1])  # as if the cache point had been ended by a timeout
    failed.update(status="timeout", reason="exceeded the 1 s point timeout", memory=None, time=None)
    results.write_text("\n".join([lines[0], json.dumps(failed)]) + "\n")

    code, stdout, _ = run(capsys, *args)
    assert code == 0 and "0 points measured, 2 kept" in stdout  # a plain resume keeps the failure
    code, stdout, _ = run(capsys, *args, "--retry-failed")
    assert code == 0 and "1 points measured, 1 kept" in stdout
    records = ResultsStore(results).load()
    assert [r.status for r in records] == ["ok", "timeout", "ok"]  # append-only: the failure stays in the file
    kept = current(records)
    assert [(r.point.strategy, r.status) for r in kept] == [("full", "ok"), ("cache", "ok")]
    assert kept[0].finished_at == records[0].finished_at  # full was not run again
    code, stdout, _ = run(capsys, *args, "--retry-failed")
    assert code == 0 and "0 points measured, 2 kept" in stdout  # nothing failed any more
