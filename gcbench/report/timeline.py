"""The report's timeline: one step's memory over its time, phases shaded, ``full`` and caching side by side.

Drawn from the sweep folder's ``timeline.json`` (``sweep.timeline = true``; :mod:`gcbench.measure.timeline`).
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from gcbench.measure.timeline import TIMELINE_FILE, StepTimeline, read_timelines
from gcbench.report.data import ReportData
from gcbench.report.style import MemoryUnit

WIDTH_IN, DPI = 6.4, 125
PHASE_COLOURS = {  # by the phase's kind (its name up to the comma)
    "encode with graph": "#9ecae1",
    "loss and backward": "#fdae6b",
    "encode without graph": "#c6dbef",
    "loss and cache": "#fdae6b",
    "backward of the kept graph": "#bcbddc",
    "re-encode and backward": "#a1d99b",
    "optimizer step": "#d9d9d9",
}
CAPTION = (
    "The memory held over one training step (parameters, gradients, optimizer state and inputs included), "
    "as the dispatch-level tracker saw every allocation and free, with the step's phases shaded: full encodes "
    "with every graph, then the loss and one backward; cache encodes every chunk without a graph, computes the "
    "loss and caches the representations' gradients, then re-encodes each chunk and back-propagates its slice "
    "(shades alternate chunk by chunk; a kept graph goes backward first, without re-encoding), then the "
    "optimizer step. Times are those of the tracked run, which the tracker slows: read them as order and share."
)


def timeline_source(data: ReportData) -> Path | None:
    """The first run's ``timeline.json``, beside its results file."""
    for run in data.runs:
        path = Path(run.source).parent / TIMELINE_FILE
        if path.is_file():
            return path
    return None


def timeline_figure(data: ReportData) -> Figure | None:
    path = timeline_source(data)
    if path is None:
        return None
    point, steps = read_timelines(path)
    if not steps:
        return None
    fig = Figure(figsize=(WIDTH_IN, 4.4), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(steps), sharey=True, squeeze=False)[0]
    unit = MemoryUnit.of(max(s.bytes, default=0) for s in steps)
    axes[0].set_title(f"One step's memory over time ({point})", loc="left", fontsize="medium", fontweight="bold")
    kinds: dict[str, str] = {}
    for ax, step in zip(axes, steps):
        _draw(ax, step, unit, kinds)
    axes[0].set_ylabel(f"memory held ({unit.name})")
    handles = [Patch(facecolor=colour, label=kind) for kind, colour in kinds.items()]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize="small")
    return fig


def _draw(ax, step: StepTimeline, unit: MemoryUnit, kinds: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    chunk = 0
    for name, start, end in step.phases:
        kind = name.split(",")[0]
        colour = PHASE_COLOURS.get(kind, "#eeeeee")
        kinds.setdefault(kind, colour)
        alpha = 0.9
        if kind in ("re-encode and backward", "backward of the kept graph"):
            alpha = 0.9 if chunk % 2 == 0 else 0.5  # chunk by chunk
            chunk += 1
        ax.axvspan(start * 1e3, end * 1e3, color=colour, alpha=alpha, linewidth=0)
    ax.plot([t * 1e3 for t in step.times_s], [unit(b) for b in step.bytes], color="#08306b", linewidth=1.1)
    ax.axhline(unit(step.peak_bytes), color="0.45", linestyle="--", linewidth=1)
    ax.set_xlabel("time in the tracked step (ms)")
    label = f"{step.label}\npeak {unit(step.peak_bytes):.3g} {unit.name}"
    ax.text(
        0.02, 0.97, label, transform=ax.transAxes, va="top", fontsize="small", bbox={"facecolor": "white", "alpha": 0.8}
    )
    ax.grid(True, alpha=0.3)
