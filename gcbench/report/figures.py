"""The report's figures, each a function of the report data returning a matplotlib Figure (None when
the data has nothing for it), so tests can read the plotted lines instead of pixels.

Sized for a README (800 px wide at ``DPI``): one legend below the axes, batch sizes on a log2 axis
labelled with the sizes swept, memory in the unit its values call for.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import LogFormatter, NullLocator

from gcbench.measure.tracker import CATEGORIES
from gcbench.report.data import ReportData
from gcbench.report.memory_steps import steps_figure
from gcbench.report.style import CATEGORY_COLOURS, FAILED_COLOUR, MemoryUnit
from gcbench.report.timeline import timeline_figure
from gcbench.results.units import format_bytes
from gcbench.verify import DEFAULT_TOLERANCE

WIDTH_IN, DPI = 6.4, 125  # 800 px
GUIDE: dict[str, Any] = {"color": "0.45", "linestyle": "--", "linewidth": 1.2}  # reference lines: budget, y = 1, y = x


def report_figures(
    data: ReportData, breakdown_batch: int | None = None, pareto_batch: int | None = None
) -> dict[str, Figure]:
    """Every figure the data supports, by file name (without extension), in reading order."""
    pareto = data.pareto_batch(pareto_batch)
    figures = {
        "memory": memory_figure(data),
        "largest-batch": largest_batch_figure(data),
        "breakdown": breakdown_figure(data, data.breakdown_batch(breakdown_batch)),
        "throughput": throughput_figure(data),
        "caching-cost": caching_cost_figure(data),
        "pareto": None if pareto is None else pareto_figure(data, pareto),
        "gradient-error": gradient_error_figure(data),
        "prediction": prediction_figure(data) if data.predicted else None,
        "steps": steps_figure(data),
        "timeline": timeline_figure(data),
    }
    return {name: figure for name, figure in figures.items() if figure is not None}


def memory_figure(data: ReportData) -> Figure | None:
    points = data.points
    ok = points[(points["status"] == "ok") & points["peak"].notna()]
    oom = points[points["status"] == "oom"]
    if ok.empty and oom.empty:
        return None
    unit = MemoryUnit.of([*ok["peak"], *oom["peak"], data.budget])
    fig, ax = _figure("Peak memory of a training step")
    _series_lines(ax, data, ok, unit(ok["peak"]))
    extra = []
    if not oom.empty:
        # An x in the series' colour at the peak reached, or on the top edge when that is unknown.
        known, unknown = oom[oom["peak"].notna()], oom[oom["peak"].isna()]
        top = ax.get_xaxis_transform()
        mark: dict[str, Any] = {"marker": "x", "s": 70, "linewidths": 2.5, "zorder": 4, "clip_on": False}
        ax.scatter(known["batch_size"], unit(known["peak"]), c=known["series"].map(data.look.colour), **mark)
        ax.scatter(
            unknown["batch_size"],
            np.ones(len(unknown)),
            c=unknown["series"].map(data.look.colour),
            transform=top,
            **mark,
        )
        for batch, series in zip(unknown["batch_size"], unknown["series"]):
            ax.annotate(
                "peak unknown",
                (batch, 1),
                xycoords=top,
                xytext=(7, -4),
                textcoords="offset points",
                va="top",
                fontsize="x-small",
                color=data.look.colour(series),
            )
        said = " or ".join(sorted(set(oom["outcome"]), reverse=True))  # over the budget, out of memory
        extra.append(Line2D([], [], lw=0, marker="x", color="0.3", mew=2.5, label=said))
    if data.budget is not None:
        extra.append(ax.axhline(unit(data.budget), **GUIDE, label=f"budget {format_bytes(data.budget)}"))
    _batch_axis(ax, points["batch_size"])
    ax.set_ylabel(f"peak memory ({unit.name})")
    ax.set_ylim(bottom=0)
    _legend(fig, data.look.legend_handles([*ok["series"], *oom["series"]]) + extra)
    return fig


def throughput_figure(data: ReportData) -> Figure | None:
    ok = _ok(data, "examples_per_s")
    if ok.empty:
        return None
    if ok["has_interval"].all():
        bars = "95% interval of the median"
    elif ok["has_interval"].any():
        bars = "95% interval, or interquartile range where there is none"
    else:
        bars = "interquartile range"
    fig, ax = _figure(f"Throughput (median step; bars: {bars})")
    # Clipped at 0: medians of repeated points need not keep the median between the quartiles.
    rate = ok["examples_per_s"]
    errors = np.clip([rate - ok["examples_per_s_slow"], ok["examples_per_s_fast"] - rate], 0, None)
    _series_lines(ax, data, ok, rate, errors)
    _batch_axis(ax, data.points["batch_size"])
    ax.set_ylabel("examples per second")
    ax.set_ylim(0, _top(rate, rate + errors[1]))
    _legend(fig, data.look.legend_handles(ok["series"]) + _noisy_handle(ok))
    return fig


def breakdown_figure(data: ReportData, batch: int | None) -> Figure | None:
    """Stacked bars of the tracker's breakdown at the step's peak, one bar per series (and run)."""
    columns = [f"memory_{category}" for category in CATEGORIES]
    rows = data.points[(data.points["status"] == "ok") & (data.points["batch_size"] == batch)]
    rows = _bar_order(data, rows[rows[columns].notna().any(axis=1)])
    if rows.empty:
        return None
    totals = rows[columns].fillna(0).sum(axis=1)
    unit = MemoryUnit.of(totals)
    fig, ax = _figure(f"Where the memory goes at batch {batch} (at the step's peak)", height=_bars_height(len(rows)))
    y = np.arange(len(rows))
    left = np.zeros(len(rows))
    for category, column in zip(CATEGORIES, columns):
        values = unit(rows[column].fillna(0)).to_numpy()
        ax.barh(y, values, left=left, height=0.7, color=CATEGORY_COLOURS[category], label=category)
        left += values
    for position, total in enumerate(totals):
        ax.text(unit(total), position, f" {format_bytes(total)}", va="center", fontsize="small")
    _series_ticks(ax, data, rows)
    ax.set_xlabel(f"memory ({unit.name})")
    ax.set_xlim(right=left.max() * 1.25)
    _legend(fig, [Patch(color=CATEGORY_COLOURS[c], label=c) for c in CATEGORIES])
    return fig


def largest_batch_figure(data: ReportData) -> Figure | None:
    """Per series, the largest batch that ran ok (within the budget, when there is one)."""
    points = data.points
    if points.empty:
        return None
    best = data.largest_fits().set_index(["run", "series"])["batch_size"]
    series = _bar_order(data, points.drop_duplicates(["run", "series"]))
    tried = points[points["status"] != "skipped"].groupby(["run", "series"])["batch_size"].max()
    base = points["batch_size"].min() / 2
    title = (
        "Largest batch that ran"
        if data.budget is None
        else f"Largest batch within the {format_bytes(data.budget)} budget"
    )
    fig, ax = _figure(title, height=_bars_height(len(series)))
    for position, (run, name) in enumerate(zip(series["run"], series["series"])):
        batch = best.get((run, name))
        if batch is None:
            ax.text(
                base,
                position,
                " none ran ok" if data.budget is None else " none fit",
                va="center",
                fontsize="small",
                color=FAILED_COLOUR,
            )
            continue
        ax.barh(position, batch - base, left=base, height=0.7, color=data.look.colour(name))
        note = " (the largest tried)" if batch == tried.get((run, name)) else ""
        ax.text(batch, position, f" {batch}{note}", va="center", fontsize="small")
    _series_ticks(ax, data, series)
    _batch_axis(ax, points["batch_size"])
    ax.set_xlim(base, points["batch_size"].max() * 8)  # room for the notes
    return fig


def gradient_error_figure(data: ReportData) -> Figure | None:
    """Max relative gradient error against full, on a log axis; exact zeros are drawn at a floor."""
    rows = _ok(data, "grad_max_rel_err")
    if rows.empty:
        return None
    positive = rows.loc[rows["grad_max_rel_err"] > 0, "grad_max_rel_err"]
    floor = 10.0 ** (math.floor(math.log10(positive.min())) - 1) if not positive.empty else 1e-12
    fig, ax = _figure("Gradient error against the full batch")
    # Filled markers only: the hollow ones of the time figures flag noisy times, which say nothing of gradients.
    _series_lines(ax, data, rows.assign(noisy=False), rows["grad_max_rel_err"].clip(lower=floor))
    tolerance = DEFAULT_TOLERANCE["float32"]  # the records do not say their precision: float32's, the default
    extra = [ax.axhline(tolerance, **GUIDE, label=f"float32 tolerance of gcbench verify ({tolerance:.0e})")]
    if (rows["grad_max_rel_err"] <= 0).any():
        extra.append(
            ax.axhline(floor, color="0.45", linestyle=":", linewidth=1.2, label=f"exactly 0 (drawn at {floor:.0e})")
        )
    ax.set_ylim(floor / 3, max(rows["grad_max_rel_err"].max() * 3, floor * 100, tolerance * 3))
    ax.set_yscale("log")
    _batch_axis(ax, data.points["batch_size"])
    ax.set_ylabel("max relative error of the gradients")
    _legend(fig, data.look.legend_handles(rows["series"]) + extra)
    return fig


def caching_cost_figure(data: ReportData) -> Figure | None:
    """Step time of each caching series over full's at the same batch, where both ran ok."""
    ratios = data.caching_cost()
    if ratios.empty:
        return None
    paired = bool(ratios["paired"].any())
    title = (
        "Cost of caching against full, timed in turns (bars: 95% interval)"
        if paired
        else ("Cost of caching: step time relative to full")
    )
    fig, ax = _figure(title)
    ratio = ratios["time_ratio"]
    errors = None
    if paired:  # no bar where a point was not timed in turns with full
        errors = np.clip([(ratio - ratios["ratio_low"]).fillna(0), (ratios["ratio_high"] - ratio).fillna(0)], 0, None)
    _series_lines(ax, data, ratios, ratio, errors)
    same = ax.axhline(1.0, **GUIDE, label="as fast as full")
    _batch_axis(ax, data.points["batch_size"])
    ax.set_ylabel("step time ÷ full's step time")
    ax.set_ylim(0, max(2.0, _top(ratio, ratios["ratio_high"].fillna(ratio))))
    _legend(fig, data.look.legend_handles(ratios["series"]) + [same] + _noisy_handle(ratios))
    return fig


