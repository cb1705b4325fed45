#!/usr/bin/env bash
# Is the caching cost of `make demo` the same number every time it is measured?
#
# Runs the quick comparison (full and cache keeping one graph or all, batches 8, 16, 32 and 128, chunks
# 8 and 32; the quick experiment's rounds, repeats and caps) N times from scratch, each a fresh sweep,
# then prints each run's caching cost at batch 128 (chunk 32, one graph kept: the default) with its 95%
# interval, the spread between the runs, whether every run's interval covers the other runs' estimates,
# and the points where cache and full do the same work (one chunk per input with every graph kept:
# quick has a hard negative, so its passages number twice the batch: batches 8 and 16 at chunk 32),
# whose ratio should lie within 0.9 to 1.1 unless the point is flagged noisy; batch 8 at chunk 8 (one
# chunk of queries, two of passages, every graph kept) is listed beside them. A
# report comparing the runs point by point (factor and Mann-Whitney test) goes to OUT/comparison.
#
#   experiments/timing-stability.sh 3            # on an idle machine: check `uptime` first
#   OUT=runs/stability experiments/timing-stability.sh 5
#   EXTRA="--threads 2" experiments/timing-stability.sh 3   # more sweep flags (here: against quick's 1 thread)
#   experiments/timing-stability.sh --render 3  # stability.md again from OUT/run-1..3, measuring nothing
#
# About a minute per run on 2 idle cores (estimated from the step times of reports/quick).
# Output: OUT/run-<i>/ (each sweep with its report), OUT/comparison/ and OUT/stability.md (what this prints).
set -euo pipefail
cd "$(dirname "$0")/.."
RENDER=0
if [ "${1:-}" = "--render" ]; then RENDER=1; shift; fi
RUNS=${1:-3}
OUT=${OUT:-reports/timing-stability}
BIN=${BIN:-.venv/bin}
mkdir -p "$OUT"
folders=()
for i in $(seq 1 "$RUNS"); do
  folders+=("$OUT/run-$i")
  [ "$RENDER" = 1 ] && continue
  echo "run $i of $RUNS (load average: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown))" >&2
  "$BIN/gcbench" sweep quick --strategies full,cache --batch-sizes 8,16,32,128 --chunk-sizes 8,32 --keep-graphs 1,all \
    --set sweep.predict=false --set sweep.equivalence=false ${EXTRA:-} --fresh --quiet --out "$OUT/run-$i" >/dev/null
done
labels=()
for i in $(seq 1 "$RUNS"); do labels+=(--label "run $i"); done
if [ "$RENDER" = 0 ]; then
  "$BIN/gcbench" report "${folders[@]}" "${labels[@]}" --memory-budget 256MiB --out "$OUT/comparison" >/dev/null
fi
"$BIN/python" - "${folders[@]}" <<'PYTHON' | tee "$OUT/stability.md"
"""The runs' caching cost at batch 128 (chunk 32), how far apart they are, and the same-work points."""
import sys
from pathlib import Path

from gcbench.experiment import load_experiment
from gcbench.report import load_runs
from gcbench.report.data import ReportData

def noise(row) -> str:
    """The point's noise, or nothing: a point without any has none (not NaN) in the table."""
    return row["noise"] if isinstance(row["noise"], str) else ""


folders = [Path(folder) for folder in sys.argv[1:]]
runs = load_runs(folders, [f"run {i}" for i in range(1, len(folders) + 1)])
data = ReportData.of(runs)
cost = data.caching_cost()
records = [r for run in runs for r in run.records]
loads = [r.time.load_average_1m for r in records if r.time and r.time.load_average_1m is not None]
commits = sorted({r.env.git_commit for r in records if r.env.git_commit})
print(f"# Timing stability: {len(runs)} runs of the quick comparison from scratch\n")
print(f"commit {', '.join(commits) or 'unknown'}; {records[0].env.cpu_cores} cores ({records[0].env.cpu}), "
      f"{records[0].env.torch_threads} torch threads per point; "
      f"1-minute load average while timing {min(loads):.1f} to {max(loads):.1f}; "
      f"{records[0].env.malloc or 'default malloc'}.\n")
