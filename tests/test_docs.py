"""The documentation says what the code and the committed reports say: tested, so it cannot drift."""

from __future__ import annotations

import subprocess
from pathlib import Path

from gcbench.experiment.schema import KEYS_BEGIN, KEYS_END, key_table
from gcbench.report import load_runs
from gcbench.report.data import ReportData
from gcbench.report.headline import headline
from gcbench.results import parse_bytes

REPO = Path(__file__).resolve().parents[1]


def test_the_key_table_is_the_schema_s() -> None:
    page = (REPO / "docs" / "experiments.md").read_text()
    shown = page.split(KEYS_BEGIN, 1)[1].split(KEYS_END, 1)[0].strip()
    assert shown == key_table(), "docs/experiments.md is out of date: run make docs"


def committed_quick_results(tmp_path: Path) -> Path:
    """The committed ``reports/quick`` results: ``make demo`` rewrites the working copy's (README's order is
    demo, then test), so in a git checkout they are read from HEAD."""
    results = REPO / "reports" / "quick"
    try:
        text = subprocess.run(
            ["git", "-C", str(REPO), "show", "HEAD:reports/quick/results.jsonl"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):  # not a checkout (an unpacked source tree): the files
        return results
    (tmp_path / "results.jsonl").write_text(text)
    return tmp_path


def test_the_readme_quotes_the_headline_of_the_committed_quick_report(tmp_path: Path) -> None:
    data = ReportData.of(load_runs([committed_quick_results(tmp_path)]), parse_bytes("256MiB", "budget"))
    readme = (REPO / "README.md").read_text()
    for line in headline(data):
        assert f"- {line}" in readme, f"README does not quote: {line}"


def test_the_readme_is_a_door_and_its_links_resolve() -> None:
    readme = (REPO / "README.md").read_text()
    assert readme.startswith("# gcbench\n\n```sh\nmake demo") and "make test" in readme.splitlines()[4]
    assert len(readme.splitlines()) <= 150
    for page in [REPO / "README.md", *(REPO / "docs").glob("*.md")]:
        text = page.read_text()
        for target in _links(text):
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.exists(), f"{page.name} links to {target}, which does not exist"


def _links(text: str) -> list[str]:
    import re

    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not t.startswith(("http", "#", "mailto:"))]


def test_the_tiled_loss_chapter_quotes_the_committed_estimate() -> None:
    """Every 'step peak / the loss's own' pair in docs/tiled-loss.md is in the committed estimate it quotes."""
    import json
    import re

    page = (REPO / "docs" / "tiled-loss.md").read_text()
    for estimate, prefix in (("clip-loss-estimate", ""), ("clip-vit-b16-estimate", "ViT-B/16, ")):
        folder = REPO / "reports" / "tiled-loss" / estimate
        for name, label in (("whole.json", "whole matrix"), ("tiled-8192.json", "tiles of 8192")):
            predictions = json.loads((folder / name).read_text())["predictions"]
            committed = {f"{p['peak_bytes'] / 2**30:.2f} / {p['loss_peak_bytes'] / 2**30:.2f} GiB" for p in predictions}
            (row,) = [line for line in page.splitlines() if line.startswith(f"| {prefix}{label}:")]
            quoted = re.findall(r"[\d.]+ / [\d.]+ GiB", row)
            assert quoted and set(quoted) <= committed, (estimate, label, set(quoted) - committed)