def pareto_figure(data: ReportData, batch: int) -> Figure | None:
    """Median step time against peak memory of every setting at one batch, the exact settings no other
    beats in both joined by a step line (per run): the least time each amount of memory can buy."""
    rows = data.pareto(batch)
    if rows.empty:
        return None
    unit = MemoryUnit.of([*rows["peak"], data.budget])
    seconds = rows["time_median_s"].max() >= 1
    scale, time_unit = (1.0, "s") if seconds else (1e3, "ms")
    fig, ax = _figure(f"Step time against peak memory at batch {batch}")
    rows = rows.assign(_x=unit(rows["peak"]), _y=rows["time_median_s"] * scale, _hollow=rows["noisy"].eq(True))
    right = max(float(rows["_x"].max()), unit(data.budget) if data.budget is not None else 0) * 1.3  # room for labels
    extra: list[Artist] = []
    for run, group in rows.groupby("run", sort=False):
        style = data.look.run_style(str(run))
        front = group[group["on_frontier"]].sort_values(["_x", "_y"])
        # On to the right edge: more memory than the last frontier point buys no less time.
        (line,) = ax.step(
            [*front["_x"], right],
            [*front["_y"], front["_y"].iloc[-1]],
            where="post",
            color="0.35",
            linestyle=style["linestyle"],
            linewidth=1.2,
            zorder=1,
            label=f"Pareto frontier [{run}]" if data.look.several_runs else "Pareto frontier",
        )
        extra.append(line)
        labels: dict[tuple[float, float], list[tuple[str, str]]] = {}  # settings measured alike share a label
        for series, x, y, hollow, exact in zip(
            group["series"], group["_x"], group["_y"], group["_hollow"], group["is_exact"]
        ):
            colour = data.look.colour(series)
            labels.setdefault((x, y), []).append((series, series if exact else f"{series}, not exact"))
            ax.plot(
                x,
                y,
                linestyle="none",
                marker=style["marker"],
                markersize=6,
                color=colour,
                markerfacecolor="white" if hollow else colour,
                label=data.look.line_label(series, str(run)),
                zorder=3,
            )
        for (x, y), names in labels.items():
            colour = data.look.colour(names[0][0]) if len(names) == 1 else "0.2"
            text = "\n".join(text for _, text in names)
            ax.annotate(text, (x, y), xytext=(5, 4), textcoords="offset points", fontsize="x-small", color=colour)
    if data.budget is not None:
        extra.append(ax.axvline(unit(data.budget), **GUIDE, label=f"budget {format_bytes(data.budget)}"))
    ax.set_xlim(0, right)
    ax.set_ylim(0, float(rows["_y"].max()) * 1.15)
    ax.set_xlabel(f"peak memory ({unit.name})")
    ax.set_ylabel(f"median step time ({time_unit})")
    runs = data.look.legend_handles([], markers=True)  # points are labelled: only the runs' markers, if compared
    _legend(fig, extra + runs + _noisy_handle(rows))
    return fig


