#!/usr/bin/env bash
# One prepared GPU run of the paper's setting. Expected device time: about 10 minutes on an H200 (one
# device call; environment and tests 1 min, verify 1 min, the two sweeps 4 min, report and tune 2 min,
# lengths 2 min), from a budget of 15: leave the rest for one rerun.
#
# Steps, in order (each a function below; add a step by writing `step_NAME` and naming it in STEPS):
#   environment  the card, driver, torch, CUDA, TF32 settings, cuBLAS's workspace settings
#   tests        the cuda-marked tests (tests/test_cuda.py): allocator peaks, the enforced budget, dropout
#                replayed from the GPU's generator, the CUDA estimate (cuBLAS workspaces included)
#   verify       gcbench verify in float32 (TF32 off) / fp16 + GradScaler / bf16
#   sweeps       dpr-bert-base under an 11 GiB budget with predictions beside, then `full` without one
#   report       a report of both sweeps against the 11 GiB budget
#   tune         gcbench tune at one batch under the same budget
#   lengths      long-tailed passages: token budgets beside fixed chunks, memory over 8 steps (reserved
#                memory and fragmentation per step), the timeline and memory_viz snapshots; verify --chunk-tokens
# Logs and a tarball of the results and report land in $OUT (the device tool brings back at most 8
# files there); the sweeps work in $WORK.
#
#   experiments/gpu-check.sh                  # on a GPU
#   experiments/gpu-check.sh --device cpu     # rehearsal on CPU: gcbench's CUDA double (GCBENCH_CUDA_DOUBLE=1)
#                                             # stands in for the card, a tiny model, the same steps and CUDA
#                                             # branches (about 10 minutes on 2 busy cores)
#   STEPS="verify sweeps" experiments/gpu-check.sh   # some steps only
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
if [[ "${1:-}" == "--device" && "${2:-}" == cpu ]]; then MODE=rehearsal; fi
OUT="${OUT:-/tmp/gpu-check}"
WORK="${WORK:-/tmp/gpu-check-work}"
mkdir -p "$OUT" "$WORK"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"   # the H200 image has torch in its python3; here: PYTHON=/work/main/.venv/bin/python
G=("$PY" -m gcbench)
STEPS=(${STEPS:-environment tests verify sweeps report tune lengths})

if [[ "$MODE" == rehearsal ]]; then  # CUDA's calls checked by the double, the arithmetic on the CPU
  export GCBENCH_CUDA_DOUBLE=1
  SIZE=(--set model.hidden=32 --set model.layers=1 --set model.heads=2 --set model.vocab=2000
        --set workload.query_length=8 --set workload.passage_length=16 --device cuda)
  VERIFY=(--device cuda:0 --batch-size 8 --chunk-sizes 4)
  BUDGET_BATCHES=4,8
  FREE_BATCHES=4,8
  TUNE_BATCH=8
  LENGTHS_BATCH=8
  TIMEOUT=600  # the double counts every tensor in Python: steps run several times slower than plain CPU ones
else
  SIZE=(--device cuda)
  TIMEOUT=120
  VERIFY=(--device cuda)
  BUDGET_BATCHES=8,16,32,64,128,256,512,1024
  FREE_BATCHES=8,16,32,64,128,256
  TUNE_BATCH=512
  LENGTHS_BATCH=256
fi

