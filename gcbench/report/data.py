"""Every run's points in one frame, with what figures, tables and the headline all ask of it.

One row per (run, point): a point recorded more than once in a run (a concatenated results file, a
repeated sweep) is merged into the median of its numbers, with the number of runs in ``runs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from gcbench.errors import UsageError
from gcbench.report.load import Run
from gcbench.report.style import Look
from gcbench.results.records import OVER_BUDGET
from gcbench.results.table import records_frame
from gcbench.strategies import Full


@dataclass(frozen=True)
class ReportData:
    runs: tuple[Run, ...]
    points: pd.DataFrame  # one row per run and point, ordered by run, series, batch
    look: Look
    budget: int | None  # bytes

    @classmethod
    def of(cls, runs: Sequence[Run], budget: int | None = None) -> ReportData:
        references = {r.point.strategy for run in runs for r in run.records if r.traits and r.traits.reference}
        look = Look.of((r.point for run in runs for r in run.records), [run.label for run in runs], references)
        frames = [records_frame(run.records).assign(run=run.label) for run in runs]
        points = _merge_repeats(pd.concat(frames, ignore_index=True))
        for trait in ("is_reference", "is_caches_representations", "is_exact", "is_uses_chunks"):
            points[trait] = points[trait].eq(True)  # a strategy whose traits are unknown has none of them
        # Distributed points must fit on every rank: their peak is the largest rank's.
        points["peak"] = points["rank_peak_max_bytes"].fillna(points["peak_bytes"])
        # Examples/s at the ends of the step time's 95% interval, or (records without one) at its quartiles.
        points["has_interval"] = points["time_low_s"].notna()
        low = points["time_low_s"].fillna(points["time_q1_s"])
        high = points["time_high_s"].fillna(points["time_q3_s"])
        points["examples_per_s_fast"] = points["examples_per_s"] * points["time_median_s"] / low
        points["examples_per_s_slow"] = points["examples_per_s"] * points["time_median_s"] / high
        points["prediction_error"] = points["predicted_peak_bytes"] / points["peak"] - 1
        ok = points["status"] == "ok"
        points["fits"] = ok & (True if budget is None else ~(points["peak"] > budget))
        points["over"] = (points["status"] == "oom") | (ok & ~points["fits"])
        # One word for what happened, used everywhere: a threshold passed is not an allocator's refusal.
        threshold = points["reason"].map(lambda reason: isinstance(reason, str) and OVER_BUDGET in reason)
        points["outcome"] = points["status"].mask(points["over"] & (ok | threshold), "over the budget")
        points["outcome"] = points["outcome"].mask((points["status"] == "oom") & ~threshold, "out of memory")
        order = points.assign(_run=points["run"].map(look.runs.index), _series=points["series"].map(look.series.index))
        points = points.loc[order.sort_values(["_run", "_series", "batch_size"], kind="stable").index]
        return cls(tuple(runs), points.reset_index(drop=True), look, budget)

    @property
    def repeated(self) -> bool:
        return bool((self.points["runs"] > 1).any())

    @property
    def distributed(self) -> bool:
        return bool((self.points["world_size"] > 1).any())

    @property
    def predicted(self) -> bool:
        return bool(self.points["predicted_peak_bytes"].notna().any())

    def largest_fits(self) -> pd.DataFrame:
        """Per run and series, the point at the largest batch that ran ok (within the budget, if any)."""
        fits = self.points[self.points["fits"]]
        return fits.loc[fits.groupby(["run", "series"], sort=False)["batch_size"].idxmax()]

    def reference(self, run: str) -> pd.DataFrame:
        """The points of a run's reference strategy (``full``), which the others are measured against."""
        return self.points[(self.points["run"] == run) & self.points["is_reference"]]

    def reference_name(self) -> str:
        """The reference strategy's name, as the records call it."""
        names = self.points.loc[self.points["is_reference"], "strategy"]
        return str(names.iloc[0]) if not names.empty else Full.name  # the built-in reference

    def caching(self, run: str) -> pd.DataFrame:
        """The points of a run's exact gradient-caching strategies (GradCache, its variants, a peer's cached loss)."""
        rows = self.points[self.points["run"] == run]
        return rows[rows["is_caches_representations"] & rows["is_exact"] & rows["is_uses_chunks"]]

    @property
    def intervals(self) -> bool:
        """Whether any point's time has an interval (records made before rounds have none)."""
        return bool(self.points["has_interval"].any())

    def caching_cost(self) -> pd.DataFrame:
        """Caching points with a full point at the same batch (both ok and within the budget), with
        ``time_ratio`` = their step time over full's: the paired ratio with its interval (``ratio_low``,
        ``ratio_high``) where the two were timed in turns, else the ratio of their medians (``paired`` False,
        no interval)."""
        pairs = []
        for run in self.look.runs:
            full = self.reference(run)
            full = full.loc[full["fits"] & full["time_median_s"].notna(), ["batch_size", "strategy", "time_median_s"]]
            caching = self.caching(run)
            caching = caching[caching["fits"] & caching["time_median_s"].notna()]  # within the budget, as elsewhere
            pairs.append(caching.merge(full, on="batch_size", suffixes=("", "_full")))
        ratios = pd.concat(pairs, ignore_index=True)
        paired = ratios["paired_ratio"].notna() & (ratios["paired_reference"] == ratios["strategy_full"])
        unpaired = ratios["time_median_s"] / ratios["time_median_s_full"]
        return ratios.assign(
            paired=paired,
            time_ratio=ratios["paired_ratio"].where(paired, unpaired),
            ratio_low=ratios["paired_low"].where(paired),
            ratio_high=ratios["paired_high"].where(paired),
        )

    def breakdown_batch(self, requested: int | None) -> int | None:
        """The batch for the breakdown: the one asked for, else the largest at which ``full`` ran ok,
        else the largest at which anything did; None if nothing ran ok."""
        ok = self.points[self.points["status"] == "ok"]
        if requested is not None:
            return _asked_batch(ok, requested, "breakdown batch", "no point ran ok at that batch")
        full = ok[ok["is_reference"]]
        chosen = full if not full.empty else ok
        return None if chosen.empty else int(chosen["batch_size"].max())

    def pareto_batch(self, requested: int | None) -> int | None:
        """The batch of the Pareto figure: the one asked for, else the largest at which one run has at
        least ``PARETO_SETTINGS`` settings with both a peak and a time, the reference among them if any
        batch has it; None when no batch has that many."""
        timed = self._timed()
        if requested is not None:
            return _asked_batch(timed, requested, "pareto batch", "no point ran ok with a time at that batch")
        counts = timed.groupby(["run", "batch_size"])["series"].nunique()
        enough = counts[counts >= PARETO_SETTINGS]
        if enough.empty:
            return None
        # Where the reference ran too, the frontier spans the whole trade, from least memory to full's speed.
        with_reference = timed[timed["is_reference"]].set_index(["run", "batch_size"]).index
        spanning = enough[enough.index.isin(with_reference)]
        return int((spanning if not spanning.empty else enough).index.get_level_values("batch_size").max())

    def pareto(self, batch: int) -> pd.DataFrame:
        """The settings measured at ``batch`` (every run's), with ``on_frontier``: exact, and not dominated
        by another exact setting of their run in both peak memory and median step time (an inexact one,
        such as gradient accumulation, is shown but buys its speed with other gradients)."""
        rows = self._timed()
        rows = rows[rows["batch_size"] == batch].copy()
        rows["on_frontier"] = False
        for _, group in rows[rows["is_exact"]].groupby("run", sort=False):
            rows.loc[group.index, "on_frontier"] = pareto_frontier(group["peak"], group["time_median_s"])
        return rows

    def _timed(self) -> pd.DataFrame:
        """Points that ran ok with both a peak and a step time: what a time-against-memory plot can show."""
        points = self.points
        return points[(points["status"] == "ok") & points["peak"].notna() & points["time_median_s"].notna()]


