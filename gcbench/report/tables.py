"""The report's tables: numbers for CSV, the same rows as text for Markdown, LaTeX and the terminal."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from rich.table import Table

from gcbench.measure.stats import ALPHA, FACTOR, compare_samples
from gcbench.report.data import ReportData
from gcbench.report.load import Run
from gcbench.report.style import MemoryUnit
from gcbench.results.records import STATUSES, Point, Record
from gcbench.results.units import format_bytes

TABLE_FORMATS = {"csv": "CSV", "md": "Markdown", "tex": "LaTeX"}  # extension -> name


@dataclass(frozen=True)
class ReportTable:
    """A table in numbers (``frame``, column names carry the units) and how to show each column."""

    name: str
    title: str
    frame: pd.DataFrame
    formats: dict[str, str]  # column -> format spec for the text forms; others are shown as they are

    def text(self) -> pd.DataFrame:
        return self.frame.apply(lambda column: column.map(lambda value: _show(value, self.formats.get(column.name))))

    def markdown(self) -> str:
        cells = self.text().apply(lambda column: column.str.replace("|", "\\|"))
        return cells.to_markdown(index=False, disable_numparse=True, colalign=self._alignment())

    def latex(self) -> str:
        return self.text().to_latex(
            index=False,
            escape=True,
            caption=self.title,
            label=f"tab:{self.name}",
            longtable=len(self.frame) > 30,
            column_format="".join(align[0] for align in self._alignment()),
        )

    def _alignment(self) -> list[str]:
        """Numbers right, text (and columns with nothing in them) left."""
        frame = self.frame
        return [
            "right" if pd.api.types.is_numeric_dtype(frame[c]) and frame[c].notna().any() else "left"
            for c in frame.columns
        ]

    def write(self, folder: Path) -> list[Path]:
        """``NAME.csv``, ``NAME.md`` and ``NAME.tex`` in ``folder``."""
        paths = {extension: folder / f"{self.name}.{extension}" for extension in TABLE_FORMATS}
        self.frame.to_csv(paths["csv"], index=False)
        paths["md"].write_text(self.markdown() + "\n")
        paths["tex"].write_text(self.latex())
        return list(paths.values())


def report_tables(data: ReportData, pareto_batch: int | None = None) -> dict[str, ReportTable]:
    """Every table, by name, in reading order (the Pareto table only when a batch has one, the comparison
    only when runs are compared)."""
    batch = data.pareto_batch(pareto_batch)
    tables = [
        summary(data),
        *([pareto(data, batch)] if batch is not None else []),
        every_point(data),
        *([compared] if data.look.several_runs and not (compared := comparison(data)).frame.empty else []),
        sources(data),
    ]
    return {table.name: table for table in tables}


def summary(data: ReportData) -> ReportTable:
    """Per series (and run): how far it got, what that cost, how exact it was, what happened."""
    points = data.points
    best = data.largest_fits().set_index(["run", "series"])
    unit = MemoryUnit.of(best["peak"])
    largest = "largest batch ok" if data.budget is None else f"largest batch within {format_bytes(data.budget)}"
    peak = f"peak memory there ({unit.name})"
    rows: list[dict[str, Any]] = []
    for (run, series), group in points.groupby(["run", "series"], sort=False):
        there = best.loc[(run, series)] if (run, series) in best.index else None
        ok = group[group["status"] == "ok"]
        rows.append(
            {
                "run": run,
                "series": series,
                "world size": group["world_size"].max(),
                largest: None if there is None else there["batch_size"],
                peak: None if there is None else unit(there["peak"]),
                "examples/s there": None if there is None else there["examples_per_s"],
                "max grad rel err": ok["grad_max_rel_err"].max(),
                "noisy times": int(ok["noisy"].eq(True).sum()),
                **{status: int((group["status"] == status).sum()) for status in STATUSES},
            }
        )
    frame = _drop_unneeded(
        data,
        pd.DataFrame(
            rows,
            columns=[
                "run",
                "series",
                "world size",
                largest,
                peak,
                "examples/s there",
                "max grad rel err",
                "noisy times",
                *STATUSES,
            ],
        ),
    )
    formats = {largest: ".0f", peak: ",.1f", "examples/s there": ",.0f", "max grad rel err": ".1e"}
    return ReportTable("summary", "Summary per series", frame, formats)


def every_point(data: ReportData) -> ReportTable:
    """Every point measured (repeats merged into medians), with predictions where there are any, and the
    loss's own peak (measured, and predicted for points that did not run) where the records have it."""
    points = data.points
    unit = MemoryUnit.of(points["peak"])
    peak, predicted = f"peak memory ({unit.name})", f"predicted peak ({unit.name})"
    losses = points[["loss_peak_bytes", "predicted_loss_peak_bytes"]].astype(float)
    loss_unit = MemoryUnit.of(losses.stack())
    loss_peak, predicted_loss = f"loss peak ({loss_unit.name})", f"predicted loss peak ({loss_unit.name})"
    frame = pd.DataFrame(
        {
            "run": points["run"],
            "series": points["series"],
            "batch": points["batch_size"],
            "chunks": points["chunk_sizes"],
            "world size": points["world_size"],
            "status": points["outcome"],  # ok, over the budget, out of memory, error, ...
            "reason": points["reason"],
            peak: unit(points["peak"]),
            "step time (ms)": points["time_median_s"] * 1e3,
            "step time IQR (ms)": points["time_iqr_s"] * 1e3,
            "step time 95% CI (ms)": _interval(points["time_low_s"] * 1e3, points["time_high_s"] * 1e3, ",.1f"),
            "rounds": points["time_rounds"].where(points["has_interval"]),
            "examples/s": points["examples_per_s"],
            "vs full, paired": points["paired_ratio"],
            "vs full 95% CI": _interval(points["paired_low"], points["paired_high"], ".2f"),
            "noise": points["noise"],
            "load": points["load_average_1m"].where(points["has_interval"]),
            "grad rel err": points["grad_max_rel_err"],
            predicted: unit(points["predicted_peak_bytes"]),
            "prediction error (%)": points["prediction_error"] * 100,
            "loss tile": points["loss_tile"],
            loss_peak: loss_unit(losses["loss_peak_bytes"]),
            predicted_loss: loss_unit(losses["predicted_loss_peak_bytes"]),
            "runs": points["runs"],
        }
    )
    if not data.predicted:
        frame = frame.drop(columns=[predicted, "prediction error (%)"])
    dropped = (*EMPTY_DROPPED, "loss tile", loss_peak, predicted_loss)
    frame = frame.drop(columns=[c for c in dropped if frame[c].isna().all()])
    formats = {
        peak: ",.1f",
        "step time (ms)": ",.1f",
        "step time IQR (ms)": ",.1f",
        "rounds": ".0f",
        "vs full, paired": ".2f",
        "load": ".1f",
        "examples/s": ",.0f",
        "grad rel err": ".1e",
        predicted: ",.1f",
        "prediction error (%)": "+.1f",
        "loss tile": ".0f",
        loss_peak: ",.1f",
        predicted_loss: ",.1f",
    }
    return ReportTable("points", "Every point", _drop_unneeded(data, frame), formats)


