"""How much step time each kept first-pass graph buys, and for how much memory: ``full`` against ``cache``
keeping 0 to 7 and all of its 8 chunks' graphs, 4 per input (``GradCache(keep_graphs=k)``).

The setting: two transformer towers (dpr with no hard negative: queries and passages both 64 tokens,
separate encoders), d=256, 4 layers, 4 heads, dropout off, batch 64, chunk 16, float32, CPU. Per setting:

- the peak memory of one step, each in a fresh process of its own (nothing another setting allocated
  is left in its allocator), above what the step starts from and absolute;
- the step time, every setting timed in turns in one process (``time_in_turns``; they share one model and
  optimizer, so they differ only in how the step runs), with its median ratio to ``full`` and the
  ratio's 95% interval;
- the gradients' largest relative error against the full batch's (float64, batch 16, chunk 4: still 4
  chunks), which must be rounding only.

The check: under a budget halfway between ``cache`` (keep 1)'s peak and ``full``'s, the fastest keep
setting that fits must take at most halfway between their step times (in units of full's, from the paired
ratios): keeping graphs must do at least as well as the straight line between the two.

    .venv/bin/python experiments/keep-graphs.py --out reports/keep-graphs/report.md
    .venv/bin/python experiments/keep-graphs.py --quick --out /tmp/keep-graphs/report.md   # seconds

Run the full size on an idle machine (check ``uptime``): other work moves the times more than a kept graph.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from gcbench.cache.engine import KeepGraphs
from gcbench.measure.equivalence import check_strategy
from gcbench.measure.memory import measure_step_memory
from gcbench.measure.stats import Estimate
from gcbench.measure.timing import RepeatPolicy, Turns, time_in_turns
from gcbench.report.tables import ReportTable
from gcbench.results import Point
from gcbench.results.environment import environment, git_commit
from gcbench.results.timing import time_result
from gcbench.training import StepConfig, TrainingStep, build_step, step_on
from gcbench.workloads import WorkloadConfig
from gcbench.workloads.config import ModelConfig

MiB = 2**20
FULL = "full"
WARMUP = 2  # steps before anything is measured: optimizer state, lazy initialisation


@dataclass(frozen=True)
class Size:
    """What differs between the real run and ``--quick``."""

    hidden: int
    layers: int
    heads: int
    length: int
    vocab: int
    batch: int
    chunk: int
    check_batch: int  # the float64 exactness check's
    check_chunk: int


SIZES = {  # hidden, layers, heads, length, vocab, batch, chunk; the check's batch and chunk (4 chunks each)
    "full size": Size(256, 4, 4, 64, 30522, 64, 16, 16, 4),
    "quick": Size(32, 1, 2, 16, 2000, 16, 4, 8, 2),
}


def workload(size: Size) -> WorkloadConfig:
    """Two separate towers, queries and passages alike: dpr with no hard negative."""
    model = ModelConfig(hidden=size.hidden, layers=size.layers, heads=size.heads, vocab=size.vocab, dropout=0.0)
    return WorkloadConfig(
        name="dpr", model=model, query_length=size.length, passage_length=size.length, hard_negatives=0, tied=False
    )


def keeps(size: Size) -> tuple[KeepGraphs, ...]:
    """Every count of kept graphs: the chunks of both inputs count (queries' and passages', 8 in all)."""
    chunks = 2 * -(-size.batch // size.chunk)
    return (*range(chunks), "all")


def settings(size: Size) -> dict[str, StepConfig]:
    """``full``, then ``cache`` at every keep, by series name (``cache (chunk 16, keep 1)``)."""
    base = StepConfig(workload(size), FULL, size.batch, precision="float32")
    configs = [base] + [replace(base, strategy="cache", chunk_sizes=(size.chunk,), keep_graphs=k) for k in keeps(size)]
    return {Point(c.strategy, c.batch_size, c.chunk_sizes, c.keep_graphs).series: c for c in configs}


def step_memory(config: StepConfig) -> dict[str, int]:
    """One setting's peak (run in a fresh process): warmed up, then one step under the profiler."""
    step = build_step(config, torch.device("cpu"))
    for _ in range(WARMUP):
        step()
    measured = measure_step_memory(step)
    return {key: getattr(measured, key) for key in ("baseline_bytes", "step_peak_bytes", "peak_bytes")}


