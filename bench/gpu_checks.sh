#!/usr/bin/env bash
# The GPU checks in one command, for a session that is lent a CUDA machine:
#   bash bench/gpu_checks.sh              # results under $OUT (default: bench/results/gpu), about 8 minutes on one H200
#   SMALL=1 bash bench/gpu_checks.sh      # the same steps on the CPU with small sizes: tests this script, no GPU needed
# Each step writes its own files and has its own time limit; a step that fails or runs out of time is noted in
# $OUT/steps.txt and the next step still runs:
# 1. efficiency/: bench/scale.py --only-passes: each pass of one layer of each real shape (detection, Hessians, GPTQ
#    solve, report metrics) as a share of the GPU's own matmul rate measured right before it (bench/efficiency.py);
# 2. test_gpu.txt: tests/test_gpu.py (CPU vs GPU: SE set and statistics, GPTQ codes, a GPU-written checkpoint loads);
# 3. gptq_chunk_cuda.md: batched vs one-at-a-time GPTQ solves by matrix size (what quant/gptq.py's solve_chunk assumes);
# 4. scale.md: bench/scale.py --full-calibration: detect (128 x 2048 tokens) and GPTQ W4 g128 end to end on one
#    Qwen3-30B-A3B-shaped layer (what fits the budget; checkpoints in $SCALE_DATA, default /tmp/scale-data, never in
#    the repo, are reused by a rerun).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu}"
DATA="${SCALE_DATA:-/tmp/scale-data}"
mkdir -p "$OUT" "$DATA"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
: > "$OUT/steps.txt"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, output to $OUT/NAME.log, result line in steps.txt
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local what="ok"; [ $rc -eq 124 ] && what="stopped at its ${limit} s limit"; [ $rc -ne 0 ] && [ $rc -ne 124 ] && what="FAILED (exit $rc)"
  echo "$name: $what, $((SECONDS - start)) s" | tee -a "$OUT/steps.txt"
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')" \
  > "$OUT/torch.txt" 2>&1
if [ "${SMALL:-0}" = 1 ]; then
  DEVICE=cpu
  PASSES=(--passes-tokens 2x32 --batch-size 1 --passes-experts 2 --models qwen3-30b-a3b)
  CHUNK=(--rows 32,256 --cols 128 --chunks 1,4 --count 4)
  SCALE=(--models qwen3-30b-a3b --layers 1 --detect-tokens 1x32 --gptq-tokens 1x32 --solve-experts 2
         --skip-quantize qwen3-30b-a3b --batch-size 1)
  LIMITS=(600 300 300 900)
else
  grep -q "no CUDA" "$OUT/torch.txt" && { echo "no CUDA here: use SMALL=1 for the CPU check of this script"; exit 1; }
  DEVICE=cuda
  PASSES=(--passes-tokens 64x2048 --batch-size 8 --passes-experts 0)
  CHUNK=(--rows 256,2048,4096 --cols 1024 --chunks 1,8,32 --count 32)
  SCALE=(--full-calibration --models qwen3-30b-a3b --layers 1 --solve-experts 0 --batch-size 8)
  LIMITS=(220 60 45 150)
fi
step efficiency "${LIMITS[0]}" python bench/scale.py --device $DEVICE --only-passes "${PASSES[@]}" --data "$DATA" \
  --out "$OUT/efficiency"
step test_gpu "${LIMITS[1]}" python -m pytest -q -m gpu tests/test_gpu.py
step gptq_chunk "${LIMITS[2]}" python bench/gptq_chunk.py --device $DEVICE "${CHUNK[@]}" --out "$OUT"
step scale "${LIMITS[3]}" python bench/scale.py --device $DEVICE "${SCALE[@]}" --data "$DATA" --out "$OUT"
echo "results: $OUT/steps.txt $OUT/efficiency/scale.md $OUT/test_gpu.log $OUT/gptq_chunk*.md $OUT/scale.md"
