"""Scripts in experiments/ that the lead runs at full size: their ``--quick`` versions and their checks."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from gcbench.measure.stats import Estimate

REPO = Path(__file__).resolve().parents[1]
KEEP_GRAPHS = REPO / "experiments" / "keep-graphs.py"
QUICK_SETTINGS = ["full", *(f"cache (chunk 4, keep {k})" for k in (*range(8), "all"))]


def script(path: Path) -> ModuleType:
    """A script whose file name is no module name, imported (its ``main`` not run)."""
    spec = importlib.util.spec_from_file_location(path.stem.replace("-", "_"), path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def ratio(value: float) -> Estimate:
    return Estimate(value, value * 0.95, value * 1.05, 1, 10)


def test_the_keep_graphs_check_is_the_straight_line_between_keep_1_and_full() -> None:
    kg = script(KEEP_GRAPHS)
    keep = [f"cache (chunk 16, keep {k})" for k in (0, 1, 2)]
    peaks = {name: {"peak_bytes": p} for name, p in zip(["full", *keep], [200, 90, 100, 160])}
    # Budget 150: keep 2 (160) is over it; the line allows (1.4 + 1) / 2 = 1.2.
    ratios = {"full": ratio(1.0), keep[0]: ratio(1.5), keep[1]: ratio(1.4), keep[2]: ratio(1.05)}
    result = kg.check(peaks, ratios, keep[1])
    assert (result["budget_bytes"], result["line_ratio"]) == (150, pytest.approx(1.2))
    assert result["best"] == keep[1] and not result["passes"]
    peaks[keep[2]]["peak_bytes"] = 150  # now within: 1.05 <= 1.2
    result = kg.check(peaks, ratios, keep[1])
    assert result["best"] == keep[2] and result["passes"]
    assert kg.check_line(result, keep[1], peaks).startswith("check: PASS: within 0.0 MiB")


@pytest.mark.slow
def test_keep_graphs_quick_reports_every_setting_and_the_check(tmp_path: Path) -> None:
    out = tmp_path / "keep-graphs" / "report.md"
    done = subprocess.run(
        [sys.executable, str(KEEP_GRAPHS), "--quick", "--out", str(out), "--turns", "3", "--max-time", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    rows = {line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")}
    assert set(QUICK_SETTINGS) <= rows
    (check,) = [line for line in text.splitlines() if line.startswith("check: ")]
    raw = json.loads(out.with_suffix(".json").read_text())
    # The verdict is the one the measured peaks and ratios give (either way: these times are noisy).
    kg = script(KEEP_GRAPHS)
    ratios = {name: Estimate(**fields) for name, fields in raw["ratios_to_full"].items()}
    keep_one = QUICK_SETTINGS[2]
    result = kg.check(raw["memory"], ratios, keep_one)
    assert raw["check"] == json.loads(json.dumps(result))
    assert check == kg.check_line(result, keep_one, raw["memory"])
    assert list(raw["memory"]) == QUICK_SETTINGS and list(raw["samples_s"]) == QUICK_SETTINGS
    assert all(len(samples) >= 3 for samples in raw["samples_s"].values())
    assert raw["memory"]["full"]["peak_bytes"] > raw["memory"]["full"]["step_peak_bytes"] > 0
    # Keeping graphs changes what is recomputed, never the gradients: float64 rounding only.
    assert set(raw["max_rel_err"]) == set(QUICK_SETTINGS[1:])
    assert all(error < 1e-12 for error in raw["max_rel_err"].values())