def measure_memory(configs: dict[str, StepConfig], threads: int) -> dict[str, dict[str, int]]:
    """Each setting's peak in a process of its own, one after another (spawned: a clean allocator each)."""
    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(1, initializer=torch.set_num_threads, initargs=(threads,), maxtasksperchild=1) as pool:
        peaks = pool.map(step_memory, configs.values(), chunksize=1)
    return dict(zip(configs, peaks))


def measure_times(configs: dict[str, StepConfig], policy: RepeatPolicy) -> tuple[Turns, float]:
    """Every setting timed in turns in this process, on one model and optimizer; the highest load seen."""
    device = torch.device("cpu")
    first = build_step(configs[FULL], device)
    steps: dict[str, TrainingStep] = {
        name: first if name == FULL else step_on(first.workload, first.optimizer, config, device)
        for name, config in configs.items()
    }
    for step in steps.values():
        for _ in range(WARMUP):
            step()
    load = os.getloadavg()[0]
    turns = time_in_turns(steps, device, policy)  # full first: the ratios to it can end the timing
    return turns, max(load, os.getloadavg()[0])


def max_errors(size: Size) -> dict[str, float]:
    """Each keep setting's largest relative gradient error against the full batch (float64)."""
    config = workload(size)
    return {
        name: check_strategy(
            config, "cache", size.check_batch, (size.check_chunk,), precision="float64", keep_graphs=c.keep_graphs
        ).max_rel_err
        for name, c in settings(size).items()
        if c.strategy != FULL
    }


def check(peaks: dict[str, dict[str, int]], ratios: dict[str, Estimate], keep_one: str) -> dict[str, Any]:
    """The issue's check: the fastest keep setting within a budget halfway between keep 1's peak and full's
    takes at most halfway between their times (in units of full's step time)."""
    budget = (peaks[keep_one]["peak_bytes"] + peaks[FULL]["peak_bytes"]) / 2
    line = (ratios[keep_one].value + 1.0) / 2
    within = [name for name in ratios if name != FULL and peaks[name]["peak_bytes"] <= budget]
    if not within:  # keep 1 over full's peak: nothing to trade
        return {"budget_bytes": budget, "line_ratio": line, "best": None, "passes": False}
    best = min(within, key=lambda name: ratios[name].value)
    return {
        "budget_bytes": budget,
        "line_ratio": line,
        "best": best,
        "best_ratio": ratios[best].value,
        "best_high": ratios[best].high,
        "passes": ratios[best].value <= line,
    }


def check_line(result: dict[str, Any], keep_one: str, peaks: dict[str, dict[str, int]]) -> str:
    verdict = "PASS" if result["passes"] else "FAIL"
    if result["best"] is None:
        return f"check: {verdict}: no keep setting fits within {result['budget_bytes'] / MiB:,.1f} MiB."
    upper = "also" if result["best_high"] <= result["line_ratio"] else "not"
    return (
        f"check: {verdict}: within {result['budget_bytes'] / MiB:,.1f} MiB (halfway between {keep_one}'s peak "
        f"{peaks[keep_one]['peak_bytes'] / MiB:,.1f} MiB and full's {peaks[FULL]['peak_bytes'] / MiB:,.1f} MiB), the "
        f"fastest keep setting is {result['best']} at {result['best_ratio']:.3f}× full's step time; the straight "
        f"line between {keep_one} and full allows {result['line_ratio']:.3f}× (the upper end of its 95% interval, "
        f"{result['best_high']:.3f}×, is {upper} within it)."
    )


