"""``report.md`` and its files: the headline, then every table and figure with what it shows.

Figures go to ``figures/`` (PNG for reading, SVG for print), tables to ``tables/`` (CSV, Markdown,
LaTeX); report.md links them by relative paths, so the folder can be moved or committed whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
from typing_extensions import TypeIs

from gcbench.report.data import ReportData
from gcbench.report.figures import DPI, report_figures
from gcbench.report.headline import headline
from gcbench.report.load import Run, load_runs
from gcbench.report.memory_steps import CAPTION as STEPS_CAPTION
from gcbench.report.tables import TABLE_FORMATS, ReportTable, report_tables
from gcbench.report.timeline import CAPTION as TIMELINE_CAPTION

REPORT_FILE = "report.md"
FIGURE_FORMATS = ("png", "svg")
CAPTIONS = {  # what a first-time reader needs to read each figure
    "memory": "The peak memory of one training step (parameters, gradients, optimizer state and inputs included; "
    "for several processes, the largest rank's), per strategy and chunk size. An x marks a point that ran "
    "out of memory or went over the budget (a threshold on CPU, where nothing refuses the memory), at the peak it "
    "reached (on the top edge when that is unknown).",
    "largest-batch": 'How far each series got. "The largest tried" means it never failed: it may go further.',
    "breakdown": "What the memory held at the step's peak, as the dispatch-level tracker saw it "
    "(a second run of the step; its total can differ slightly from the allocator's peak).",
    "throughput": "Examples per second at the median step time; error bars span the 95% interval of the median "
    "over the rounds (or, for results without one, the interquartile range of the step times); a bar reaching "
    "past twice the largest value is cut at the top edge. A hollow marker is a noisy time: the table of every "
    "point says why.",
    "caching-cost": "Step time of each caching setting divided by full's at the same batch, where both ran ok: "
    "above 1, caching is slower. Where the two were timed in turns in one process (paired), the ratio is the "
    "median over rounds of the turn-by-turn ratios and the bars span its 95% interval (cut at the top edge "
    "past twice the largest ratio); without bars, it is the ratio of medians measured in separate processes. "
    "A hollow marker is a noisy time.",
    "pareto": "Median step time against peak memory of every setting (strategy, chunk size, graphs kept) measured "
    "at one batch, each labelled with its series. The step line joins the exact settings on the Pareto frontier, "
    "those no other exact setting beats in both time and memory: below it, nothing exact was measured (a "
    "setting marked not exact, such as gradient accumulation, trains on other gradients). The dashed line is "
    "the memory budget; a hollow marker is a noisy time. The table below gives the intervals.",
    "gradient-error": "The largest relative difference between a strategy's gradients and full's, on a log scale, "
    "one filled marker per point; the dashed line is gcbench verify's float32 tolerance (1e-05), against which "
    "exact strategies pass and accumulate (the missing cross-chunk negatives) fails.",
    "prediction": "The peak predicted without allocating (gcbench's estimator) against the peak measured: points "
    "on the dashed line are exact predictions.",
    "steps": STEPS_CAPTION,
    "timeline": TIMELINE_CAPTION,
}


@dataclass(frozen=True)
class ReportFiles:
    """What :func:`write_report` wrote."""

    report: Path
    figures: tuple[Path, ...]  # PNG and SVG of each figure
    tables: tuple[Path, ...]  # CSV, Markdown and LaTeX of each table

    @property
    def all(self) -> tuple[Path, ...]:
        return (self.report, *self.figures, *self.tables)


def _loaded(sources: Sequence[Path] | Sequence[Run]) -> TypeIs[Sequence[Run]]:
    """Runs already loaded (otherwise results files and sweep folders to read, or nothing)."""
    return bool(sources) and all(isinstance(source, Run) for source in sources)


def write_report(
    sources: Sequence[Path] | Sequence[Run],
    out_dir: Path,
    *,
    memory_budget: int | None = None,
    breakdown_batch: int | None = None,
    pareto_batch: int | None = None,
    labels: Sequence[str] | None = None,
) -> ReportFiles:
    """Write ``report.md``, its figures and tables into ``out_dir`` from results files, sweep folders
    or runs already loaded. ``memory_budget`` (bytes) adds the budget to figures and the headline;
    ``breakdown_batch`` picks the batch of the memory breakdown, ``pareto_batch`` that of the Pareto
    figure and table."""
    runs = list(sources) if _loaded(sources) else load_runs(sources, labels)
    data = ReportData.of(runs, memory_budget)
    figures = report_figures(data, breakdown_batch, pareto_batch)
    tables = report_tables(data, pareto_batch)
    out_dir = Path(out_dir)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    (out_dir / "tables").mkdir(parents=True, exist_ok=True)
    figure_paths = []
    with matplotlib.rc_context({"svg.hashsalt": "gcbench"}):  # SVG ids that do not change between runs
        for name, figure in figures.items():
            for extension in FIGURE_FORMATS:
                path = out_dir / "figures" / f"{name}.{extension}"
                figure.savefig(path, dpi=DPI, metadata={"Date": None} if extension == "svg" else None)
                figure_paths.append(path)
    table_paths = [path for table in tables.values() for path in table.write(out_dir / "tables")]
    report = out_dir / REPORT_FILE
    titles = {name: figure.axes[0].get_title("left") for name, figure in figures.items()}
    report.write_text(render(data, titles, tables))
    return ReportFiles(report, tuple(figure_paths), tuple(table_paths))


def render(data: ReportData, figure_titles: dict[str, str], tables: dict[str, ReportTable]) -> str:
    """The Markdown of the report, figures and tables referenced under ``figures/`` and ``tables/``."""
    names = " vs ".join(data.look.runs)
    parts = [f"# gcbench report: {names}", "\n".join(f"- {line}" for line in headline(data))]
    if data.look.several_runs:
        parts.append("Runs are compared: colour names the strategy and chunk size, line style and marker the run.")
    parts += _table(tables["summary"])
    for name, title in figure_titles.items():
        parts += [f"## {title}", f"![{title}](figures/{name}.png)", f"{CAPTIONS[name]} ([SVG](figures/{name}.svg))"]
        if name == "pareto":  # its settings, just below it
            parts += _table(tables["pareto"])
    parts += _table(tables["points"])
    noisy = data.points["noisy"].eq(True)
    if noisy.any():
        loads = data.points.loc[data.points["has_interval"], "load_average_1m"].dropna()
        load = (
            f" The 1-minute load average while timing ranged from {loads.min():.1f} to {loads.max():.1f}."
            if len(loads)
            else ""
        )
        parts.append(
            f"{int(noisy.sum())} of {int(data.points['time_median_s'].notna().sum())} timed points are noisy "
            "(the `noise` column says why: a wide spread within a round, rounds that disagree, a slow first "
            f"step, a busy machine); read their times as rough.{load}"
        )
    if "comparison" in tables:
        parts += _table(tables["comparison"])
    if data.repeated:
        repeated = int((data.points["runs"] > 1).sum())
        parts.append(
            f"{repeated} points were recorded more than once: their numbers are medians over the runs with "
            "the most common status, and `runs` says how many runs there were."
        )
    parts += _table(tables["runs"])
    return "\n\n".join(parts) + "\n"


def _table(table: ReportTable) -> list[str]:
    links = " · ".join(f"[{label}](tables/{table.name}.{extension})" for extension, label in TABLE_FORMATS.items())
    return [f"## {table.title}", table.markdown(), links]
