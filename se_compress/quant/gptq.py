"""GPTQ (Frantar et al. 2022, the IST-DASLab formulation), written to be read, for a batch of weight matrices.

Given W [O, I] and H = sum over calibration inputs x of x x^T [I, I] (the Hessian of the layer-wise squared
output error), columns are quantized one at a time, left to right; the error each column makes is spread
onto the columns not yet quantized through the inverse Hessian, so that later columns compensate for it:

    d = diag(H);  dead columns (d == 0) are zeroed;  H += damp * mean(d) * I
    U = chol(H^-1, upper)                       # the rows of U give the error feedback
    for each column j:  q_j = Q(w_j);  e = (w_j - q_j) / U[j, j];  w_{>j} -= e * U[j, >j]

done in blocks of 128 columns with the feedback to later blocks applied once per block (same result, fewer
memory passes). Group scales are taken from the (already error-corrected) weights when a group starts.
With `act_order`, columns are visited in decreasing order of d; the group scales are then computed up front
from the original weights ("static groups"), so each group stays a contiguous run of 128 input columns and
the checkpoint needs no g_idx. `exact` entries (super weights) always take the code that represents their
original value; their rounding error is still fed back to the other columns.

Batched: the experts of an MoE layer are B independent problems of the same shape, W [B, O, I] with H [B, I, I]
(or one H [1, I, I] that all share: the gate/up inputs under all-expert calibration). Every step above is the
same for each b, so it runs once over the leading dim: one batched Cholesky and inverse (torch.linalg), and one
column loop whose every operation touches [B, O] at once instead of B Python loops over [O]. Each problem keeps
its own damping (raised only for those whose Cholesky fails), column order, clip flag and super weights, so
the result equals B separate calls (tests/test_gptq_batched.py). Everything runs in fp32 on W's device.
"""
import torch

from .rtn import Quantized, QuantSpec, dequantize_codes, group_params, quantize_codes

DAMP_FACTORS = (1, 10, 100, 1000)


class CholeskyFailed(RuntimeError):
    pass


def prepare_hessians(H: torch.Tensor, damp: float = 0.01, act_order: bool = False) -> dict:
    """Dead columns, column order and upper Cholesky factor of the damped inverse, for H [B, I, I] at once.

    Returns {"dead": [B, I] bool, "perm": [B, I] long or None, "U": [B, I, I] fp32, "damp": [B] the damping
    used, "ok": [B] bool}. A problem whose H stays indefinite even with 1000x the damping has ok False (its U is
    the identity and must not be used: the caller falls back to round-to-nearest for it).
    """
    H = H.float().clone()
    B, cols, _ = H.shape
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    dead = diag <= 0
    torch.diagonal(H, dim1=-2, dim2=-1)[dead] = 1.0
    perm = torch.argsort(torch.diagonal(H, dim1=-2, dim2=-1), dim=-1, descending=True) if act_order else None
    if perm is not None:
        H = H.gather(1, perm[:, :, None].expand(B, cols, cols)).gather(2, perm[:, None, :].expand(B, cols, cols))
    eye = torch.eye(cols, dtype=H.dtype, device=H.device)
    mean_diag = torch.diagonal(H, dim1=-2, dim2=-1).mean(-1)
    U = eye.repeat(B, 1, 1)
    used = torch.zeros(B, dtype=H.dtype, device=H.device)
    ok = torch.zeros(B, dtype=torch.bool, device=H.device)
    for factor in DAMP_FACTORS:
        todo = (~ok).nonzero().flatten()
        if todo.numel() == 0:
            break
        L, info = torch.linalg.cholesky_ex(H[todo] + (damp * factor * mean_diag[todo])[:, None, None] * eye)
        Hinv = torch.cholesky_inverse(L)
        Ut, info_u = torch.linalg.cholesky_ex(Hinv, upper=True)
        good = (info == 0) & (info_u == 0)
        U[todo[good]] = Ut[good]
        used[todo[good]] = damp * factor
        ok[todo[good]] = True
    return {"dead": dead, "perm": perm, "U": U, "damp": used, "ok": ok}


def prepare_hessian(H: torch.Tensor, damp: float = 0.01, act_order: bool = False) -> dict:
    """prepare_hessians for one H [I, I] (a batch of one, usable by any number of matrices that share it).
    Raises CholeskyFailed when H stays indefinite even with 1000x the damping."""
    prepared = prepare_hessians(H[None], damp, act_order)
    if not bool(prepared["ok"][0]):
        raise CholeskyFailed("Hessian not positive definite even with 1000x damping")
    return prepared


