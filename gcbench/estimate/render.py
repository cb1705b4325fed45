"""An estimate plan as rich tables, JSON or CSV."""

from __future__ import annotations

import io
import json
from typing import Any

import pandas as pd
from rich.table import Table

from gcbench.estimate.plan import EstimatePlan, EstimateRow
from gcbench.results.units import byte_unit, format_bytes


def plan_frame(plan: EstimatePlan) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "strategy": r.point.strategy,
                "batch_size": r.point.batch_size,
                "chunk_sizes": r.point.chunk_label,
                "series": r.point.series,
                "target": plan.target,
                "peak_bytes": r.prediction.peak_bytes if r.prediction else None,
                "loss_peak_bytes": r.prediction.loss_peak_bytes if r.prediction else None,
                **{
                    f"fits_{format_bytes(m).replace(' ', '')}": (r.prediction.peak <= m) if r.prediction else None
                    for m in plan.device_memories
                },
                **({f"memory_{k}": v for k, v in r.prediction.peak_breakdown.items()} if r.prediction else {}),
                "seconds": r.prediction.seconds if r.prediction else None,
                "error": r.error,
            }
            for r in plan.rows
        ]
    )


def plan_dict(plan: EstimatePlan) -> dict[str, Any]:
    return {
        "experiment": plan.experiment,
        "target": plan.target,
        "world_size": plan.world_size,
        "device_memories": list(plan.device_memories),
        "predictions": plan_frame(plan).to_dict(orient="records"),
        "largest_batch": {s: {str(m): plan.largest_batch(s, m) for m in plan.device_memories} for s in plan.series()},
        "stopped_at": {
            s: {str(m): (row.point.batch_size if (row := plan.stopper(s, m)) else None) for m in plan.device_memories}
            for s in plan.series()
        },
        "chunk_advice": [
            {
                "strategy": a.strategy,
                "batch_size": a.batch_size,
                "device_memory": a.device_memory,
                "chunk_sizes": list(a.chunk_sizes) if a.chunk_sizes else None,
                "peak_bytes": a.peak_bytes,
                "reason": a.reason,
                "tried": [[list(c), p] for c, p in a.tried],
            }
            for a in plan.advice
        ],
    }


def render(plan: EstimatePlan, fmt: str) -> str | list[Table]:
    if fmt == "json":
        return json.dumps(plan_dict(plan), indent=2)
    if fmt == "csv":
        buffer = io.StringIO()
        plan_frame(plan).to_csv(buffer, index=False)
        return buffer.getvalue()
    return tables(plan)


def tables(plan: EstimatePlan) -> list[Table]:
    memories = plan.device_memories
    batches = sorted({r.point.batch_size for r in plan.rows})
    unit, size = byte_unit(max((r.prediction.peak for r in plan.rows if r.prediction), default=1))
    fits = f"green: fits {format_bytes(min(memories))}" + (
        f", yellow: fits {format_bytes(max(memories))}" if len(memories) > 1 else ""
    )
    where = f"each of {plan.world_size} ranks ({plan.target}), global batch" if plan.world_size > 1 else plan.target
    peaks = Table(
        title=f"{plan.experiment}: predicted peak memory of a training step on {where}, in {unit} "
        f"({fits}, red: fits none)",
        title_justify="left",
    )
    peaks.add_column("strategy")
    for batch in batches:
        peaks.add_column(str(batch), justify="right")
    for series in plan.series():
        cells = {r.point.batch_size: r for r in plan.rows if r.point.series == series}
        peaks.add_row(series, *(_cell(cells.get(b), memories, size) for b in batches))
    largest = Table(title="largest batch that fits (every smaller batch fitting too)", title_justify="left")
    largest.add_column("strategy")
    for memory in memories:
        largest.add_column(format_bytes(memory), justify="right")
    for series in plan.series():
        largest.add_row(series, *(str(plan.largest_batch(series, m) or "none") for m in memories))
    result = [peaks, largest]
    losses = [r.prediction.loss_peak_bytes for r in plan.rows if r.prediction and r.prediction.loss_peak_bytes]
    if losses:
        result.append(_loss_table(plan, batches, losses))
    stops = [(series, m, plan.stopper(series, m)) for series in plan.series() for m in memories]
    if any(row is not None for _, _, row in stops):
        result.append(_stop_table(stops))
    if plan.advice:
        advice = Table(
            title=f"recommended chunk sizes ({plan.advice[0].strategy}, batch {plan.advice[0].batch_size})",
            title_justify="left",
        )
        for column in ("device memory", "chunk sizes", "predicted peak", "why"):
            advice.add_column(column)
        for a in plan.advice:
            advice.add_row(
                format_bytes(a.device_memory),
                "/".join(map(str, a.chunk_sizes)) if a.chunk_sizes else "-",
                format_bytes(a.peak_bytes),
                a.reason,
            )
        result.append(advice)
    errors = [r for r in plan.rows if r.error]
    if errors:
        failed = Table(title="points that cannot be predicted", title_justify="left")
        failed.add_column("point")
        failed.add_column("why")
        for r in errors:
            failed.add_row(r.point.id, r.error)
        result.append(failed)
    return result


def _loss_table(plan: EstimatePlan, batches: list[int], losses: list[int]) -> Table:
    unit, size = byte_unit(max(losses))
    table = Table(
        title=f"the loss's own peak, forward and backward, above the representations, in {unit}",
        title_justify="left",
    )
    table.add_column("strategy")
    for batch in batches:
        table.add_column(str(batch), justify="right")
    for series in plan.series():
        cells = {r.point.batch_size: r.prediction for r in plan.rows if r.point.series == series}
        table.add_row(
            series,
            *(
                f"{p.loss_peak_bytes / size:.2f}" if p is not None and p.loss_peak_bytes is not None else ""
                for p in (cells.get(b) for b in batches)
            ),
        )
    return table


def _stop_table(stops: list[tuple[str, int, EstimateRow | None]]) -> Table:
    """Per series and memory, the first batch over it and what its peak is made of."""
    table = Table(title="what stops each series: the first batch that does not fit", title_justify="left")
    for column in ("strategy", "device memory", "batch", "peak", "of which the loss", "largest part at the peak"):
        table.add_column(column)
    for series, memory, row in stops:
        if row is None or row.prediction is None:
            continue
        p = row.prediction
        part, held = max(p.peak_breakdown.items(), key=lambda item: item[1])
        table.add_row(
            series,
            format_bytes(memory),
            str(row.point.batch_size),
            format_bytes(p.peak),
            format_bytes(p.loss_peak_bytes) if p.loss_peak_bytes is not None else "-",
            f"{part} {format_bytes(held)}",
        )
    return table


def _cell(row: EstimateRow | None, memories: tuple[int, ...], unit_size: int) -> str:
    if row is None:
        return ""
    if row.prediction is None:
        return "[red]n/a[/]"
    peak = row.prediction.peak
    style = "green" if peak <= min(memories) else "yellow" if peak <= max(memories) else "red"
    return f"[{style}]{peak / unit_size:.2f}[/]"