def prediction_figure(data: ReportData) -> Figure | None:
    rows = _ok(data, "predicted_peak_bytes")
    rows = rows[rows["peak"].notna()]
    if rows.empty:
        return None
    unit = MemoryUnit.of([*rows["peak"], *rows["predicted_peak_bytes"]])
    median = rows["prediction_error"].abs().median()
    fig, ax = _figure(f"Predicted against measured peak (median error {median:.0%})")
    for run, series, group in _run_series_groups(rows):
        ax.plot(
            unit(group["peak"]),
            unit(group["predicted_peak_bytes"]),
            color=data.look.colour(series),
            label=data.look.line_label(series, run),
            **{**data.look.run_style(run), "linestyle": "none"},
        )
    low = unit(min(rows["peak"].min(), rows["predicted_peak_bytes"].min())) / 1.25
    high = unit(max(rows["peak"].max(), rows["predicted_peak_bytes"].max())) * 1.25
    (diagonal,) = ax.plot([low, high], [low, high], **GUIDE, label="predicted = measured")
    scale = ""
    if high / low > 10:  # over a decade: log axes, so small points do not crowd the origin
        scale = ", log scale"
        ax.set_xscale("log")
        ax.set_yscale("log")
        plain = LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5))  # 20, 30, not 2×10¹
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(plain)
            axis.set_minor_formatter(plain)
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.set_aspect("equal")
    ax.set_xlabel(f"measured peak ({unit.name}{scale})")
    ax.set_ylabel(f"predicted peak ({unit.name}{scale})")
    _legend(fig, data.look.legend_handles(rows["series"], markers=True) + [diagonal])
    return fig


