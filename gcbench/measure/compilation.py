"""How often torch.compile compiles during GradCache steps, and why (its guards' failure reasons).

A compiled encoder under GradCache meets three things a plain training loop does not: the first pass runs
under ``no_grad`` and the second with grad (a guard on the grad mode), the last chunk may be shorter (a
guard on the shape, after which dynamo marks the batch dimension dynamic), and chunks are views into the
batch at other offsets. Each failed guard compiles another graph; a step after the first should compile
none. torch's own counters say so (``torch._dynamo.utils``: private, present in torch 2.4 to 2.13).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StepCompilations:
    """One step: the graphs torch.compile made during it and the guard failures that caused them."""

    step: int  # 1-based
    graphs: int
    reasons: tuple[str, ...]


def count_compilations(step: Callable[[], Any], steps: int = 3) -> list[StepCompilations]:
    """Run ``step`` ``steps`` times; what each compiled. Call ``torch._dynamo.reset()`` first for a fresh count."""
    from torch._dynamo.utils import counters, guard_failures

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    result = []
    for index in range(1, steps + 1):
        graphs = counters["stats"]["unique_graphs"]
        seen = {code: len(failures) for code, failures in guard_failures.items()}
        step()
        reasons = tuple(
            str(reason) for code, failures in guard_failures.items() for reason in failures[seen.get(code, 0) :]
        )
        result.append(StepCompilations(index, counters["stats"]["unique_graphs"] - graphs, reasons))
    return result
