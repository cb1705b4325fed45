"""The many-steps check's report: its JSON, a figure (the losses overlaid, the parameter distance on a log
scale) and a short Markdown page, written by ``gcbench verify --steps N --out DIR``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from matplotlib import colormaps
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from gcbench.report.figures import DPI, GUIDE, WIDTH_IN
from gcbench.report.style import FAMILIES, REFERENCE_COLOUR, SPARE_FAMILIES
from gcbench.trajectory import REFERENCE, Trajectory

STEPS_JSON, STEPS_FIGURE, STEPS_PAGE = "steps.json", "steps.png", "report.md"


def steps_figure(trajectories: Sequence[Trajectory]) -> Figure:
    """Left: each strategy's loss per step. Right: its parameters' distance to the full-batch reference's;
    a distance of exactly 0 (``full`` against itself) is drawn on the axis floor."""
    fig = Figure(figsize=(WIDTH_IN * 1.5, 4.2), dpi=DPI, layout="constrained")
    losses, distances = fig.subplots(1, 2)
    colours = _colours(trajectories)
    positive = [p.param_distance for t in trajectories for p in t.points if p.param_distance > 0]
    floor = min(positive) / 10 if positive else 1e-18
    for t in trajectories:
        steps = [p.step for p in t.points]
        style = {"color": colours[t.label], "marker": "o", "markersize": 3, "linewidth": 1.4}
        losses.plot(steps, [p.loss for p in t.points], label=t.label, **style)
        distances.plot(steps, [max(p.param_distance, floor) for p in t.points], label=t.label, **style)
    tolerance = trajectories[0].tolerance if trajectories else None
    if tolerance is not None:
        distances.axhline(tolerance, **GUIDE, label=f"tolerance {tolerance:g}")
    distances.set_yscale("log")
    first = trajectories[0] if trajectories else None
    setting = (
        f"{first.workload}, batch {first.batch_size}, {first.precision}, {first.optimizer} lr {first.lr:g}"
        if first
        else ""
    )
    losses.set_title(f"Loss per step ({setting})", loc="left", fontsize="medium", fontweight="bold")
    distances.set_title("Parameter distance to the full batch", loc="left", fontsize="medium", fontweight="bold")
    losses.set_ylabel("loss the strategy reports")
    distances.set_ylabel("||θ − θ_full|| / ||θ_full||  (0 drawn at the floor)")
    for ax in (losses, distances):
        ax.set_xlabel("optimizer step")
        ax.grid(True, alpha=0.3)
        ax.set_axisbelow(True)
    distances.legend(fontsize="small", loc="center right")
    return fig


def write_steps_report(trajectories: Sequence[Trajectory], out: Path, command: str) -> list[Path]:
    """``steps.json``, ``steps.png`` and ``report.md`` in ``out`` (created); the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    data = {"command": command, "reference": REFERENCE, "trajectories": [t.as_dict() for t in trajectories]}
    json_path = out / STEPS_JSON
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    figure_path = out / STEPS_FIGURE
    steps_figure(trajectories).savefig(figure_path, dpi=DPI)
    page_path = out / STEPS_PAGE
    page_path.write_text(steps_page(trajectories, command))
    return [json_path, figure_path, page_path]


def load_trajectories(path: Path) -> list[Trajectory]:
    data = json.loads(path.read_text())
    return [Trajectory.from_dict(record) for record in data["trajectories"]]


def steps_page(trajectories: Sequence[Trajectory], command: str) -> str:
    rows = [
        "| strategy | exact | loss at step 1 | loss at the last step | max loss difference | parameter distance, "
        "last step | max parameter difference | result |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for t in trajectories:
        last = t.points[-1]
        verdict = ("pass" if t.passed else "FAIL") if t.exact else "not exact: reported"
        rows.append(
            f"| {t.label} | {'yes' if t.exact else 'no'} | {t.points[0].loss:.6f} | {last.loss:.6f} | "
            f"{max(p.loss_diff for p in t.points):.2e} | {last.param_distance:.2e} | {last.param_max_abs:.2e} | "
            f"{verdict} |"
        )
    first = trajectories[0]
    return "\n".join(
        [
            "# Many steps: does each strategy train the same as the full batch?",
            "",
            f"Written by `{command}`. Each strategy trained {len(first.points)} optimizer steps "
            f"({first.optimizer}, lr {first.lr:g}) on the `{first.workload}` workload, batch {first.batch_size}, "
            f"{first.precision}, beside its reference on a copy of the same model: {REFERENCE}. "
            f"Parameter distance: ||θ − θ_full|| / ||θ_full|| after each step; an exact strategy passes when "
            f"it stays within {first.tolerance:g} at every step (and its loss too, relative to max(1, |loss|)).",
            "",
            *rows,
            "",
            f"![losses and parameter distance per step]({STEPS_FIGURE})",
            "",
            f"Every figure above is in [`{STEPS_JSON}`]({STEPS_JSON}), per step.",
            "",
        ]
    )


def _colours(trajectories: Sequence[Trajectory]) -> dict[str, str]:
    colours: dict[str, str] = {}
    spare = iter(SPARE_FAMILIES * max(len(trajectories), 1))
    families: dict[str, str] = {}
    for t in trajectories:
        if t.strategy == "full":
            colours[t.label] = REFERENCE_COLOUR
            continue
        family = families.setdefault(t.strategy, FAMILIES.get(t.strategy) or next(spare))
        shade = 0.9 - 0.15 * sum(1 for label in colours if label.startswith(t.strategy))
        colours[t.label] = to_hex(colormaps[family](max(shade, 0.4)))
    return colours