# Shared pieces ---------------------------------------------------------------------------------------


def _figure(title: str, height: float = 4.8) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(WIDTH_IN, height), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, loc="left", fontsize="medium", fontweight="bold")
    ax.grid(True, alpha=0.3)
    ax.set_axisbelow(True)
    return fig, ax


def _bars_height(bars: int) -> float:
    return 1.9 + 0.38 * bars


def _ok(data: ReportData, column: str) -> pd.DataFrame:
    points = data.points
    return points[(points["status"] == "ok") & points[column].notna()]


def _series_lines(
    ax: Axes, data: ReportData, rows: pd.DataFrame, y: pd.Series, errors: np.ndarray | None = None
) -> None:
    """One line per run and series over batch size: colour from the series, style from the run."""
    rows = rows.assign(_y=y.to_numpy())
    if errors is not None:
        rows = rows.assign(_low=errors[0], _high=errors[1])
    for run, series, group in _run_series_groups(rows):
        style: dict[str, Any] = {
            "color": data.look.colour(series),
            "label": data.look.line_label(series, run),
            "markersize": 4,
            **data.look.run_style(run),
        }
        if errors is None:
            ax.plot(group["batch_size"], group["_y"], **style)
        else:
            ax.errorbar(group["batch_size"], group["_y"], yerr=[group["_low"], group["_high"]], capsize=3, **style)
        noisy = group[group["noisy"].eq(True)] if "noisy" in group else group.iloc[:0]
        if not noisy.empty:  # hollow markers over the filled ones: times not to be trusted
            ax.plot(
                noisy["batch_size"],
                noisy["_y"],
                linestyle="none",
                marker=style["marker"],
                markersize=6,
                markerfacecolor="white",
                markeredgecolor=style["color"],
                label="_noisy",
                zorder=3,
            )


