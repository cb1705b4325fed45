"""torch.compile'd encoders under GradCache: how many graphs each step compiles, why, and whether it is exact.

Two towers (Linear 6-16, dropout, tanh, Linear 16-5), queries in chunks of 4 and passages (two per query)
in chunks of 8, each tower compiled on its own. Per setting (``keep_graphs`` 0, 1, ``"all"``; a batch of 12
queries, which splits evenly, or 14, whose last chunk is shorter) three steps are run with dynamo's
``eager`` backend (capture only: the counts are dynamo's, whatever the backend) and each step's new
graphs and guard failures are recorded (:func:`gcbench.measure.compilation.count_compilations`). Then the
gradients of one cached step on compiled towers against the eager full batch (float64, dropout 0.2), with
``aot_eager`` and with ``inductor`` (a C compiler needed) with and without ``fallback_random``.

    .venv/bin/python experiments/compile-recompiles.py --out reports/compile/report.md
"""

from __future__ import annotations

import argparse
import json
import platform
import re
from pathlib import Path

import torch
from torch import nn

from gcbench import GradCache
from gcbench.losses import InBatchSoftmax
from gcbench.measure.compilation import count_compilations
from gcbench.testing import assert_step_exact

CHUNKS = [4, 8]


def towers(dropout: float, dtype: torch.dtype) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(6, 16), nn.Dropout(dropout), nn.Tanh(), nn.Linear(16, 5)).to(dtype) for _ in "qp"]


def batches(size: int, dtype: torch.dtype) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [
        torch.randn(size, 6, generator=generator).to(dtype),
        torch.randn(2 * size, 6, generator=generator).to(dtype),
    ]


def kind_of(reason: str) -> str:
    """A guard failure in a few words."""
    if "grad_mode" in reason:
        return "grad mode switch (no-grad first pass, then grad)"
    match = re.search(r"size mismatch at index 0\. expected (\d+), actual (\d+)", reason)
    if match:
        return f"batch dimension {match.group(1)} -> {match.group(2)}"
    if "storage_offset" in reason:
        return "a chunk's offset into the batch"
    return reason.split(": ", 1)[-1][:80]


def recompilations() -> list[dict]:
    rows = []
    for keep, size in [(0, 12), (0, 14), (1, 14), ("all", 14)]:
        torch._dynamo.reset()
        encoders = [torch.compile(t, backend="eager") for t in towers(0.1, torch.float32)]
        engine = GradCache(encoders, InBatchSoftmax(), CHUNKS, keep_graphs=keep)
        data = batches(size, torch.float32)
        for s in count_compilations(lambda: engine(*data), steps=3):
            rows.append(
                {
                    "keep_graphs": keep,
                    "queries": size,
                    "step": s.step,
                    "graphs": s.graphs,
                    "reasons": [kind_of(r) for r in s.reasons],
                }
            )
    return rows


def exactness() -> list[dict]:
    rows = []
    for backend, fallback in [("aot_eager", None), ("inductor", True), ("inductor", False)]:
        torch._dynamo.reset()

        def step(encoders, loss_fn, step_batches):
            compiled = [torch.compile(e, backend=backend) for e in encoders]
            return GradCache(compiled, loss_fn, CHUNKS)(*step_batches)

        try:
            with torch._inductor.config.patch(fallback_random=bool(fallback)):
                report = assert_step_exact(
                    step, towers(0.2, torch.float64), InBatchSoftmax(), batches(10, torch.float64), chunk_size=CHUNKS
                )
            error, passed = report.comparison.max_rel_err, True
        except AssertionError as failure:
            error = float(re.search(r"max error (\S+)", str(failure)).group(1))
            passed = False
        rows.append({"backend": backend, "fallback_random": fallback, "max_rel_err": error, "exact": passed})
    return rows


def page(data: dict) -> str:
    lines = [
        "# torch.compile under GradCache: recompilations and exactness",
        "",
        f"Written by `experiments/compile-recompiles.py` (torch {data['torch']}, {data['machine']}). Two towers "
        "compiled on their own, queries in chunks of 4, passages (two per query) in chunks of 8; three steps.",
        "",
        "| keep_graphs | queries | step | graphs compiled | why (dynamo's guard failures) |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for r in data["recompilations"]:
        why = "; ".join(f"{k} x{r['reasons'].count(k)}" for k in dict.fromkeys(r["reasons"])) or "-"
        lines.append(f"| {r['keep_graphs']} | {r['queries']} | {r['step']} | {r['graphs']} | {why} |")
    lines += [
        "",
        "Gradients of one cached step on compiled towers against the eager full batch (float64, dropout 0.2):",
        "",
        "| backend | fallback_random | max relative error | exact (1e-10) |",
        "| --- | --- | ---: | --- |",
    ]
    for r in data["exactness"]:
        fallback = "-" if r["fallback_random"] is None else str(r["fallback_random"])
        lines.append(f"| {r['backend']} | {fallback} | {r['max_rel_err']:.2e} | {'yes' if r['exact'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the report's Markdown file (JSON beside it)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = {
        "torch": torch.__version__,
        "machine": f"{platform.machine()} CPU",
        "recompilations": recompilations(),
        "exactness": exactness(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    args.out.write_text(page(data))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
