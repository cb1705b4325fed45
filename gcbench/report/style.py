"""How the report looks, decided in one place: a series keeps its colour and a run its line style in
every figure, and memory is shown in one unit per figure or table, picked from the values shown."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import to_hex
from matplotlib.lines import Line2D

from gcbench.results.records import Point
from gcbench.results.units import byte_unit

REFERENCE_COLOUR = "#222222"
# Shades of one hue per strategy (one shade per chunk setting); red is kept for failure notes. Strategies
# not named here get a spare family: a preference of presentation, never a test of what a strategy is.
FAMILIES = {"cache": "Blues", "cache-rerun": "Purples", "accumulate": "Oranges", "checkpoint": "Greens"}
SPARE_FAMILIES = ("YlOrBr", "PuRd", "BuGn", "Greys")
SHADES = (0.9, 0.55)  # darkest (smallest chunks) to lightest (largest), as colormap positions
RUN_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1, 1, 1)), "v"))
FAILED_COLOUR = "#d62728"
CATEGORY_COLOURS = {  # the memory breakdown: fixed, and unlike any series colour family
    "parameters": "#4c72b0",
    "gradients": "#8172b3",
    "optimizer": "#937860",
    "inputs": "#8c8c8c",
    "activations": "#dd8452",
    "temporaries": "#ccb974",
}


@dataclass(frozen=True)
class Look:
    """Series order and colours, run line styles: fixed once per report so every figure agrees."""

    series: tuple[str, ...]
    colours: dict[str, str]
    runs: tuple[str, ...]

    @classmethod
    def of(cls, points: Iterable[Point], runs: Sequence[str], references: Iterable[str] = ()) -> Look:
        """Strategies in order of first appearance (the experiment's order), chunk settings ascending and
        within one the kept graphs ascending; the reference strategies (``full``) in black."""
        references = set(references)
        by_strategy: dict[str, set[tuple[tuple[int, ...], float, tuple[int, ...]]]] = {}
        for p in points:
            keep = -1.0 if p.keep_graphs is None else math.inf if p.keep_graphs == "all" else float(p.keep_graphs)
            by_strategy.setdefault(p.strategy, set()).add((p.chunk_sizes or (), keep, p.chunk_tokens or ()))
        spare = iter(SPARE_FAMILIES * len(by_strategy))
        colours: dict[str, str] = {}
        for strategy, settings in by_strategy.items():
            ordered = sorted(settings)
            if strategy in references and ordered == [((), -1.0, ())]:
                colours[strategy] = REFERENCE_COLOUR
                continue
            family = colormaps[FAMILIES.get(strategy) or next(spare)]
            for i, (chunks, keep, tokens) in enumerate(ordered):
                shade = SHADES[0] + (SHADES[1] - SHADES[0]) * i / max(len(ordered) - 1, 1)
                kept: int | Literal["all"] | None = None if keep < 0 else "all" if keep == math.inf else int(keep)
                colours[Point(strategy, 1, chunks or None, kept, tokens or None).series] = to_hex(family(shade))
        return cls(tuple(colours), colours, tuple(runs))

    @property
    def several_runs(self) -> bool:
        return len(self.runs) > 1

    def colour(self, series: str) -> str:
        return self.colours[series]

    def run_style(self, run: str) -> dict[str, Any]:
        linestyle, marker = RUN_STYLES[self.runs.index(run) % len(RUN_STYLES)]
        return {"linestyle": linestyle, "marker": marker}

    def line_label(self, series: str, run: str) -> str:
        """The label of a plotted line: the series, and the run when runs are compared."""
        return f"{series} [{run}]" if self.several_runs else series

    def row_label(self, series: str, run: str) -> str:
        """A bar's tick label: the series, and the run on a second line when runs are compared."""
        return f"{series}\n{run}" if self.several_runs else series

    def legend_handles(self, series: Iterable[str], markers: bool = False) -> list[Line2D]:
        """One entry per series shown (its colour), then one per run (its line style) when compared."""
        shown = set(series)
        handles = [
            Line2D([], [], color=self.colour(s), lw=0 if markers else 2, marker="o" if markers else None, label=s)
            for s in self.series
            if s in shown
        ]
        if self.several_runs:
            handles += [
                Line2D([], [], color="0.35", **self.run_style(run), lw=0 if markers else 1.5, label=f"run: {run}")
                for run in self.runs
            ]
        return handles


@dataclass(frozen=True)
class MemoryUnit:
    """A binary unit for a set of byte counts: the largest that their maximum is at least one of."""

    name: str
    size: int

    @classmethod
    def of(cls, values: Iterable[float | None]) -> MemoryUnit:
        present = [abs(v) for v in values if v is not None and not math.isnan(v)]
        name, size = byte_unit(max(present, default=0))
        return cls(name, size)

    @overload
    def __call__(self, value: float) -> float: ...

    @overload
    def __call__(self, value: pd.Series) -> pd.Series: ...

    def __call__(self, value: float | pd.Series) -> float | pd.Series:
        return value / self.size
