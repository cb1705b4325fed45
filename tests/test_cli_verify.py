"""``gcbench verify`` as a user runs it: exit 0 / 1 / 2, a table, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gcbench.cli import main


def run(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def test_float64_passes_on_every_workload(capsys):
    code, out, _ = run(capsys, "verify", "--precision", "float64", "--device", "cpu")
    assert code == 0
    for workload in ("dpr", "clip", "siglip", "simclr"):
        assert workload in out
    assert "FAIL" not in out and out.count("pass") == 4


def test_accumulate_fails_the_check(capsys):
    code, out, _ = run(capsys, "verify", "--precision", "float64", "--strategies", "accumulate", "--device", "cpu")
    assert code == 1
    assert out.count("FAIL") == 4


@pytest.mark.parametrize(
    "args, names",
    [
        (["--batch-size", "x"], "--batch-size"),
        (["--batch-size", "0"], "--batch-size"),
        (["--strategies", "nope"], "--strategies"),
        (["--workload", "nope"], "--workload"),
        (["--chunk-sizes", "2/a"], "--chunk-sizes"),
        (["--chunk-sizes", "0"], "--chunk-sizes"),
        (["--precision", "int8"], "--precision"),
        (["--device", "cuda:7"], "--device"),
        (["--dropout", "1.5"], "--dropout"),
        (["--nonsense"], "--nonsense"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(capsys, args, names):
    code, out, err = run(capsys, "verify", *args)
    assert code == 2
    assert names in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_console_script_and_help():
    done = subprocess.run([sys.executable, "-m", "gcbench", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "verify" in done.stdout
    done = subprocess.run(
        [sys.executable, "-m", "gcbench", "verify", "--batch-size", "-3"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "--batch-size" in done.stderr and "Traceback" not in done.stderr