def _top(values: pd.Series, highs: pd.Series) -> float:
    """The top of a y axis that shows every value and its bar, a bar cut at the edge where it reaches past
    twice the largest value (a noisy interval must not flatten every line)."""
    largest = float(values.max())
    return max(largest * 1.1, min(float(np.nanmax(highs)) * 1.05, largest * 2))


def _noisy_handle(rows: pd.DataFrame) -> list[Artist]:
    """The legend's note on hollow markers, when any point shown is noisy."""
    if not rows["noisy"].eq(True).any():
        return []
    return [Line2D([], [], lw=0, marker="o", markerfacecolor="white", color="0.3", label="hollow: noisy time")]


def _run_series_groups(rows: pd.DataFrame) -> Iterator[tuple[str, str, pd.DataFrame]]:
    """The rows of each run and series, in order of first appearance."""
    for (run, series), group in rows.groupby(["run", "series"], sort=False):
        yield str(run), str(series), group


def _batch_axis(ax: Axes, batches: Iterable[int]) -> None:
    """A log2 axis ticked at the batch sizes swept (with room around a single one)."""
    ticks = sorted({int(b) for b in batches})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(b) for b in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    if len(ticks) > 9:  # long sweeps: keep neighbouring labels apart
        ax.tick_params(axis="x", labelrotation=45)
    if len(ticks) == 1:
        ax.set_xlim(ticks[0] / 2, ticks[0] * 2)
    ax.set_xlabel("batch size (examples per step, log scale)")


def _bar_order(data: ReportData, rows: pd.DataFrame) -> pd.DataFrame:
    """Bars grouped by series, runs side by side within a series, for comparing runs."""
    return rows.assign(_rank=rows["series"].map(data.look.series.index)).sort_values("_rank", kind="stable")


def _series_ticks(ax: Axes, data: ReportData, rows: pd.DataFrame) -> None:
    """Bars labelled by series (and run), top to bottom, each label in its series' colour."""
    labels = [data.look.row_label(s, r) for s, r in zip(rows["series"], rows["run"])]
    ax.set_yticks(np.arange(len(rows)), labels)
    for tick, series in zip(ax.get_yticklabels(), rows["series"]):
        tick.set_color(data.look.colour(series))
    ax.set_ylim(len(rows) - 0.5, -0.5)  # top to bottom, every row shown even without a bar
    ax.grid(False, axis="y")


def _legend(fig: Figure, handles: Sequence[Artist]) -> None:
    """Below the axes, in as many columns (up to 3) as the longest label leaves room for."""
    longest = max(len(str(handle.get_label())) for handle in handles)
    columns = 3 if longest <= 24 else 2 if longest <= 38 else 1
    fig.legend(
        handles=handles, loc="outside lower center", ncols=min(columns, len(handles)), frameon=False, fontsize="small"
    )
