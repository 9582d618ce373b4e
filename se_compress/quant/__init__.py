"""Low-bit weight quantization that handles Super Experts: RTN and GPTQ at 2/3/4/8 bits, SE policies
(noclip, calib, layer, keep), compressed-tensors pack-quantized or fake-quant output. See engine.py."""
from .engine import quantize_model

__all__ = ["quantize_model"]