keep = cost["keep_graphs"].astype(str)
head = cost[(cost["batch_size"] == 128) & (cost["chunk_sizes"] == "32") & (keep == "1")]
print("## Caching cost at batch 128, chunk 32 (cache's step time over full's, timed in turns)\n")
print("By wall time and by the process's CPU time of the same timed steps. With one torch thread the CPU time")
print("leaves out the seconds the process waited for a core, so on a shared machine it is the steadier of the")
print("two, and the CPU headline (gcbench report) takes it; records made before CPU time was taken have none.\n")
print("| run | cost (wall) | 95% CI | cost (CPU time) | 95% CI | rounds | noise |")
print("| --- | --- | --- | --- | --- | --- | --- |")


def _cost(row, ratio, low, high):
    if not isinstance(row[ratio], float) or row[ratio] != row[ratio]:
        return "-", "-"
    return f"{row[ratio] - 1:.1%}", f"{row[low] - 1:.1%} to {row[high] - 1:.1%}"


for _, row in head.iterrows():
    wall = _cost(row, "time_ratio", "ratio_low", "ratio_high") if row["paired"] else (f"{row['time_ratio'] - 1:.1%}", "none (not paired)")
    cpu = _cost(row, "paired_cpu_ratio", "paired_cpu_low", "paired_cpu_high")
    print(f"| {row['run']} | {wall[0]} | {wall[1]} | {cpu[0]} | {cpu[1]} | {row['time_rounds']:.0f} | {noise(row)} |")
for label, ratio, low, high in (
    ("wall time", "time_ratio", "ratio_low", "ratio_high"),
    ("CPU time", "paired_cpu_ratio", "paired_cpu_low", "paired_cpu_high"),
):
    known = head[head[ratio].notna()]
    if known.empty:
        print(f"\nBy {label}: no run has it.")
        continue
    estimates = known[ratio].tolist()
    spread = (max(estimates) - min(estimates)) * 100
    covered = all(lo <= other <= hi for lo, hi in zip(known[low], known[high]) for other in estimates)
    print(f"\nBy {label}: spread between runs {spread:.1f} percentage points (target: within 5). "
          f"Every interval covers every run's estimate: {'yes' if covered else 'no'}.")
print()
# One chunk per input (the chunk holds the batch's queries and its passages: a positive and the hard
# negatives per query) with every first-pass graph kept: cache encodes each input once, full's work.
# (Keeping one graph, the default, encodes the queries' chunk twice: that is the cost of caching.)
rows_per_passage_input = 1 + load_experiment("quick").workload.hard_negatives
chunk = cost["chunk_sizes"].astype(int)
cost = cost.assign(one_chunk=(chunk >= cost["batch_size"] * rows_per_passage_input) & (keep == "all"))
near = cost[cost["one_chunk"] | ((chunk >= cost["batch_size"]) & (cost["batch_size"] == 8) & (keep == "all"))]
print("## Where cache and full do the same work: ratio within 0.9 to 1.1, or flagged noisy\n")
print("| run | batch | chunk (every graph kept) | one chunk per input | ratio | 95% CI | within 0.9 to 1.1 | noise |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for _, row in near.iterrows():
    inside = 0.9 <= row["time_ratio"] <= 1.1
    print(f"| {row['run']} | {row['batch_size']} | {row['chunk_sizes']} | "
          f"{'yes' if row['one_chunk'] else 'queries only'} | {row['time_ratio']:.3f} | "
          f"{row['ratio_low']:.3f} to {row['ratio_high']:.3f} | {'yes' if inside else 'NO'} | {noise(row)} |")
same = cost[cost["one_chunk"]]
bad = same[~same["time_ratio"].between(0.9, 1.1) & ~same["noisy"]]
print(f"\nOne chunk per input, outside 0.9 to 1.1 and not flagged noisy: {len(bad)} of {len(same)} points.")
PYTHON