def pareto(data: ReportData, batch: int) -> ReportTable:
    """The settings of the Pareto figure, least memory first, and whether each is on the frontier."""
    rows = data.pareto(batch).sort_values(["run", "peak", "time_median_s"], key=_run_order(data), kind="stable")
    unit = MemoryUnit.of([*rows["peak"], data.budget])
    peak = f"peak memory ({unit.name})"
    frame = pd.DataFrame(
        {
            "run": rows["run"],
            "series": rows["series"],
            peak: unit(rows["peak"]),
            "within budget": rows["fits"].map({True: "yes", False: "no"}),
            "step time (ms)": rows["time_median_s"] * 1e3,
            "step time 95% CI (ms)": _interval(rows["time_low_s"] * 1e3, rows["time_high_s"] * 1e3, ",.1f"),
            "vs full, paired": rows["paired_ratio"],
            "vs full 95% CI": _interval(rows["paired_low"], rows["paired_high"], ".2f"),
            "noise": rows["noise"],
            "on frontier": rows["on_frontier"].map({True: "yes", False: "no"}),
        }
    )
    if data.budget is None:
        frame = frame.drop(columns="within budget")
    frame = frame.drop(columns=[c for c in EMPTY_DROPPED if c in frame and frame[c].isna().all()])
    formats = {peak: ",.1f", "step time (ms)": ",.1f", "vs full, paired": ".2f"}
    title = f"Settings at batch {batch}: on the Pareto frontier when no other is both faster and smaller"
    return ReportTable("pareto", title, _drop_unneeded(data, frame.reset_index(drop=True)), formats)


def _run_order(data: ReportData) -> Any:
    """A sort key that keeps runs in the report's order (numbers sort as they are)."""
    return lambda column: column.map(data.look.runs.index) if column.name == "run" else column


