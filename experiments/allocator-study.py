"""What glibc's allocator does to a paired cache/full ratio: the same setting in many fresh processes,
under each malloc configuration.

The setting is the one that scattered from 1.02 to 1.31 between processes: two transformer towers
(d=256, 4 layers, sequences of 64 tokens), batch 64, chunk 16, ``cache`` and ``full`` timed in turns
in one process. Each configuration runs ``--processes`` fresh interpreters (alternating between
configurations, so a drift of the machine hits all alike); each prints its ratio (the median of its
turn-by-turn ratios), both medians and the minor page faults per turn (pages touched for the first
time: what a fresh mmap costs every step). The summary gives, per configuration, the median ratio, the
spread between processes (max / min - 1), the standard deviation and the range of page faults; the
page faults do not depend on the machine's load, the times do.

    .venv/bin/python experiments/allocator-study.py --processes 6 --out reports/allocator-study.md

Run it on an idle machine (check ``uptime``): other work moves these numbers more than the allocator.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MiB = 2**20
# glibc's tunables, set through the environment before the interpreter starts.
CONFIGURATIONS: dict[str, dict[str, str]] = {
    "default": {},
    # The mmap threshold fixed at its largest (no dynamic raising), freed memory kept in the heap.
    "threshold 32 MiB, no trim": {
        "MALLOC_MMAP_THRESHOLD_": str(32 * MiB),
        "MALLOC_TRIM_THRESHOLD_": str(1024 * MiB),
        "MALLOC_TOP_PAD_": str(64 * MiB),
    },
    # No mmap at all: every block from the heap, reused once freed.
    "no mmap, no trim": {
        "MALLOC_MMAP_MAX_": "0",
        "MALLOC_TRIM_THRESHOLD_": str(1024 * MiB),
        "MALLOC_TOP_PAD_": str(64 * MiB),
    },
    # The same as "no mmap, no trim", set by gcbench.measure.allocator in the running process (sweep.malloc).
    "steady (mallopt)": {"GCBENCH_STUDY_MALLOPT": "1"},
}


def child(turns: int) -> None:
    """One process: build both steps, warm up, time them in turns, print one JSON line."""
    import torch

    from gcbench.experiment import load_experiment
    from gcbench.measure.timing import RepeatPolicy, time_in_turns
    from gcbench.results import Point
    from gcbench.training import build_step

    if os.environ.get("GCBENCH_STUDY_MALLOPT"):
        from gcbench.measure.allocator import steady_allocator

        steady_allocator()
    experiment = load_experiment(
        "quick",
        {
            "model.hidden": (256, "study"),
            "model.layers": (4, "study"),
            "workload.query_length": (64, "study"),
            "workload.passage_length": (64, "study"),
        },
    )
    device = torch.device("cpu")
    steps = {name: build_step(experiment.step_config(Point(name, 64, chunks)), device) for name, chunks in
             (("cache", (16,)), ("full", None))}  # fmt: skip
    for step in steps.values():
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    result = time_in_turns(steps, device, RepeatPolicy.fixed(turns))
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    ratios = result.ratios("cache", "full")
    print(
        json.dumps(
            {
                "ratio": statistics.median(ratios),
                "cache_s": result.timing("cache").median_s,
                "full_s": result.timing("full").median_s,
                "page_faults_per_turn": faults / turns,  # minor faults: pages touched for the first time
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=6, help="fresh processes per configuration")
    parser.add_argument("--turns", type=int, default=10, help="timed turns (cache and full) per process")
    parser.add_argument("--out", type=Path, help="Markdown table (a .json beside it); default: print only")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.turns)
        return
    results: dict[str, list[dict[str, float]]] = {name: [] for name in CONFIGURATIONS}
    loads = []
    for index in range(args.processes):
        for name, tunables in CONFIGURATIONS.items():
            loads.append(os.getloadavg()[0])
            env = {**os.environ, **tunables}
            done = subprocess.run(
                [sys.executable, __file__, "--child", "--turns", str(args.turns)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{index + 1}/{args.processes} {name}: {results[name][-1]}", flush=True)
    lines = [
        "| malloc | processes | ratio cache/full: median | per process (min to max) | spread between processes "
        "| sd | full step (median of processes) | page faults per turn (min to max) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, runs in results.items():
        ratios = [r["ratio"] for r in runs]
        faults = [r["page_faults_per_turn"] for r in runs]
        lines.append(
            f"| {name} | {len(runs)} | {statistics.median(ratios):.3f} | {min(ratios):.3f} to {max(ratios):.3f} "
            f"| {max(ratios) / min(ratios) - 1:.1%} | {statistics.stdev(ratios) if len(ratios) > 1 else 0:.3f} "
            f"| {statistics.median(r['full_s'] for r in runs) * 1e3:.0f} ms "
            f"| {min(faults):.0f} to {max(faults):.0f} |"
        )
    header = (
        f"cache (chunk 16) against full at batch 64, two transformer towers d=256, 4 layers, sequences of 64, "
        f"{args.turns} turns per process; 1-minute load average {min(loads):.2f} to {max(loads):.2f} on "
        f"{os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M')}."
    )
    table = header + "\n\n" + "\n".join(lines) + "\n"
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
        args.out.with_suffix(".json").write_text(json.dumps({"loads": loads, "results": results}, indent=1))


if __name__ == "__main__":
    main()
