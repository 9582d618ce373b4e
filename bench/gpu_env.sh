# Sourced on the GPU machine before bench/gpu_checks.sh: unpacks .gpu-deps/ (made by bench/gpu_deps.sh) into
# /tmp/pyd and puts it and this checkout first on PYTHONPATH. Without .gpu-deps it changes nothing.
if [ -d .gpu-deps ]; then
  mkdir -p /tmp/pyd
  tar xJf .gpu-deps/transformers.tar.xz -C /tmp/pyd
  python3 -m pip install --quiet --no-deps --no-index --target /tmp/pyd .gpu-deps/*.whl 2>&1 | grep -v WARNING || true
  export PYTHONPATH="/tmp/pyd:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import torch, transformers, compressed_tensors; print('torch', torch.__version__, 'transformers', transformers.__version__, 'compressed-tensors', compressed_tensors.__version__, 'cuda', torch.cuda.is_available())"
