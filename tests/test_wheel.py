"""A normal install works: build the wheel, install it into a new environment, run a sweep outside the checkout.

The environment reuses this one's installed packages (torch and the rest) through a ``.pth`` line, so
nothing is downloaded; gcbench itself comes only from the wheel (the editable install of the checkout
is a ``.pth`` of this environment's own, which a path added that way does not run).
"""

from __future__ import annotations

import json
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def sh(*args: str | Path, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args}: {done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done


@pytest.mark.slow
def test_the_wheel_installs_and_runs_a_sweep_outside_the_checkout(tmp_path: Path) -> None:
    sh(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--quiet",
        "-w",
        tmp_path / "dist",
        REPO,
    )
    wheel = next((tmp_path / "dist").glob("gcbench-*.whl"))
    env = tmp_path / "env"
    sh(sys.executable, "-m", "venv", "--without-pip", env)
    python = env / "bin" / "python"
    purelib = Path(sh(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").stdout.strip())
    (purelib / "reuse-installed.pth").write_text(f"{sysconfig.get_path('purelib')}\n{site.getsitepackages()[0]}\n")
    sh(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--quiet", wheel)

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = sh(
        python,
        "-c",
        "import gcbench, gcbench.experiment.experiment as e; print(gcbench.__file__); print(', '.join(e.shipped()))",
        cwd=work,
    ).stdout.splitlines()
    assert where[0].startswith(str(purelib)), f"gcbench imported from {where[0]}, not from the wheel"
    assert "quick" in where[1].split(", ")
    sh(
        env / "bin" / "gcbench",
        "sweep",
        "quick",
        "--batch-sizes",
        "8",
        "--strategies",
        "full,cache",
        "--quiet",
        cwd=work,
    )
    lines = (work / "reports" / "quick" / "results.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # 3 points, each timed in quick's 3 rounds
    assert len(records) == 9 and all(r["status"] == "ok" for r in records), [r.get("reason") for r in records]
    assert sorted(r["round"] for r in records) == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert all(r["env"]["git_commit"] is None for r in records)  # no checkout, no commit
    assert (work / "reports" / "quick" / "report.md").is_file()
