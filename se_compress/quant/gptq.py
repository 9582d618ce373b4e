"""GPTQ on one weight matrix (Frantar et al. 2022, the IST-DASLab formulation), written to be read.

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
"""
import torch

from .rtn import Quantized, QuantSpec, dequantize_codes, group_params, quantize_codes


class CholeskyFailed(RuntimeError):
    pass


def prepare_hessian(H: torch.Tensor, damp: float = 0.01, act_order: bool = False):
    """Dead columns, column order and the upper Cholesky factor of the damped inverse Hessian.

    One preparation serves every matrix that shares the inputs (all experts' gate/up under all-token
    calibration). Raises CholeskyFailed when H stays indefinite even with 1000x the damping.
    """
    H = H.double().clone()
    dead = torch.diag(H) <= 0
    H[dead, dead] = 1.0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if perm is not None:
        H = H[perm][:, perm]
    mean_diag = torch.diag(H).mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    for factor in (1, 10, 100, 1000):
        L, info = torch.linalg.cholesky_ex(H + damp * factor * mean_diag * eye)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return {"dead": dead, "perm": perm, "U": U.float(), "damp": damp * factor}
    raise CholeskyFailed("Hessian not positive definite even with 1000x damping")


def gptq_quantize(W: torch.Tensor, prepared: dict, spec: QuantSpec, scale_dtype: torch.dtype = torch.bfloat16,
                  clip: bool = False, exact: torch.Tensor | None = None, blocksize: int = 128) -> Quantized:
    W0 = W.float().clone()
    W0[:, prepared["dead"]] = 0
    rows, cols = W0.shape
    width = spec.group_width(cols)
    groups = -(-cols // width)
    perm, U = prepared["perm"], prepared["U"]
    exact = exact if exact is not None and exact.any() else None

    scale = torch.empty(rows, groups, dtype=scale_dtype)
    zero = torch.empty(rows, groups, dtype=torch.int8) if not spec.symmetric else None

    def set_group(g: int, block: torch.Tensor, block_exact):
        clip_here = clip and (block_exact is None or not block_exact.any())
        s, z = group_params(block, spec, scale_dtype, clip=clip_here, exact=block_exact)
        if clip and not clip_here:  # clip the rows without a super weight, keep the others exact
            cs, cz = group_params(block, spec, scale_dtype, clip=True)
            keep = block_exact.any(-1)
            s = torch.where(keep, s, cs)
            z = torch.where(keep, z, cz) if z is not None else None
        scale[:, g] = s
        if zero is not None:
            zero[:, g] = z

    def group_exact(lo, hi):
        return exact[:, lo:hi].float() if exact is not None else None

    if perm is not None:  # static groups from the original weights
        for g in range(groups):
            lo, hi = g * width, min((g + 1) * width, cols)
            set_group(g, W0[:, lo:hi], group_exact(lo, hi))
        order = perm
    else:
        order = torch.arange(cols)
    Wp = W0[:, order].clone()
    Q = torch.zeros(rows, cols, dtype=torch.int8)

    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        W1 = Wp[:, b0:b1].clone()
        Err = torch.zeros_like(W1)
        U1 = U[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = int(order[b0 + i])  # the original column index
            g = col // width
            if perm is None and col % width == 0:
                hi = min(col + width, cols)
                # the group's weights as corrected so far (later blocks lag by their pending feedback, as in GPTQ)
                block = torch.cat([W1[:, i:], Wp[:, b1:]], dim=1)[:, : hi - col]
                if exact is not None:  # a super weight's scale comes from its original value
                    ex = exact[:, col:hi]
                    block = torch.where(ex, W0[:, col:hi], block)
                set_group(g, block, group_exact(col, hi))
            s, z = scale[:, g], (zero[:, g] if zero is not None else None)
            w = W1[:, i]
            q = quantize_codes(w[:, None], s, z, spec)[:, 0]
            if exact is not None and exact[:, col].any():
                rows_ex = exact[:, col]
                q[rows_ex] = quantize_codes(W0[rows_ex, col][:, None], s[rows_ex],
                                            z[rows_ex] if z is not None else None, spec)[:, 0]
            Q[:, col] = q
            w_hat = dequantize_codes(q[:, None], s, z)[:, 0].float()
            err = (w - w_hat) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err[:, i] = err
        Wp[:, b1:] -= Err @ U[b0:b1, b1:]
    return Quantized(Q, scale, zero, spec)
