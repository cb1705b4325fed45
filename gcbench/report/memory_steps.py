"""The report's figure of memory over many steps (``sweep.steps``): one line per point, step by step.

Left: the allocated peak of each step (solid), and on CUDA the reserved peak (dashed): the gap between
them is fragmentation, which grows as lengths change from step to step. Right: on CPU the growth of the
process's resident set since the first step; on CUDA the fragmentation itself.
"""

from __future__ import annotations

from matplotlib.figure import Figure

from gcbench.report.data import ReportData
from gcbench.report.style import MemoryUnit
from gcbench.results.records import Record, StepsResult

WIDTH_IN, DPI = 6.4, 125
CAPTION = (
    "Memory over many steps of one point each (sweep.steps), every step on a new batch with its lengths drawn "
    "anew. Left: the allocated peak of each step, and on CUDA the caching allocator's reserved peak (dashed); "
    "right: on CPU the growth of the process's resident set since step 1, on CUDA reserved minus allocated "
    "(fragmentation). One line per series, at the largest batch that measured its steps."
)


def stepped(data: ReportData) -> list[tuple[str, str | None, StepsResult]]:
    """Per run and series, (label, colour, steps) of the record at the largest batch that measured its steps."""
    chosen: dict[tuple[str, str], Record] = {}
    for run in data.runs:
        for record in run.records:
            if record.status != "ok" or record.memory is None or record.memory.steps is None:
                continue
            key = (run.label, record.point.series)
            if key not in chosen or record.point.batch_size > chosen[key].point.batch_size:
                chosen[key] = record
    several = len(data.runs) > 1
    lines = []
    for (run_label, series), record in chosen.items():
        assert record.memory is not None and record.memory.steps is not None
        label = f"{series}, batch {record.point.batch_size}" + (f" [{run_label}]" if several else "")
        lines.append((label, data.look.colours.get(series), record.memory.steps))
    return lines


def steps_figure(data: ReportData) -> Figure | None:
    lines = stepped(data)
    if not lines:
        return None
    fig = Figure(figsize=(WIDTH_IN, 4.2), dpi=DPI, layout="constrained")
    left, right = fig.subplots(1, 2)
    count = max(len(steps.allocated_peak_bytes) for _, _, steps in lines)
    left.set_title(f"Memory over {count} steps, new lengths each", loc="left", fontsize="medium", fontweight="bold")
    cuda = any(steps.reserved_peak_bytes for _, _, steps in lines)
    growths = {
        label: list(steps.fragmentation_bytes) if cuda else [v - steps.resident_bytes[0] for v in steps.resident_bytes]
        for label, _, steps in lines
    }
    unit = MemoryUnit.of(v for _, _, s in lines for v in (*s.allocated_peak_bytes, *s.reserved_peak_bytes))
    growth_unit = MemoryUnit.of(v for values in growths.values() for v in values)
    for label, colour, steps in lines:
        x = range(1, len(steps.allocated_peak_bytes) + 1)
        left.plot(x, [unit(v) for v in steps.allocated_peak_bytes], marker="o", ms=3, color=colour, label=label)
        if steps.reserved_peak_bytes:
            left.plot(x, [unit(v) for v in steps.reserved_peak_bytes], linestyle="--", color=colour)
        growth = growths[label]
        right.plot(range(1, len(growth) + 1), [growth_unit(v) for v in growth], marker="o", ms=3, color=colour)
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    left.set_ylabel(f"peak ({unit.name})")
    right.set_ylabel(f"{'reserved - allocated' if cuda else 'resident set growth'} ({growth_unit.name})")
    fig.legend(loc="outside lower center", ncols=2, fontsize="small")
    return fig
