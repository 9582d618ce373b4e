#!/usr/bin/env bash
# The GPU checks in one command, for a session that is lent a CUDA machine:
#   bash bench/gpu_checks.sh              # results under $OUT (default: bench/results/gpu), about 9 minutes on one H200
#   SMALL=1 bash bench/gpu_checks.sh      # the same steps on the CPU with small sizes: tests this script, no GPU needed
# Each step writes its own files and has its own time limit; a step that fails or runs out of time is noted in
# $OUT/steps.txt and the next step still runs:
# 1. efficiency/: bench/scale.py --only-passes: each pass of one layer of each real shape (detection, Hessians, GPTQ
#    solve, report metrics) as a share of the GPU's own matmul rate measured right before it (bench/efficiency.py);
# 2. test_gpu.txt: tests/test_gpu.py (CPU vs GPU: SE set and statistics, GPTQ codes, a GPU-written checkpoint loads);
# 3. gptq_chunk_cuda.md: batched vs one-at-a-time GPTQ solves by matrix size (what quant/gptq.py's solve_chunk assumes);
# 4. determinism.md: bench/gpu_determinism.py: the default model through detect and GPTQ W4 g32 twice on the GPU
#    (byte-identical?) and once on the CPU (share of codes and scales equal);
# 5. scale.md: bench/scale.py --full-calibration: detect (128 x 2048 tokens) and GPTQ W4 g128 end to end on one
#    Qwen3-30B-A3B-shaped layer. Checkpoints go to $SCALE_DATA (default /tmp/scale-data), never into the repo.
# On the lent machine (offline, its own torch and transformers 5.17): `bash bench/gpu_deps.sh` here first, then there
#   source bench/gpu_env.sh; OUT=/tmp/gpu bash bench/gpu_checks.sh; tar czf <device $OUT>/gpu.tgz -C /tmp gpu
# (the device tool brings back at most 8 files: one archive of the results).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu}"
DATA="${SCALE_DATA:-/tmp/scale-data}"
mkdir -p "$OUT" "$DATA"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
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
$PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')" \
  > "$OUT/torch.txt" 2>&1
if [ "${SMALL:-0}" = 1 ]; then
  DEVICE=cpu
  PASSES=(--passes-tokens 2x32 --batch-size 1 --passes-experts 2 --models qwen3-30b-a3b)
  CHUNK=(--rows 32,256 --cols 128 --chunks 1,4 --count 4)
  SCALE=(--models qwen3-30b-a3b --layers 1 --detect-tokens 1x32 --gptq-tokens 1x32 --solve-experts 2
         --skip-quantize qwen3-30b-a3b --batch-size 1)
  DET=(--samples 4 --seqlen 64)
  LIMITS=(600 300 300 600 900)
else
  grep -q "no CUDA" "$OUT/torch.txt" && { echo "no CUDA here: use SMALL=1 for the CPU check of this script"; exit 1; }
  DEVICE=cuda
  PASSES=(--passes-tokens 32x2048 --batch-size 8 --passes-experts 0)
  CHUNK=(--rows 256,2048,4096 --cols 1024 --chunks 1,8,32 --count 32)
  SCALE=(--models qwen3-30b-a3b --full-calibration --layers 1 --solve-experts 0 --batch-size 8)
  DET=(--samples 8 --seqlen 128)
  LIMITS=(170 60 60 130 150)  # measured on an H200 (bench/results/gpu): 119 s, 37 s, -, ~100 s, ~90 s
fi
step test_gpu "${LIMITS[1]}" $PY -m pytest -q -m gpu tests/test_gpu.py
step efficiency "${LIMITS[0]}" $PY bench/scale.py --device $DEVICE --only-passes "${PASSES[@]}" --data "$DATA" \
  --out "$OUT/efficiency"
step determinism "${LIMITS[3]}" $PY bench/gpu_determinism.py --device $DEVICE "${DET[@]}" --out "$OUT"
step scale "${LIMITS[4]}" $PY bench/scale.py --device $DEVICE "${SCALE[@]}" --data "$DATA" --out "$OUT"
step gptq_chunk "${LIMITS[2]}" $PY bench/gptq_chunk.py --device $DEVICE "${CHUNK[@]}" --out "$OUT"
echo "results: $OUT/steps.txt $OUT/efficiency/scale.md $OUT/test_gpu.log $OUT/gptq_chunk*.md $OUT/determinism.md $OUT/scale.md"