step_environment() {
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv 2>/dev/null || echo "no nvidia-smi"
  echo "CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-unset} CUBLASLT_WORKSPACE_SIZE=${CUBLASLT_WORKSPACE_SIZE:-unset}"
  "$PY" -c 'import gcbench, torch
from gcbench.device import float32_settings
from gcbench.estimate.workspaces import workspace_bytes
print("torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    capability = torch.cuda.get_device_capability(0)
    print(torch.cuda.get_device_name(0), "capability", capability, "workspaces as estimated:",
          workspace_bytes(capability) / 2**20, "MiB")
print(float32_settings())'
}

step_tests() {
  if [[ "$MODE" == rehearsal ]]; then  # the cuda-marked tests hold a real card to 10%: the double's tests instead
    "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda_double.py
  else
    "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider tests/test_cuda.py tests/test_tune.py tests/test_integrations.py  # test_tune: tune's peak = the sweep's
  fi
}

step_verify() {
  for precision in float32 fp16 bf16; do
    "${G[@]}" verify "${VERIFY[@]}" --precision "$precision" --strategies cache,checkpoint,accumulate || true
  done
}

step_sweeps() {
  # The paper's card: 11 GiB enforced with set_per_process_memory_fraction; predictions recorded beside.
  "${G[@]}" sweep dpr-bert-base "${SIZE[@]}" --strategies full,cache,accumulate --batch-sizes "$BUDGET_BATCHES" \
    --memory-budget 11GiB --predict --repeats 3 --max-repeats 3 --rounds 1 --warmup 1 --timeout "$TIMEOUT" \
    --set sweep.equivalence=false --out "$WORK/budget-11GiB" --fresh --quiet
  # Where does full really stop on the whole card?
  "${G[@]}" sweep dpr-bert-base "${SIZE[@]}" --strategies full --batch-sizes "$FREE_BATCHES" --memory-budget none \
    --predict --repeats 3 --max-repeats 3 --rounds 1 --warmup 1 --timeout "$TIMEOUT" --out "$WORK/no-budget" --fresh --quiet
}

step_report() {
  "${G[@]}" report "$WORK/budget-11GiB" "$WORK/no-budget" --out "$WORK/report" --memory-budget 11GiB | tail -5
  grep -h '"status"' "$WORK"/budget-11GiB/results.jsonl "$WORK"/no-budget/results.jsonl \
    | "$PY" -c 'import json, sys
for line in sys.stdin:
    r = json.loads(line)
    p, m = r["point"], r.get("memory") or {}
    print(p["strategy"], p["batch_size"], r["status"], m.get("method"), m.get("peak_bytes"), r.get("reason") or "")'
}

step_tune() {
  # The fastest setting of one batch under the card's 11 GiB (chunk sizes x kept graphs, measured).
  "${G[@]}" tune dpr-bert-base "${SIZE[@]}" --batch-size "$TUNE_BATCH" --memory-budget 11GiB --rounds 2 \
    --format json > "$OUT/tune.json" 2> "$OUT/tune.log" || true
  tail -3 "$OUT/tune.log"
}

step_lengths() {
  # Long-tailed passages (MS MARCO-like lengths): token budgets beside fixed chunks, memory over 8 steps of new
  # lengths (CUDA: reserved memory and fragmentation per step), the step's timeline and its memory_viz snapshots.
  "${G[@]}" sweep dpr-bert-base "${SIZE[@]}" --strategies full,cache --batch-sizes "$LENGTHS_BATCH" \
    --set workload.passage_lengths=msmarco --chunk-sizes 8,32 --chunk-tokens 2048,8192 --steps 8 \
    --set sweep.timeline=true --repeats 3 --max-repeats 3 --rounds 1 --warmup 1 --timeout "$TIMEOUT" \
    --set sweep.equivalence=false --out "$WORK/lengths" --fresh --quiet || true
  "${G[@]}" verify "${VERIFY[@]:0:2}" --chunk-tokens 48,96 --workload dpr,clip || true
  (cd "$WORK" && tar -czf "$OUT/snapshots.tar.gz" lengths/timeline-*.pickle 2>/dev/null) || true
}

for step in "${STEPS[@]}"; do
  echo "== $step ($MODE) $(date -u +%T)"
  "step_$step" 2>&1 | tee "$OUT/$step.txt"
done

if [[ -d "$WORK/report" ]]; then
  tar -czf "$OUT/results.tar.gz" -C "$WORK" report budget-11GiB/results.jsonl budget-11GiB/logs \
    no-budget/results.jsonl no-budget/logs $(cd "$WORK" && ls -d lengths/report.md lengths/figures \
    lengths/results.jsonl lengths/timeline.json lengths/logs 2>/dev/null)
fi
echo "done: $OUT"
