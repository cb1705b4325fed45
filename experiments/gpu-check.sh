#!/usr/bin/env bash
# One prepared GPU run of the paper's setting (one device call of at most ~8 minutes):
#   environment, the cuda-marked tests, gcbench verify in float32 / fp16+GradScaler / bf16, the
#   dpr-bert-base sweep under an 11 GiB budget with predictions beside the measurements, then `full`
#   without a budget, a report, `gcbench tune` at one batch under the same budget, and long-tailed lengths
#   (token budgets, memory over 8 steps with fragmentation, the timeline and memory_viz snapshots).
# Logs and a tarball of the results and report land in $OUT (the device tool brings back at most 8
# files there); the sweeps work in $WORK.
#
#   experiments/gpu-check.sh                 # on a GPU
#   experiments/gpu-check.sh --device cpu    # dry run on CPU: a tiny model, small batches, same steps
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
if [[ "${1:-}" == "--device" ]]; then DEVICE="$2"; fi
OUT="${OUT:-/tmp/gpu-check}"
WORK="${WORK:-/tmp/gpu-check-work}"
mkdir -p "$OUT" "$WORK"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"   # the H200 image has torch in its python3; here: PYTHON=.venv/bin/python
G=("$PY" -m gcbench)

if [[ "$DEVICE" == cpu ]]; then  # the same steps at a size two CPU cores finish in a few minutes
  SIZE=(--set model.hidden=64 --set model.layers=2 --set model.heads=4 --set model.vocab=8192
        --set workload.passage_length=64 --device cpu)
  BUDGET_BATCHES=8,32,128
  FREE_BATCHES=8,32
  TUNE_BATCH=32
  LENGTHS_BATCH=32
else
  SIZE=(--device cuda)
  BUDGET_BATCHES=8,16,32,64,128,256,512,1024
  FREE_BATCHES=8,16,32,64,128,256
  TUNE_BATCH=512
  LENGTHS_BATCH=256
fi

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
    torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")'
} 2>&1 | tee "$OUT/environment.txt"

# The paths only a GPU runs (peaks from the CUDA allocator, the enforced budget, dropout from the GPU's
# generator, the CUDA estimate against a measured peak); skipped with the reason on CPU.
"$PY" -m pytest -m cuda -q -rs -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/cuda-tests.txt" || true

for precision in float32 fp16 bf16; do
  "${G[@]}" verify --device "$DEVICE" --precision "$precision" --strategies cache,checkpoint,accumulate || true
done 2>&1 | tee "$OUT/verify.txt"

# The paper's card: 11 GiB enforced with set_per_process_memory_fraction; predictions recorded beside.
"${G[@]}" sweep dpr-bert-base "${SIZE[@]}" --strategies full,cache,accumulate --batch-sizes "$BUDGET_BATCHES" \
  --memory-budget 11GiB --predict --repeats 3 --max-repeats 3 --rounds 1 --warmup 1 --timeout 120 --set sweep.equivalence=false \
  --out "$WORK/budget-11GiB" --fresh --quiet 2>&1 | tee "$OUT/sweeps.txt"

# Where does full really stop on the whole card?
"${G[@]}" sweep dpr-bert-base "${SIZE[@]}" --strategies full --batch-sizes "$FREE_BATCHES" --memory-budget none \
  --predict --repeats 3 --max-repeats 3 --rounds 1 --warmup 1 --timeout 120 --out "$WORK/no-budget" --fresh --quiet 2>&1 | tee -a "$OUT/sweeps.txt"

"${G[@]}" report "$WORK/budget-11GiB" "$WORK/no-budget" --out "$WORK/report" --memory-budget 11GiB 2>&1 | tail -5
# The fastest setting of one batch under the card's 11 GiB (chunk sizes x kept graphs, measured).
"${G[@]}" tune dpr-bert-base "${SIZE[@]}" --batch-size "$TUNE_BATCH" --memory-budget 11GiB --rounds 2 \
  --format json > "$OUT/tune.json" 2> "$OUT/tune.log" || true

# Long-tailed passages (MS MARCO-like lengths): token budgets beside fixed chunks, memory over 8 steps of new
# lengths (CUDA: reserved memory and fragmentation per step), the step's timeline and its memory_viz snapshots.
"${G[@]}" sweep dpr-bert-base "${SIZE[@]}" --strategies full,cache --batch-sizes "$LENGTHS_BATCH" \
  --set workload.passage_lengths=msmarco --chunk-sizes 8,32 --chunk-tokens 2048,8192 --steps 8 \
  --set sweep.timeline=true --repeats 3 --max-repeats 3 --rounds 1 --warmup 1 --timeout 300 \
  --set sweep.equivalence=false --out "$WORK/lengths" --fresh --quiet 2>&1 | tee "$OUT/lengths.txt" || true
"$PY" -m gcbench verify --device "$DEVICE" --chunk-tokens 48,96 --workload dpr,clip 2>&1 | tee -a "$OUT/lengths.txt" || true
(cd "$WORK" && tar -czf "$OUT/snapshots.tar.gz" lengths/timeline-*.pickle 2>/dev/null) || true

tar -czf "$OUT/results.tar.gz" -C "$WORK" report budget-11GiB/results.jsonl budget-11GiB/logs \
  no-budget/results.jsonl no-budget/logs $(cd "$WORK" && ls -d lengths/report.md lengths/figures lengths/results.jsonl \
  lengths/timeline.json lengths/logs 2>/dev/null)
echo "done: $OUT"
