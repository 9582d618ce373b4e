"""The quantizers on single matrices: packing against compressed-tensors, RTN, clip search, super weights, GPTQ."""
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize
from compressed_tensors.quantization import QuantizationArgs

from se_compress.quant.gptq import gptq_quantize, prepare_hessian
from se_compress.quant.pack import pack_int32, pack_zero_point, unpack_int32, unpack_zero_point
from se_compress.quant.policies import super_weight_mask, trigger_mask, SuperExpert, parse_policy
from se_compress.quant.rtn import QuantSpec, output_error, rtn_quantize
from se_compress.errors import SECompressError

SHAPES = [(1, 1), (5, 37), (3, 64), (7, 33), (2, 100), (16, 31)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_every_code_packs_and_unpacks_exactly(bits):
    g = torch.Generator().manual_seed(bits)
    for shape in SHAPES:
        q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), shape, dtype=torch.int8, generator=g)
        packed = pack_int32(q, bits)
        assert packed.dtype == torch.int32 and packed.shape == (shape[0], -(-shape[1] * bits // 32))
        assert torch.equal(packed, pack_to_int32(q, bits))                       # the same bits as compressed-tensors
        assert torch.equal(unpack_int32(packed, bits, shape[1]), q)
        assert torch.equal(unpack_from_int32(packed, bits, torch.Size(shape)), q)  # and its unpacker reads ours
        assert torch.equal(pack_zero_point(q, bits), pack_to_int32(q, bits, packed_dim=0))
        assert torch.equal(unpack_zero_point(pack_zero_point(q, bits), bits, shape[0]), q)
    extremes = torch.tensor([[-(1 << (bits - 1)), (1 << (bits - 1)) - 1] * 20], dtype=torch.int8)
    assert torch.equal(unpack_int32(pack_int32(extremes, bits), bits, 40), extremes)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 16])
def test_dequantization_matches_compressed_tensors(symmetric, group_size):
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))  # deterministic in CI
    spec = QuantSpec(4, group_size, symmetric)
    qt = rtn_quantize(w, spec, torch.bfloat16)
    args = QuantizationArgs(num_bits=4, symmetric=symmetric, strategy="group" if group_size else "channel",
                            group_size=group_size)
    ref = ct_dequantize(qt.q, qt.scale, qt.zero, args)
    assert torch.equal(qt.dequantize(), ref)
    assert (qt.dequantize().float() - w).abs().max() <= qt.scale.float().max() * 0.51 + 1e-3


def test_rtn_error_shrinks_with_bits_and_codes_stay_in_range():
    w = torch.randn(32, 128)
    errors = []
    for bits in (2, 3, 4, 8):
        qt = rtn_quantize(w, QuantSpec(bits, 32), torch.float32)
        assert qt.q.min() >= -(1 << (bits - 1)) and qt.q.max() <= (1 << (bits - 1)) - 1
        errors.append(float((qt.dequantize() - w).norm()))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.02 * float(w.norm())


def _planted_down(seed=0):
    torch.manual_seed(seed)
    down = torch.randn(32, 64) * 0.02
    down[7, 3] = 40.0
    return down


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_super_weight_survives_noclip_and_is_cut_by_naive_clip_search(bits):
    down = _planted_down()
    spec = QuantSpec(bits, 32)
    mask = super_weight_mask(down, channel=7)
    assert mask.nonzero().tolist() == [[7, 3]]
    naive = rtn_quantize(down, spec, torch.bfloat16, clip=True).dequantize().float()
    kept = rtn_quantize(down, spec, torch.bfloat16, clip=True, exact=mask).dequantize().float()
    assert naive[7, 3] < 0.95 * 40.0                      # clipped (at 2 bits by a third)
    assert abs(kept[7, 3] - 40.0) <= 40.0 * 2 ** -8       # exact up to the bf16 scale
    H = torch.eye(64)
    gptq = gptq_quantize(down, prepare_hessian(H), spec, torch.bfloat16, clip=True, exact=mask).dequantize().float()
    assert abs(gptq[7, 3] - 40.0) <= 40.0 * 2 ** -8
    # the other weights of the row are not clipped beyond half a step either
    other = torch.ones_like(mask)
    other[7, 3] = False
    assert (kept - down)[other].abs().max() < 40.0 / (2 ** (bits - 1) - 1)


def _correlated_problem(seed=0, rows=48, cols=128, tokens=2048):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5
    X = torch.randn(tokens, cols, generator=g) @ (torch.eye(cols) + 2 * mix)
    X[:, :4] *= 8  # a few outlier input channels, as in real activations
    W = torch.randn(rows, cols, generator=g) * 0.05
    return W, X.T @ X


@pytest.mark.parametrize("bits,group_size,act_order", [(4, 128, False), (3, 32, False), (2, 64, True), (4, None, True)])
def test_gptq_reconstructs_the_layer_better_than_rtn(bits, group_size, act_order):
    W, H = _correlated_problem()
    spec = QuantSpec(bits, group_size)
    rtn = rtn_quantize(W, spec, torch.float32).dequantize()
    gptq = gptq_quantize(W, prepare_hessian(H, act_order=act_order), spec, torch.float32).dequantize()
    assert output_error(W, gptq, H) < 0.8 * output_error(W, rtn, H)
    assert torch.isfinite(gptq).all()


def test_gptq_with_no_data_gives_finite_scales():
    W = torch.randn(16, 64)
    W[3] = 0.0  # an all-zero row: the smallest scale, codes 0
    for H in (torch.zeros(64, 64), torch.ones(64, 64)):  # no token at all; a rank-1 Hessian
        qt = gptq_quantize(W, prepare_hessian(H), QuantSpec(4, 32), torch.bfloat16)
        assert torch.isfinite(qt.scale.float()).all() and (qt.scale.float() > 0).all()
        assert torch.isfinite(qt.dequantize().float()).all() and (qt.dequantize()[3] == 0).all()


def test_asymmetric_gptq_and_rtn_use_the_full_range():
    W = torch.rand(8, 64) + 1.0  # all positive: asymmetric should beat symmetric
    sym = rtn_quantize(W, QuantSpec(3, 32, True), torch.float32).dequantize()
    asym = rtn_quantize(W, QuantSpec(3, 32, False), torch.float32).dequantize()
    assert (asym - W).norm() < 0.7 * (sym - W).norm()
    qt = gptq_quantize(W, prepare_hessian(torch.eye(64)), QuantSpec(3, 32, False), torch.float32)
    assert qt.zero is not None and (qt.dequantize() - W).norm() < 0.7 * (sym - W).norm()


def test_trigger_tokens_and_policy_parsing():
    ids = torch.tensor([[0, 5, 9, 5], [0, 7, 5, 1]])
    starts = trigger_mask(ids, [SuperExpert(1, 2, 3, 0, 0)])
    assert starts.tolist() == [[True, False, False, False], [True, False, False, False]]
    delim = trigger_mask(ids, [SuperExpert(1, 2, 3, 5, 17)])
    assert delim.tolist() == [[False, True, False, True], [False, False, True, False]]
    assert parse_policy("noclip,calib") == {"noclip", "calib"} and parse_policy(("none",)) == frozenset()
    for bad in ("noclip,fast", "none,keep"):
        with pytest.raises(SECompressError):
            parse_policy(bad)
