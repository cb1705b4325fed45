"""cache vs cache-rerun vs st-cached, interleaved in one process: the ratios without between-process drift.

The sweep runs each point in its own process, one after another, so on a shared 2-core CPU two points
of a pair can differ by 10% for reasons that are not theirs. Here the three strategies' forward+backward
(the optimizer step is the same for all) run in turns (A B C A B C ...) on models built from one seed,
so drift hits all three alike. `cache` over `cache-rerun` is the gain of keeping the last chunk's graph,
measured in one run.

    .venv/bin/python experiments/peers-interleaved.py --out reports/peers-minilm/interleaved.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from gcbench.experiment import Experiment, load_experiment
from gcbench.measure.timing import Timing, time_calls
from gcbench.results import Point
from gcbench.results.environment import environment, git_commit
from gcbench.training import build_step
from gcbench.typed import dump

STRATEGIES = ("cache", "cache-rerun", "st-cached")
SETTINGS = ((64, 8), (64, 64), (256, 16), (512, 32))  # (batch, chunk): many chunks to one chunk per input


def measure(experiment: Experiment, batch: int, chunk: int, rounds: int) -> dict[str, Timing]:
    device = torch.device("cpu")
    steps = {name: build_step(experiment.step_config(Point(name, batch, (chunk,))), device) for name in STRATEGIES}

    def run(name: str) -> None:
        steps[name].zero_grad()
        steps[name].forward_backward()

    for name in STRATEGIES:  # warmup
        run(name)
    samples: dict[str, list[float]] = {name: [] for name in STRATEGIES}
    for _ in range(rounds):
        for name in STRATEGIES:
            samples[name].extend(time_calls(lambda: run(name), 1, device).samples_s)
    return {name: Timing(tuple(s)) for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True, help="Markdown table; a .json beside it")
    args = parser.parse_args()
    experiment = load_experiment("peers-minilm")
    rows, lines = (
        [],
        [
            "| batch | chunk | "
            + " | ".join(f"{s} median s (IQR)" for s in STRATEGIES)
            + " | cache / st-cached | cache / cache-rerun |",
            "|---" * (len(STRATEGIES) + 4) + "|",
        ],
    )
    for batch, chunk in SETTINGS:
        timings = measure(experiment, batch, chunk, args.rounds)
        median = {name: t.median_s for name, t in timings.items()}
        rows.append({"batch": batch, "chunk": chunk, **{name: list(t.samples_s) for name, t in timings.items()}})
        cells = " | ".join(f"{t.median_s:.3f} ({t.iqr_s:.3f})" for t in timings.values())
        lines.append(
            f"| {batch} | {chunk} | {cells} | {median['cache'] / median['st-cached']:.3f} | "
            f"{median['cache'] / median['cache-rerun']:.3f} |"
        )
        print(lines[-1], flush=True)
    env = dump(environment(torch.device("cpu"), git_commit()))
    header = (
        f"Interleaved forward+backward times, {args.rounds} rounds after one warmup, peers-minilm's model "
        f"and data, torch {env['torch']}, {env['cpu_cores']} cores ({env['cpu']}), commit {env['git_commit']}."
    )
    args.out.write_text(header + "\n\n" + "\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"env": env, "rounds": args.rounds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