def _asked_batch(points: pd.DataFrame, requested: int, what: str, problem: str) -> int:
    """``requested`` if ``points`` has it, else a UsageError naming the batches it has."""
    if requested not in set(points["batch_size"]):
        ran = ", ".join(map(str, sorted(set(points["batch_size"])))) or "none"
        raise UsageError(f"{what} {requested}: {problem} (batches that did: {ran})")
    return requested


PARETO_SETTINGS = 3  # settings at one batch for a Pareto figure by default: fewer make no trade-off to show


def pareto_frontier(memory: Sequence[float] | pd.Series, time: Sequence[float] | pd.Series) -> np.ndarray:
    """Which points no other point dominates: none has both at most their memory and at most their
    time, with one of the two strictly less. Points equal in both are all on the frontier."""
    m, t = np.asarray(memory, dtype=float), np.asarray(time, dtype=float)
    no_worse = (m[None, :] <= m[:, None]) & (t[None, :] <= t[:, None])  # [i, j]: j is no worse than i
    better = (m[None, :] < m[:, None]) | (t[None, :] < t[:, None])
    return ~np.asarray((no_worse & better).any(axis=1), dtype=bool)


def status_counts(statuses: pd.Series) -> str:
    """``"2 error, 1 timeout"``: what happened at points that did not run ok."""
    return ", ".join(f"{count} {status}" for status, count in statuses.value_counts().items())


def _merge_repeats(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, point): the median of each number over the runs with the most common status."""
    # Columns no record filled (None throughout) become numbers too: NaN, the same as a missing number.
    frame = frame.apply(lambda column: column.astype(float) if column.isna().all() else column)
    numbers = frame.select_dtypes("number").columns
    rows = []
    for _, group in frame.groupby(["run", "point"], sort=False):
        status = group["status"].value_counts().index[0]
        chosen = group[group["status"] == status]
        row = chosen.iloc[0].copy()
        row[numbers] = chosen[numbers].median()
        row["runs"] = len(group)
        if len(chosen) < len(group):
            others = status_counts(group.loc[group["status"] != status, "status"])
            said = f"{len(chosen)} of {len(group)} runs {status}, others {others}"
            row["reason"] = f"{said}; {row['reason']}" if isinstance(row["reason"], str) else said
        rows.append(row)
    merged = pd.DataFrame(rows).reset_index(drop=True).infer_objects()
    return merged.astype({"batch_size": int, "world_size": int})