def gptq_quantize_batched(W: torch.Tensor, prepared: dict, spec: QuantSpec, scale_dtype: torch.dtype = torch.bfloat16,
                          clip: "bool | torch.Tensor" = False, exact: torch.Tensor | None = None,
                          blocksize: int = 128) -> list[Quantized]:
    """GPTQ of W [B, O, I] with prepared Hessians of batch B (one each) or 1 (shared by all).

    clip: bool, or [B] bool (the clip search per problem: off for noclip SEs); exact: [B, O, I] bool super
    weights or None. Returns B Quantized (codes, scales on W's device).
    """
    B, rows, cols = W.shape
    device = W.device
    batch = torch.arange(B, device=device)
    W0 = W.float().clone()
    W0.masked_fill_(prepared["dead"].expand(B, cols)[:, None, :], 0)
    U, perm = prepared["U"], prepared["perm"]
    width = spec.group_width(cols)
    groups = -(-cols // width)
    clip = torch.as_tensor(clip, device=device).expand(B)
    exact = exact if exact is not None and exact.any() else None

    scale = torch.empty(B, rows, groups, dtype=scale_dtype, device=device)
    zero = torch.empty(B, rows, groups, dtype=torch.int8, device=device) if not spec.symmetric else None

    def set_group(g: int, block: torch.Tensor, block_exact):
        """Scales of group g of every problem from block [B, O, w]; clipped where asked and no super weight."""
        s, z = group_params(block, spec, scale_dtype, exact=block_exact)
        if clip.any():
            cs, cz = group_params(block, spec, scale_dtype, clip=True)
            use = clip[:, None] if block_exact is None else clip[:, None] & ~block_exact.any(-1)
            s = torch.where(use, cs, s)
            z = torch.where(use, cz, z) if z is not None else None
        scale[:, :, g] = s
        if zero is not None:
            zero[:, :, g] = z

    def group_exact(lo, hi):
        return exact[:, :, lo:hi] if exact is not None else None

    if perm is not None:  # static groups from the original weights; each problem's own column order
        for g in range(groups):
            lo, hi = g * width, min((g + 1) * width, cols)
            set_group(g, W0[:, :, lo:hi], group_exact(lo, hi))
        order = perm.expand(B, cols)
        Wp = W0.gather(2, order[:, None, :].expand(B, rows, cols))
    else:
        order = torch.arange(cols, device=device).expand(B, cols)
        Wp = W0.clone()
    Q = torch.zeros(B, rows, cols, dtype=torch.int8, device=device)

    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        W1 = Wp[:, :, b0:b1].clone()
        Err = torch.zeros_like(W1)
        U1 = U[:, b0:b1, b0:b1]
        for i in range(b1 - b0):
            k = b0 + i  # the k-th column visited; without act_order it is column k itself
            if perm is None and k % width == 0:
                hi = min(k + width, cols)
                # the group's weights as corrected so far (later blocks lag by their pending feedback, as in GPTQ)
                here = W1[:, :, i: i + hi - k]
                block = torch.cat([here, Wp[:, :, b1: b1 + hi - k - here.shape[2]]], dim=2)
                if exact is not None:  # a super weight's scale comes from its original value
                    block = torch.where(exact[:, :, k:hi], W0[:, :, k:hi], block)
                set_group(k // width, block, group_exact(k, hi))
            col = order[:, k]  # [B] original column index of each problem
            s = scale[batch, :, col // width]  # [B, O]
            z = zero[batch, :, col // width] if zero is not None else None
            w = W1[:, :, i]
            q = quantize_codes(w[..., None], s, z, spec)[..., 0]
            if exact is not None:
                ex = exact[batch, :, col]
                if ex.any():
                    q = torch.where(ex, quantize_codes(W0[batch, :, col][..., None], s, z, spec)[..., 0], q)
            Q[batch, :, col] = q
            w_hat = dequantize_codes(q[..., None], s, z)[..., 0].float()
            err = (w - w_hat) / U1[:, i, i][:, None]
            W1[:, :, i:] -= err[:, :, None] * U1[:, i, i:][:, None, :]
            Err[:, :, i] = err
        Wp[:, :, b1:] -= Err @ U[:, b0:b1, b1:]
    return [Quantized(Q[b], scale[b], zero[b] if zero is not None else None, spec) for b in range(B)]


def gptq_quantize(W: torch.Tensor, prepared: dict, spec: QuantSpec, scale_dtype: torch.dtype = torch.bfloat16,
                  clip: bool = False, exact: torch.Tensor | None = None, blocksize: int = 128) -> Quantized:
    """GPTQ of one matrix W [O, I] (a batch of one) with a prepared Hessian from prepare_hessian."""
    return gptq_quantize_batched(W[None], prepared, spec, scale_dtype, clip=clip,
                                 exact=exact[None] if exact is not None else None, blocksize=blocksize)[0]


CPU_ROWS_PER_STEP = 8192  # B x rows of one batched column step on the CPU: bench/results/gptq_chunk.md


def solve_chunk(count: int, rows: int, cols: int, own_hessian: bool) -> int:
    """How many of `count` same-shaped problems [rows, cols] gptq_quantize_batched solves at once.

    On a GPU: as many as fit in the placement's memory budget (each column step is a few kernel launches,
    whatever B). On the CPU batching saves per-column Python and dispatch time, which dominates for small
    matrices, but each in-block update touches [B, rows, 128] fp32: past ~8192 x 128 x 4 bytes (4 MiB) it leaves
    the cache and batching loses (measured: rows 2048, B = 16 is 2x slower per matrix than B = 4; rows 32,
    B = 16 is 50x faster than one at a time). So B x rows is kept at about CPU_ROWS_PER_STEP."""
    from ..models.placement import current

    placement = current()
    fit = placement.chunk(count, gptq_bytes_per_matrix(rows, cols, own_hessian=own_hessian))
    return fit if placement.is_cuda else max(1, min(fit, CPU_ROWS_PER_STEP // rows))


def gptq_bytes_per_matrix(rows: int, cols: int, own_hessian: bool) -> int:
    """Working memory of one problem in gptq_quantize_batched (fp32 copies W0, Wp, the caller's W, int8 codes,
    plus H, its factor, inverse and U when the problem has its own Hessian): for chunking by free memory."""
    return rows * cols * (3 * 4 + 1) + (4 * cols * cols * 4 if own_hessian else 0)
