"""How long gcbench's own answers take: the estimate of the DPR table, a small user model's estimate up to
batch 131072, and tune's search phase for dpr-bert-base at batch 16, each with a fake step at every point
(``fit=False``: how the estimate ran before gcbench.estimate.series) and with the fitted series.

Wall and process CPU time (the CPU time matters less to other load on the machine), the fake steps each
ran, the load average before and after, into reports/tool-times/tool-times.json and .md. One run each.

    nice .venv/bin/python experiments/tool-times.py            # several minutes on 2 cores
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments" / "bring-your-own"))

from gcbench import tune as tuning  # noqa: E402
from gcbench.estimate import plan as plan_module  # noqa: E402
from gcbench.estimate.estimator import Estimator  # noqa: E402
from gcbench.experiment import load_experiment  # noqa: E402

OUT = ROOT / "reports" / "tool-times"
MEMORIES = [11 * 2**30, 24 * 2**30, 80 * 2**30]
SMALL_BATCHES = [64 * 2**i for i in range(12)]  # 64 ... 131072
TUNE_SETTINGS = {  # experiments/tune-check.sh's dpr-bert-base run
    "workload.query_length": 16,
    "workload.passage_length": 64,
    "sweep.memory_budget": "3.9GiB",
    "sweep.device": "cpu",
}


PLANS: dict[str, Any] = {}  # each estimate's rows and advice, to compare the fitted series with a step per point


def timed(run: Callable[[], Estimator]) -> dict[str, Any]:
    wall, cpu = time.perf_counter(), time.process_time()
    estimator = run()
    return {
        "wall_s": round(time.perf_counter() - wall, 2),
        "cpu_s": round(time.process_time() - cpu, 2),
        "fake_steps": estimator.fake_steps,
    }


def predictions(plan: plan_module.EstimatePlan) -> Any:
    rows = [(r.point, r.prediction and replace(r.prediction, seconds=None), r.error) for r in plan.rows]
    return rows, plan.advice


def estimate(name: str, overrides: dict[str, Any], fit: bool) -> Callable[[], Estimator]:
    def run() -> Estimator:
        made: list[Estimator] = []

        class Counting(Estimator):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                made.append(self)

        plan_module.Estimator = Counting  # type: ignore[misc]
        try:
            experiment = load_experiment(name, {k: (v, "--set") for k, v in overrides.items()})
            PLANS[f"{name} {fit}"] = predictions(plan_module.estimate_experiment(experiment, "cuda", MEMORIES, fit=fit))
        finally:
            plan_module.Estimator = Estimator  # type: ignore[misc]
        return made[0]

    return run


def tune_search() -> Estimator:
    experiment = load_experiment("dpr-bert-base", {k: (v, "--set") for k, v in TUNE_SETTINGS.items()})
    sweep = experiment.sweep
    assert sweep.memory_budget is not None
    estimator = Estimator(experiment.workload, sweep.precision, "cpu", sweep.seed, experiment.optimizer)
    limit = int(sweep.memory_budget * (1 - tuning.DEFAULT_MARGIN))
    candidates, _ = tuning._search(estimator, experiment, tuning._cached_strategy(experiment), 16, limit)
    for candidate in candidates:
        candidate.flops = estimator.flops(experiment.step_config(candidate.point(16)))
    return estimator


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    small = {"sweep.strategies": ["full", "cache"], "sweep.batch_sizes": SMALL_BATCHES, "sweep.chunk_sizes": [[64]]}
    runs: dict[str, Callable[[], Estimator]] = {
        "estimate dpr-bert-base, a step per point": estimate("dpr-bert-base", {}, fit=False),
        "estimate dpr-bert-base, fitted series": estimate("dpr-bert-base", {}, fit=True),
        "estimate bring-your-own to 131072, a step per point": estimate(
            str(ROOT / "experiments/bring-your-own/bring-your-own.toml"), small, fit=False
        ),
        "estimate bring-your-own to 131072, fitted series": estimate(
            str(ROOT / "experiments/bring-your-own/bring-your-own.toml"), small, fit=True
        ),
        "tune dpr-bert-base batch 16, search and ranking": tune_search,
    }
    results: dict[str, Any] = {"load_before": os.getloadavg(), "machine": platform.processor() or platform.machine()}
    results["cpus"] = os.cpu_count()
    results["runs"] = {}
    for name, run in runs.items():
        results["runs"][name] = timed(run)
        print(name, results["runs"][name], flush=True)
    results["load_after"] = os.getloadavg()
    names = sorted({key.rsplit(" ", 1)[0] for key in PLANS})
    results["same_predictions"] = {name: PLANS[f"{name} True"] == PLANS[f"{name} False"] for name in names}
    (OUT / "tool-times.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# gcbench's own times",
        "",
        "Made by `experiments/tool-times.py` (one run each, wall and process CPU seconds; load average "
        f"{results['load_before'][0]:.1f} before, {results['load_after'][0]:.1f} after, on {results['cpus']} CPUs).",
        "",
        "| run | wall (s) | CPU (s) | fake steps |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, r in results["runs"].items():
        lines.append(f"| {name} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['fake_steps']} |")
    lines += ["", "Fitted series the same as a step per point, rows and chunk advice, byte for byte:"]
    lines += [f"- {Path(name).stem}: {'yes' if same else 'NO'}" for name, same in results["same_predictions"].items()]
    (OUT / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
