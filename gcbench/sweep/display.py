"""What a person watching a sweep sees: a progress bar, then a table per strategy."""

from __future__ import annotations

from collections.abc import Iterable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from gcbench.results.records import Point, Record
from gcbench.results.units import format_bytes
from gcbench.sweep.runner import SweepEvents

STATUS_STYLE = {"ok": "green", "oom": "red", "error": "bold red", "timeout": "yellow", "skipped": "dim"}


def progress_events(progress: Progress) -> SweepEvents:
    task = progress.add_task("starting", total=None)

    def start(total: int, done: int) -> None:
        progress.update(task, total=total, completed=done, description=f"{done} kept from earlier run" if done else "")

    def point(p: Point, round: int) -> None:
        progress.update(task, description=p.id + (f" (round {round})" if round > 1 else ""))

    def record(r: Record) -> None:
        progress.advance(task)
        if r.status != "ok":
            progress.console.print(f"[{STATUS_STYLE[r.status]}]{r.status}[/]: {r.point.id}: {r.reason}")

    return SweepEvents(start, point, record)


def make_progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}", style="cyan"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
    )


def quiet_events(console: Console) -> SweepEvents:
    """One plain line per finished point, for CI logs."""

    def record(r: Record) -> None:
        round = f" (round {r.round})" if r.round > 1 else ""
        console.print(f"{r.status:8} {r.point.id}{round} {point_summary(r)}", highlight=False, markup=False)

    return SweepEvents(on_record=record)


def point_summary(r: Record) -> str:
    peak = format_bytes(r.memory.peak_bytes) if r.memory else "-"
    speed = f"{r.time.examples_per_s:.1f} ex/s" if r.time else "-"
    return f"peak {peak}, {speed}" + (f" ({r.reason})" if r.reason else "")


def summary_tables(records: Iterable[Record]) -> list[Table]:
    """A table per strategy (records with their rounds merged), then what made times noisy."""
    by_strategy: dict[str, list[Record]] = {}
    for r in records:
        by_strategy.setdefault(r.point.strategy, []).append(r)
    tables = []
    noisy: list[str] = []
    for strategy, rows in by_strategy.items():
        table = Table(title=strategy, title_justify="left")
        columns = ("batch", "chunks", "peak memory", "step time (95% CI)", "examples/s", "vs full (95% CI)")
        for column in (*columns, "grad rel err", "status"):
            table.add_column(column, justify="right" if column not in ("status",) else "left")
        for r in sorted(rows, key=lambda r: (r.point.chunk_sizes or (), r.point.batch_size)):
            eq = r.equivalence
            error = (
                f"{eq.max_rel_err:.1e}"
                if eq and eq.max_rel_err is not None
                else ("ref" if eq and eq.reference == "self" else "n/a")
            )
            reasons = [*(r.time.noise if r.time else ()), *(r.paired.noise if r.paired else ())]
            reasons += [r.env.oversubscribed] if r.env is not None and r.env.oversubscribed else []
            if reasons:
                noisy.append(f"{r.point.id}: {'; '.join(reasons)}")
            table.add_row(
                str(r.point.batch_size),
                r.point.chunk_label,
                format_bytes(r.memory.peak_bytes) if r.memory else "-",
                step_time(r),
                f"{r.time.examples_per_s:.1f}" if r.time else "-",
                f"{r.paired.ratio:.2f} ({r.paired.low:.2f}-{r.paired.high:.2f})" if r.paired else "-",
                error,
                f"[{STATUS_STYLE[r.status]}]{r.status}[/]" + (" [yellow]noisy[/]" if reasons else ""),
            )
        tables.append(table)
    loads = [r.time.load_average_1m for rows in by_strategy.values() for r in rows if r.time and r.time.load_average_1m]
    if noisy:
        notes = Table(title="noisy times (read them as rough)", title_justify="left", show_header=False)
        notes.add_column("point and why")
        for line in noisy:
            notes.add_row(line)
        if loads:
            notes.add_row(f"load average while timing: {min(loads):.1f} to {max(loads):.1f}")
        tables.append(notes)
    return tables


def step_time(r: Record) -> str:
    """``12.3 ms (11.9-12.8)``: the median and its 95% interval (records without one: the median alone)."""
    if r.time is None:
        return "-"
    t = r.time
    interval = f" ({t.low_s * 1e3:.1f}-{t.high_s * 1e3:.1f})" if t.low_s is not None and t.high_s is not None else ""
    return f"{t.median_s * 1e3:.1f} ms{interval}"
