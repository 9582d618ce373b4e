#!/usr/bin/env bash
# Packs what the lent GPU machine lacks into .gpu-deps/ (ignored by git; carried by the device tool), on a machine
# with PyPI access. The GPU machine has no network, its own CUDA torch (2.11 when last seen) and transformers 5.17;
# se_compress is pinned to transformers 5.23 and compressed-tensors 0.20, and needs pydantic and loguru, so:
#   bash bench/gpu_deps.sh                       # here, once: ~8 MB (transformers as tar.xz, the rest as wheels)
#   source bench/gpu_env.sh; bash bench/gpu_checks.sh   # there (gpu_env.sh unpacks into /tmp/pyd, sets PYTHONPATH)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_PYTHON_VERSION:-3.12}
mkdir -p .gpu-deps
grep -qx '/.gpu-deps/' .git/info/exclude 2>/dev/null || echo '/.gpu-deps/' >> .git/info/exclude
tmp=$(mktemp -d)
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$tmp" \
  transformers==5.23.0 compressed-tensors==0.20.1 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types \
  typing-inspection loguru
(cd "$tmp" && python3 -m zipfile -e transformers-*.whl unpacked && cd unpacked && \
  tar cJf ../transformers.tar.xz transformers transformers-*.dist-info)
rm -f .gpu-deps/*
mv "$tmp"/transformers.tar.xz .gpu-deps/
find "$tmp" -maxdepth 1 -name '*.whl' ! -name 'transformers-*' -exec mv {} .gpu-deps/ \;
rm -rf "$tmp"
du -sh .gpu-deps; ls .gpu-deps
