"""Three sentences a reader takes away, computed from the data: how far full got, what caching
saved in memory, and what it cost in step time. Each has wording for when it does not apply."""

from __future__ import annotations

import pandas as pd

from gcbench.report.data import ReportData, status_counts
from gcbench.results.units import format_bytes


def headline(data: ReportData) -> list[str]:
    """Three lines per run, each prefixed by the run's label when runs are compared."""
    lines = []
    ratios = data.caching_cost()
    reference = data.reference_name()
    for run in data.look.runs:
        prefix = f"{run}: " if data.look.several_runs else ""
        full, caching = data.reference(run), data.caching(run)
        lines += [
            prefix + _full_line(full, data.budget, reference),
            prefix + _memory_line(caching, full, data.budget, reference),
            prefix + _cost_line(ratios[ratios["run"] == run], reference),
        ]
    return lines


def _full_line(full: pd.DataFrame, budget: int | None, reference: str) -> str:
    if full.empty:
        return f"no `{reference}` points: nothing to compare the other strategies against."
    within = f" (budget {format_bytes(budget)})" if budget is not None else ""
    fits, over = full[full["fits"]], full[full["over"]]
    largest = None if fits.empty else fits.loc[fits["batch_size"].idxmax()]
    ran = "" if largest is None else f"its largest batch was {largest['batch_size']} at {_peak(largest)}"
    if not over.empty:
        first = over.loc[over["batch_size"].idxmin()]
        if first["outcome"] == "out of memory":  # the allocator refused it (CUDA under its cap, or the host)
            failed = f"{reference} ran out of memory at batch {first['batch_size']}{within}"
        else:  # a threshold passed: on CPU nothing refuses the memory
            limit = f"the {format_bytes(budget)} budget" if budget is not None else "its memory budget"
            peak = _peak(first) if pd.notna(first["peak"]) else "peak unknown"
            failed = f"{reference} went over {limit} at batch {first['batch_size']} ({peak})"
        return f"{failed}; " + (ran or "no batch fit") + "."
    if largest is not None:
        return (
            f"{reference}'s largest batch was {largest['batch_size']} at {_peak(largest)}{within}"
            f"{', the largest tried' if largest['batch_size'] == full['batch_size'].max() else ''}."
        )
    return f"{reference} ran ok at no batch ({status_counts(full['status'])})."


def _memory_line(caching: pd.DataFrame, full: pd.DataFrame, budget: int | None, reference: str) -> str:
    if caching.empty:
        return "no caching points: nothing to say about the memory caching saves."
    fits = caching[caching["fits"]]
    if fits.empty:
        verb = "ran ok at" if budget is None else "fit"
        return f"caching {verb} no batch ({status_counts(caching['status'])})."
    top = fits[fits["batch_size"] == fits["batch_size"].max()]
    best = top.loc[top["peak"].idxmin()]
    said = f"{best['series']} ran batch {best['batch_size']} in {_peak(best)}"
    both = fits[fits["series"] == best["series"]].merge(full[full["fits"]], on="batch_size", suffixes=("", "_full"))
    if both.empty:
        return said + f"; {reference} fit no batch it ran, nothing to compare."
    at = both.loc[both["batch_size"].idxmax()]
    ratio = at["peak_full"] / at["peak"]
    where = "both ran" if budget is None else "where both fit"
    if abs(ratio - 1) < 0.05:
        versus = "about as much as"
    else:
        versus = f"{ratio:.1f}× less than" if ratio > 1 else f"{1 / ratio:.1f}× more than"
    return (
        said + f"; at batch {at['batch_size']}, the largest {where}, it needed {versus} {reference} "
        f"({format_bytes(at['peak'])} against {format_bytes(at['peak_full'])})."
    )


def _cost_line(ratios: pd.DataFrame, reference: str) -> str:
    """What caching cost at the largest batch both ran, with its 95% interval where the two were timed in
    turns; results without one (made before paired timing) say the bare ratio of medians, as they did."""
    if ratios.empty:
        return f"step time: no batch where both a caching strategy and {reference} ran ok, nothing to compare."
    top = ratios[ratios["batch_size"] == ratios["batch_size"].max()]
    cheapest = top.loc[top["time_ratio"].idxmin()]
    change = cheapest["time_ratio"] - 1
    verb = "cost" if change >= 0 else "saved"
    which = f"{cheapest['series']}, the cheapest setting there" if len(top) > 1 else cheapest["series"]
    if not cheapest["paired"]:
        return (
            f"caching {verb} {abs(change):.0%} step time against {reference} at batch {cheapest['batch_size']} "
            f"({which})."
        )
    rounds = int(cheapest["time_rounds"]) if pd.notna(cheapest["time_rounds"]) else 1
    wall, wall_interval = _cost(cheapest["time_ratio"], cheapest["ratio_low"], cheapest["ratio_high"])
    where = (
        f"against {reference} at batch {cheapest['batch_size']} ({which}; timed in turns with {reference}, "
        f"{rounds} round{'s' if rounds != 1 else ''})"
    )
    has_cpu = pd.notna(cheapest.get("paired_cpu_ratio"))
    if has_cpu:
        cpu, cpu_interval = _cost(cheapest["paired_cpu_ratio"], cheapest["paired_cpu_low"], cheapest["paired_cpu_high"])
    one_thread = cheapest.get("torch_threads") == 1 and str(cheapest.get("device", "")).startswith("cpu")
    if has_cpu and one_thread:
        # One torch thread on a CPU: the process's CPU time leaves out the seconds it waited for a core on a
        # shared machine, so it is the steadier figure; the wall time, what a run waits for, follows it.
        line = (
            f"caching {cpu} step time by process CPU time ({cpu_interval}) {where}; by wall time {wall} "
            f"({wall_interval}). The headline takes the CPU time: with one torch thread it leaves out time spent "
            "waiting for a core."
        )
    else:
        line = f"caching {wall} step time ({wall_interval}) {where}."
        if has_cpu:
            line += f" By process CPU time: {cpu} ({cpu_interval})."
    if isinstance(cheapest["noise"], str):
        line += f" Noisy: {cheapest['noise']}."
    return line


def _cost(ratio: float, low: float, high: float) -> tuple[str, str]:
    """``("cost 55%", "95% CI 45% to 71%")``: the interval of the quantity named, the cost or the saving."""
    change = ratio - 1
    verb = "cost" if change >= 0 else "saved"
    low, high = low - 1, high - 1
    low, high = (low, high) if change >= 0 else (-high, -low)
    return f"{verb} {abs(change):.0%}", f"95% CI {low:.0%} to {high:.0%}"


def _peak(point: pd.Series) -> str:
    ranks = point["world_size"]
    return format_bytes(point["peak"]) + (f" (the largest of {ranks} ranks)" if ranks > 1 else "")