def comparison(data: ReportData) -> ReportTable:
    """Each later run against the first of the same experiment, point by point: the factor of their median
    step times and whether the difference is significant (asv's rule: a factor past 1.1 and a Mann-Whitney
    U test at p < 0.01, over every timed step of every round). Runs of other experiments are not compared."""
    firsts: dict[str, Run] = {}
    pairs = []
    for run in data.runs:
        if run.experiment in firsts:
            pairs.append((firsts[run.experiment], run))
        else:
            firsts[run.experiment] = run
    bases = list(dict.fromkeys(base.label for base, _ in pairs)) or [data.runs[0].label]
    one_base = len(bases) == 1
    against = f"{bases[0]} (ms)" if one_base else "against (ms)"
    rows = []
    for first, run in pairs:
        base = _timed_points(first)
        for point, (p, samples, median) in _timed_points(run).items():
            if point not in base:
                continue
            _, base_samples, base_median = base[point]
            result = compare_samples(base_samples, samples, medians=(base_median, median))
            rows.append(
                {
                    "run": run.label,
                    "against": first.label,
                    "series": p.series,
                    "batch": p.batch_size,
                    against: base_median * 1e3,
                    "this run (ms)": median * 1e3,
                    "factor": result.factor,
                    "p": result.p,
                    "difference": result.verdict,
                }
            )
    columns = ["run", "against", "series", "batch", against, "this run (ms)", "factor", "p", "difference"]
    if one_base:
        columns.remove("against")
    formats = {against: ",.1f", "this run (ms)": ",.1f", "factor": ".2f", "p": ".3g"}
    which = bases[0] if one_base else "the first run of the same experiment"
    title = f"Step time against {which}: a difference is significant past a factor of {FACTOR} at p < {ALPHA}"
    return ReportTable("comparison", title, pd.DataFrame(rows, columns=columns)[columns], formats)


def _timed_points(run: Run) -> dict[str, tuple[Point, list[float], float]]:
    """Per point that ran ok: every timed step (all its records and rounds pooled) and its median step
    time (the median over its records, as the other tables show it)."""
    records: dict[str, list[Record]] = {}
    for record in run.records:
        if record.status == "ok" and record.time is not None:
            records.setdefault(record.point.id, []).append(record)
    return {
        point: (
            found[0].point,
            [s for r in found if r.time for s in r.time.samples_s],
            statistics.median(r.time.median_s for r in found if r.time),
        )
        for point, found in records.items()
    }


def sources(data: ReportData) -> ReportTable:
    """Where each run's numbers come from: the file, the machine, the code."""
    rows = []
    for run in data.runs:
        torch = dict.fromkeys(r.env.torch for r in run.records if r.env.torch)
        commits = dict.fromkeys(r.env.git_commit[:10] for r in run.records if r.env.git_commit)
        finished = sorted(r.finished_at for r in run.records if r.finished_at)
        rows.append(
            {
                "run": run.label,
                "results": str(run.source),
                "experiment": run.experiment,
                "device": run.device_name,
                "torch": ", ".join(torch),
                "git commit": ", ".join(commits),
                "points": len(run.records),
                "finished": f"{finished[0]} to {finished[-1]}" if finished else None,
            }
        )
    return ReportTable("runs", "Runs", pd.DataFrame(rows), {})


def summary_table(runs: Sequence[Run], memory_budget: int | None = None) -> Table:
    """The summary for a terminal (``gcbench report --show``)."""
    table = summary(ReportData.of(runs, memory_budget))
    shown = Table(title=f"{table.title}: {', '.join(run.label for run in runs)}", title_justify="left")
    for column in table.frame.columns:
        text = column in ("run", "series")
        shown.add_column(column, justify="left" if text else "right", no_wrap=text)
    for row in table.text().itertuples(index=False):
        shown.add_row(*row)
    return shown


def _drop_unneeded(data: ReportData, frame: pd.DataFrame) -> pd.DataFrame:
    """Columns that would say nothing: the run of a one-run report, world size 1, one run per point."""
    unneeded = {
        "run": not data.look.several_runs,
        "world size": not data.distributed,
        "runs": not data.repeated,
        "noisy times": not data.points["noisy"].eq(True).any(),
    }
    return frame.drop(columns=[column for column, drop in unneeded.items() if drop and column in frame])


EMPTY_DROPPED = ("step time 95% CI (ms)", "rounds", "vs full, paired", "vs full 95% CI", "noise", "load")


def _interval(low: pd.Series, high: pd.Series, spec: str) -> pd.Series:
    """``low to high`` as text, None where there is no interval."""
    return pd.Series(
        [None if pd.isna(a) or pd.isna(b) else f"{a:{spec}} to {b:{spec}}" for a, b in zip(low, high)],
        index=low.index,
        dtype=object,
    )


def _show(value: object, spec: str | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):  # nothing measured
        return "-"
    return format(value, spec) if spec and isinstance(value, (int, float)) else str(value)
