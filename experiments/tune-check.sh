#!/usr/bin/env bash
# Does `gcbench tune` pick the fastest setting of its grid? Runs it with `--measure all` (every candidate
# measured, not only the best four by the model) on `quick` at batch 128 under 100 MiB (between cache's
# and full's peaks) and on `dpr-bert-base` at a small CPU batch (16, queries of 16 and passages of 64
# tokens) under 3.9 GiB (between cache's and full's predicted peaks), keeps the JSON, and writes
# report.md: every candidate, the model's pick against the fastest measured, and its peak against the
# budget.
#
#   experiments/tune-check.sh              # about 6 minutes on 2 idle cores
#   experiments/tune-check.sh --render     # report.md from the JSON already there
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-reports/tune}
BIN=${BIN:-.venv/bin}
mkdir -p "$OUT"
if [[ "${1:-}" != "--render" ]]; then
  "$BIN/python" -m gcbench tune quick --batch-size 128 --memory-budget 100MiB --measure all --format json \
    > "$OUT/quick.json"
  "$BIN/python" -m gcbench tune dpr-bert-base --device cpu --batch-size 16 --set workload.query_length=16 \
    --set workload.passage_length=64 --set sweep.warmup=1 --memory-budget 3.9GiB --measure all --rounds 2 \
    --repeats 3 --max-repeats 6 --max-time 10 --format json > "$OUT/dpr-bert-base.json"
fi
"$BIN/python" - "$OUT" <<'PYTHON' | tee "$OUT/report.md"
"""Every candidate of each run, and whether the model's pick is within 5% of the fastest measured."""
import json
import sys
from pathlib import Path

from gcbench.results.units import format_bytes

out = Path(sys.argv[1])
print("# gcbench tune, checked against every candidate measured\n")
print("Made by `experiments/tune-check.sh` (`--measure all`). Times are medians over rounds of fresh processes,")
print("all candidates timed in turns in each; `vs fastest` is the paired ratio with its 95% interval.\n")
for name in ("quick", "dpr-bert-base"):
    result = json.loads((out / f"{name}.json").read_text())
    budget = result["memory_budget_bytes"]
    print(f"## {name}: batch {result['batch_size']}, budget {format_bytes(budget)}\n")
    print("| setting | predicted peak | measured peak | GFLOP | step time (ms) | 95% CI (ms) | vs fastest |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for c in result["candidates"]:
        chunks = c["chunk_sizes"]
        label = c["strategy"]
        if chunks:
            size = str(chunks[0]) if len(set(chunks)) == 1 else "/".join(map(str, chunks))
            label += f" (chunk {size}, keep {c['keep_graphs']})"
        t, r = c["step_time_s"], c["vs_winner"]
        measured = format_bytes(c["measured_peak_bytes"]) if c["measured_peak_bytes"] is not None else c["note"]
        print(
            f"| {label} | {format_bytes(c['predicted_peak_bytes'])} | {measured} | {c['flops'] / 1e9:,.1f} | "
            + (f"{t['value'] * 1e3:,.1f} | {t['low'] * 1e3:,.1f} to {t['high'] * 1e3:,.1f} | " if t else "| | ")
            + (f"{r['value']:.3f} ({r['low']:.3f} to {r['high']:.3f}) |" if r else " |")
        )
    timed = [c for c in result["candidates"] if c["step_time_s"]]
    fastest = min(timed, key=lambda c: c["step_time_s"]["value"])
    few = [c for c in result["candidates"][:4] if c["step_time_s"]]
    pick = min(few, key=lambda c: c["step_time_s"]["value"])
    gap = pick["step_time_s"]["value"] / fastest["step_time_s"]["value"] - 1
    within = pick["measured_peak_bytes"] <= budget
    print(
        f"\nThe model's pick (the fastest of its best {len(few)} by FLOPs): {result['model_pick']}, "
        f"{gap:.1%} slower than the fastest of all {len(timed)} measured ({'within' if gap <= 0.05 else 'NOT within'} "
        f"5%); its measured peak {format_bytes(pick['measured_peak_bytes'])} is "
        f"{'within' if within else 'OVER'} the budget. `{result['call']}`. "
        + (f"Left out as predicted: {'; '.join(result['refused'])}. " if result["refused"] else "")
        + f"{result['seconds']:.0f} s in all.\n"
    )
PYTHON
