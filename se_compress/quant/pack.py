"""Integer codes <-> the int32 words of compressed-tensors' `pack-quantized` format (version 0.20).

The convention, read from compressed-tensors' packer (and checked bit for bit against it in the tests):
- codes are signed int8 in [-2^(b-1), 2^(b-1) - 1]; each is stored as the unsigned u = q + 2^(b-1);
- each row is one dense bit stream along the last dim: element k occupies bits [k*b, k*b + b) counted from
  the least significant bit of word 0; a value may straddle two words (3 bits); no padding bits between
  elements; a row takes ceil(columns * b / 32) int32 words, the unused tail bits are 0;
- `weight_shape` holds the unpacked [out, in]; the scale is [out, in / group_size] (group) or [out, 1]
  (channel) in the checkpoint's float dtype; an asymmetric zero point is packed the same way but along
  dim 0 (the output rows), i.e. [ceil(out * b / 32), groups].
"""
import math

import torch


def packed_columns(columns: int, bits: int) -> int:
    return math.ceil(columns * bits / 32)


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 codes [R, C] -> int32 words [R, ceil(C * bits / 32)]."""
    if codes.dtype != torch.int8 or codes.dim() != 2:
        raise ValueError("pack_int32 takes a 2-D int8 tensor")
    rows, cols = codes.shape
    u = (codes.to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1)
    # 32 elements fill exactly `bits` words: pad the row to whole runs of 32 (zero bits), fill run by run
    runs = -(-cols // 32)
    u = torch.nn.functional.pad(u, (0, runs * 32 - cols)).reshape(rows, runs, 32)
    words = torch.zeros(rows, runs, bits + 1, dtype=torch.int64, device=codes.device)  # one spare word for the straddling element
    for k in range(32):
        word, offset = divmod(k * bits, 32)
        words[:, :, word] |= (u[:, :, k] << offset) & 0xFFFFFFFF
        if offset + bits > 32:
            words[:, :, word + 1] |= u[:, :, k] >> (32 - offset)
    words = words[:, :, :bits].reshape(rows, runs * bits)[:, : packed_columns(cols, bits)]
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # two's complement view of the 32 bits
    return words.to(torch.int32).contiguous()


def unpack_int32(words: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """int32 words [R, W] -> int8 codes [R, columns]."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, torch.zeros(w.shape[0], 1, dtype=torch.int64, device=w.device)], dim=1)
    start = torch.arange(columns, dtype=torch.int64, device=w.device) * bits
    word, offset = start // 32, start % 32
    low = w[:, word] >> offset
    high = w[:, word + 1] << (32 - offset)  # bits that spilled into the next word
    u = (low | torch.where(offset + bits > 32, high, torch.zeros_like(high))) & ((1 << bits) - 1)
    return (u - (1 << (bits - 1))).to(torch.int8)


def pack_zero_point(zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points [out, groups] -> packed along the output rows: [ceil(out * bits / 32), groups]."""
    return pack_int32(zero.t().contiguous(), bits).t().contiguous()


def unpack_zero_point(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    return unpack_int32(packed.t().contiguous(), bits, rows).t().contiguous()
