"""Integer weight quantization of one matrix: scales, zero points, round-to-nearest, and the clip search.

Conventions (those of compressed-tensors, which vLLM and transformers load):
- A weight matrix is [out, in] (nn.Linear orientation); groups run along `in`. `group_size=None` means one group
  per row (per-channel). A last group shorter than `group_size` (in < group_size) is simply the whole row.
- Codes are signed: q in [-2^(b-1), 2^(b-1) - 1]. Dequantized w = (q - z) * s, computed in the scale's dtype
  (the checkpoint's dtype, e.g. bf16) exactly like compressed-tensors' `dequantize`, so our fake-quant weights
  and a packed checkpoint reloaded by transformers are bit-identical.
- Symmetric: s = max|w| / (2^(b-1) - 0.5), z = 0 (the GPTQ/compressed-tensors convention: the positive extreme
  can lose up to half a step). Asymmetric: the range [min(w, 0), max(w, 0)] over 2^b - 1 steps, integer z.

Super weights: `exact` marks entries that must come back exactly. A group holding one is scaled so that its
largest marked entry a sits on the grid: s = a / m with m = floor(qmax * a / max|w|) >= 1, z = 0, and no
clipping. Every other weight of that group still fits in [-qmax, qmax] steps, so nothing else is clipped.
The result is exact up to rounding the scale to the checkpoint dtype (relative error <= 2^-9 in bf16).

Clip search: for each group, ratios 1.00, 0.99, ... 0.21 of the range are tried and the one with the smallest
sum |w - Q(w)|^2.4 kept (the grid and norm of GPTQ's reference `mse` option). It never runs on exact groups.
"""
from dataclasses import dataclass

import torch

CLIP_GRID = [1.0 - i / 100 for i in range(80)]
CLIP_NORM = 2.4
MIN_SCALE = 1e-10  # an all-zero group gets this scale: codes 0, finite, never NaN


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int | None = 128  # None: per-channel
    symmetric: bool = True

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def group_width(self, columns: int) -> int:
        return columns if not self.group_size or self.group_size >= columns else self.group_size

    def describe(self) -> str:
        g = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"int{self.bits} {g} {'sym' if self.symmetric else 'asym'}"


@dataclass
class Quantized:
    """One quantized matrix: codes [O, I] int8, scale [O, G] (scale dtype), zero [O, G] int8 or None."""
    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    spec: QuantSpec

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.q, self.scale, self.zero, self.spec)