def report_table(
    configs: dict[str, StepConfig],
    peaks: dict[str, dict[str, int]],
    turns: Turns,
    errors: dict[str, float],
    load: float,
) -> ReportTable:
    rows = []
    for name in configs:
        step_time = turns.estimate(name)
        ratio = turns.estimate(name, FULL) if name != FULL else None
        noise = time_result([turns.samples_s[name]], configs[name].batch_size, load, os.cpu_count()).noise
        rows.append(
            {
                "setting": name,
                "peak above start (MiB)": peaks[name]["step_peak_bytes"] / MiB,
                "peak (MiB)": peaks[name]["peak_bytes"] / MiB,
                "median step (ms)": step_time.value * 1e3,
                "95% CI (ms)": f"{step_time.low * 1e3:,.1f} to {step_time.high * 1e3:,.1f}",
                "vs full": None if ratio is None else ratio.value,
                "vs full 95% CI": None if ratio is None else f"{ratio.low:.3f} to {ratio.high:.3f}",
                "max rel err (float64)": errors.get(name),
                "noise": "; ".join(noise) or None,
            }
        )
    formats = {
        "peak above start (MiB)": ",.1f",
        "peak (MiB)": ",.1f",
        "median step (ms)": ",.1f",
        "vs full": ".3f",
        "max rel err (float64)": ".1e",
    }
    return ReportTable("keep-graphs", "Kept graphs: memory, time, exactness", pd.DataFrame(rows), formats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path("reports/keep-graphs/report.md"), help="Markdown report; a .json beside it"
    )
    parser.add_argument("--quick", action="store_true", help="a tiny model at batch 16: seconds, for a test")
    parser.add_argument("--turns", type=int, default=10, help="timed turns at least (one call of every setting)")
    parser.add_argument("--max-time", type=float, default=60.0, help="seconds of timed calls, all settings together")
    parser.add_argument(
        "--threads", type=int, help="torch threads [default: torch's; --quick: 1, as a busy machine needs]"
    )
    args = parser.parse_args()
    name = "quick" if args.quick else "full size"
    size = SIZES[name]
    # Two threads on two cores that something else uses too wait on each other: steps 100 times slower.
    threads = args.threads or (1 if args.quick else torch.get_num_threads())
    torch.set_num_threads(threads)
    configs = settings(size)
    keep_one = next(n for n, c in configs.items() if c.keep_graphs == 1)
    started = time.strftime("%Y-%m-%d %H:%M")

    peaks = measure_memory(configs, threads)
    policy = RepeatPolicy(min_repeats=args.turns, max_repeats=max(args.turns, 10_000), max_time_s=args.max_time)
    turns, load = measure_times(configs, policy)
    errors = max_errors(size)
    ratios = {n: turns.estimate(n, FULL) for n in configs}
    result = check(peaks, ratios, keep_one)

    table = report_table(configs, peaks, turns, errors, load)
    header = (
        f"# Kept first-pass graphs ({name})\n\n"
        f"Two transformer towers (dpr, no hard negative), d={size.hidden}, layers {size.layers}, heads {size.heads}, "
        f"sequences of {size.length}, dropout off, batch {size.batch}, chunk {size.chunk} ({size.batch // size.chunk} "
        f"chunks per input), float32, CPU, torch threads: {threads}. Peaks: each setting in a fresh process. "
        f"Times: all settings in turns in one process, {turns.turns} turns; 1-minute load average up to "
        f"{load:.2f} on {os.cpu_count()} cores; {started}. Errors: float64, batch {size.check_batch}, chunk "
        f"{size.check_chunk}."
    )
    text = "\n\n".join([header, table.markdown(), check_line(result, keep_one, peaks)]) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    raw = {
        "size": name,
        "setting": asdict(size),
        "keep_graphs": {n: c.keep_graphs for n, c in configs.items()},
        "memory": peaks,
        "samples_s": turns.samples_s,
        "ratios_to_full": {n: asdict(e) for n, e in ratios.items()},
        "max_rel_err": errors,
        "check": result,
        "load_average_1m": load,
        "threads": threads,
        "env": asdict(environment(torch.device("cpu"), git_commit())),
    }
    args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str))


if __name__ == "__main__":
    main()
