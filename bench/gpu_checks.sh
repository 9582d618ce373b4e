#!/usr/bin/env bash
# The GPU checks of issue 12 in one command, for a session that is lent a CUDA machine:
#   bash bench/gpu_checks.sh            # results under $OUT (default: bench/results/gpu)
# 1. tests/test_gpu.py (CPU vs GPU: SE set and statistics, GPTQ codes, pack-quantized written on the GPU loads on CPU);
# 2. bench/scale.py --device cuda --full-calibration: detect with 128 x 2048 tokens and GPTQ W4 g128 with all-expert
#    calibration on 2 layers of each real shape, batched vs one-expert-at-a-time GPTQ on all experts of a layer.
# Budget: about 8-10 minutes on one H100/H200 (most of it writing the random checkpoints); checkpoints go to
# $SCALE_DATA (default /tmp/scale-data), never into the repo.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu}"
DATA="${SCALE_DATA:-/tmp/scale-data}"
mkdir -p "$OUT" "$DATA"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.__version__, torch.cuda.get_device_name(0))" \
  | tee "$OUT/torch.txt" || exit 1
PYTHONPATH=$PWD python -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tail -30 | tee "$OUT/test_gpu.txt"
PYTHONPATH=$PWD python bench/scale.py --device cuda --full-calibration --layers 2 --solve-experts 0 \
  --data "$DATA" --out "$OUT" --batch-size 8 2>&1 | tee "$OUT/scale.log"
echo "results: $OUT/scale.md $OUT/test_gpu.txt"