def _grouped(x: torch.Tensor, width: int) -> torch.Tensor:
    """[O, I] -> [O, G, width] (I must be a multiple of width, or the last group is padded with zeros)."""
    rows, cols = x.shape
    groups = -(-cols // width)
    if groups * width != cols:
        x = torch.nn.functional.pad(x, (0, groups * width - cols))
    return x.reshape(rows, groups, width)


def group_params(w: torch.Tensor, spec: QuantSpec, scale_dtype: torch.dtype, clip: bool = False,
                 exact: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point of each group of w [..., g] (the groups along the last dim) -> ([...], [...])."""
    w = w.float()
    if clip:
        return _clip_search(w, spec, scale_dtype, exact)
    return _params(w, spec, scale_dtype, 1.0, exact)


def _params(w, spec, scale_dtype, ratio, exact):
    if spec.symmetric:
        amax = w.abs().amax(-1) * ratio
        scale = amax / (spec.qmax + 0.5)
        zero = None
    else:
        lo = w.amin(-1).clamp(max=0) * ratio
        hi = w.amax(-1).clamp(min=0) * ratio
        scale = (hi - lo) / (2 ** spec.bits - 1)
        zero = (spec.qmin - torch.round(lo / scale.clamp(min=MIN_SCALE))).clamp(spec.qmin, spec.qmax)
    if exact is not None and exact.any():
        a = (w.abs() * exact).amax(-1)                       # the largest super weight of each group (0: none)
        has = a > 0
        amax = w.abs().amax(-1)
        m = torch.floor(spec.qmax * a / amax.clamp(min=MIN_SCALE)).clamp(min=1)
        scale = torch.where(has, a / m, scale)
        if zero is not None:
            zero = torch.where(has, torch.zeros_like(zero), zero)
    scale = scale.clamp(min=MIN_SCALE).to(scale_dtype)
    return scale, (zero.to(torch.int8) if zero is not None else None)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """w [..., g] with per-group scale/zero [...] -> int8 codes."""
    q = torch.round(w.float() / scale.float().unsqueeze(-1))
    if zero is not None:
        q = q + zero.float().unsqueeze(-1)
    return q.clamp(spec.qmin, spec.qmax).to(torch.int8)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """compressed-tensors' arithmetic: (q - z) in the scale dtype, times the scale, in the scale dtype."""
    x = q.to(scale.dtype)
    if zero is not None:
        x = x - zero.to(scale.dtype).unsqueeze(-1)
    return x * scale.unsqueeze(-1)


def _clip_search(w, spec, scale_dtype, exact):
    best_err = best_scale = best_zero = None
    for ratio in CLIP_GRID:
        scale, zero = _params(w, spec, scale_dtype, ratio, exact)
        err = (dequantize_codes(quantize_codes(w, scale, zero, spec), scale, zero).float() - w).abs().pow(CLIP_NORM).sum(-1)
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """Codes [O, I] -> weights [O, I] in the scale dtype."""
    rows, cols = q.shape
    width = spec.group_width(cols)
    out = dequantize_codes(_grouped(q, width), scale, zero)
    return out.reshape(rows, -1)[:, :cols]


def rtn_quantize(w: torch.Tensor, spec: QuantSpec, scale_dtype: torch.dtype = torch.bfloat16, clip: bool = False,
                 exact: torch.Tensor | None = None) -> Quantized:
    """Round-to-nearest of w [O, I]; `exact` [O, I] bool marks super weights to keep on the grid."""
    rows, cols = w.shape
    width = spec.group_width(cols)
    wg = _grouped(w.float(), width)
    eg = _grouped(exact.float(), width) if exact is not None else None
    scale, zero = group_params(wg, spec, scale_dtype, clip=clip and eg is None, exact=eg)
    if clip and eg is not None:  # clip only the groups without a super weight
        has = eg.any(-1)
        c_scale, c_zero = group_params(wg, spec, scale_dtype, clip=True)
        scale = torch.where(has, scale, c_scale)
        if zero is not None:
            zero = torch.where(has, zero, c_zero)
    q = quantize_codes(wg, scale, zero, spec).reshape(rows, -1)[:, :cols]
    return Quantized(q.contiguous(), scale, zero, spec)


def weight_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Relative Frobenius error ||w - w_hat|| / ||w||."""
    w = w.float()
    return float((w - w_hat.float()).norm() / w.norm().clamp(min=1e-12))


METRIC_ROWS = 64  # rows of a matrix the report's output errors are measured on (all of them up to this many)


def metric_rows(rows: int):
    """The rows the report's output errors use: every ceil(rows / METRIC_ROWS)-th, all of them for small matrices.

    The output error is a sum over rows, tr(D H D^T) = sum_r d_r H d_r^T, so evenly spaced rows estimate the ratio
    at METRIC_ROWS / rows of the cost: a few percent of a GPTQ solve (O I^2) instead of several times it (issue 18:
    ~7 TFLOP per Qwen3-30B-A3B layer measured on every row). Round-to-nearest is row-local, so its rows can be
    quantized alone for the comparison."""
    stride = -(-rows // METRIC_ROWS)
    return slice(None) if stride == 1 else slice(0, rows, stride)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """Relative layer-output error on the calibration inputs: tr(D H D^T) / tr(W H W^T), D = W - W_hat, H = X^T X."""
    w = w.float()
    d = w - w_hat.float()
    num = ((d @ H) * d).sum()
    den = ((w @ H) * w).sum().clamp(min=1e-12)
    return float(num / den)
