"""The stored formats of published checkpoints: what config.json's quantization_config says the tensors are, and
how to turn them back into the weights the model computes with.

Read (dequantized layer by layer as the reader asks for a tensor):
  fp8 with weight_block_size [bm, bn] (DeepSeek-V3/R1, Qwen3-*-FP8): `x.weight` float8_e4m3fn [R, C] and
      `x.weight_scale_inv` [ceil(R/bm), ceil(C/bn)]; w[r, c] = fp32(weight[r, c]) * fp32(scale_inv[r // bm, c // bn]),
      rounded once to the checkpoint's dtype. (transformers' Fp8Dequantize does the same product in fp32; it derives
      the block from the scale grid, which agrees whenever the block divides the weight: DeepSeek's kv_a_proj [576, C]
      does not, and its own weight_dequant kernel crops the last block as we do.)
  mxfp4 (gpt-oss): `x_blocks` uint8 [E, R, C/32, 16] holding two e2m1 values per byte (low nibble first) and
      `x_scales` uint8 [E, R, C/32], an e8m0 exponent per 32 values; w = e2m1 * 2^(scale - 127), returned
      transposed to transformers' in-memory layout [E, C, R] (as transformers' convert_moe_packed_tensors does).
Refused, one line naming the format and what to pass instead: every other quantization_config (GPTQ, AWQ,
compressed-tensors, bitsandbytes, fp8 without blocks, anything unknown).

The reader (Checkpoint) shows the dequantized view under the in-memory names (`x.weight`, `x` for mxfp4) and hides
the scale / block keys, so detect, ablate, eval, prune, merge and quantize see an ordinary checkpoint. The stored
tensors stay readable as they are (Checkpoint.get_stored) for writers that keep the stored format (prune).

DeepSeek-V3/R1 store one multi-token-prediction (MTP) layer after the last decoder layer, as
model.layers.{num_hidden_layers}.* (`num_nextn_predict_layers: 1`); transformers skips it on load. A rewritten
checkpoint drops it and says `num_nextn_predict_layers: 0` (see `mtp_layer_keys` / `rewritten_config`).
"""
import copy
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SECompressError

# e2m1 values by nibble (sign bit 3): the table of the OCP MX spec, as transformers' FP4_VALUES.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_GROUP = 32

REFUSED = {  # quant_method -> the format's usual name
    "gptq": "GPTQ", "awq": "AWQ", "compressed-tensors": "compressed-tensors", "bitsandbytes": "bitsandbytes",
    "bitsandbytes_4bit": "bitsandbytes", "bitsandbytes_8bit": "bitsandbytes", "hqq": "HQQ", "eetq": "EETQ",
    "aqlm": "AQLM", "quanto": "quanto", "torchao": "torchao", "exl2": "EXL2", "gguf": "GGUF", "fbgemm_fp8": "FBGEMM FP8",
    "modelopt": "ModelOpt", "auto-round": "AutoRound", "autoround": "AutoRound", "higgs": "HIGGS", "vptq": "VPTQ",
    "spqr": "SpQR", "bitnet": "BitNet",
}


def _dtype(config: dict) -> torch.dtype:
    name = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    value = getattr(torch, str(name).replace("torch.", ""), None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.bfloat16


@dataclass(frozen=True)
class Fp8Block:
    """quant_method fp8 with weight_block_size: float8_e4m3fn weights with one scale per block."""
    block: tuple[int, int]
    dtype: torch.dtype = torch.bfloat16
    quant_method: str = "fp8"

    def describe(self) -> str:
        return f"FP8 (float8_e4m3fn) weights with a weight_scale_inv per {self.block[0]}x{self.block[1]} block"

    def derived(self, stored_keys) -> dict[str, tuple[str, ...]]:
        """In-memory name -> the stored keys it is computed from (weight, weight_scale_inv)."""
        keys = set(stored_keys)
        return {k[: -len("_scale_inv")]: (k[: -len("_scale_inv")], k) for k in keys
                if k.endswith(".weight_scale_inv") and k[: -len("_scale_inv")] in keys}

    def hidden(self, stored_keys) -> set[str]:
        """Stored keys with no meaning once dequantized (static activation scales)."""
        return {k for k in stored_keys if k.endswith((".activation_scale", ".input_scale"))}

    def dequantize(self, weight: torch.Tensor, scale_inv: torch.Tensor, name: str = "") -> torch.Tensor:
        return dequantize_fp8_block(weight, scale_inv, self.block, self.dtype, name)


@dataclass(frozen=True)
class Mxfp4:
    """quant_method mxfp4 (gpt-oss): expert weights as e2m1 nibbles with an e8m0 scale per 32 values."""
    dtype: torch.dtype = torch.bfloat16
    quant_method: str = "mxfp4"

    def describe(self) -> str:
        return "MXFP4 experts (*_blocks: e2m1 nibbles, *_scales: an e8m0 exponent per 32 values)"

    def derived(self, stored_keys) -> dict[str, tuple[str, ...]]:
        keys = set(stored_keys)
        return {k[: -len("_blocks")]: (k, k[: -len("_blocks")] + "_scales") for k in keys
                if k.endswith("_blocks") and k[: -len("_blocks")] + "_scales" in keys}

    def hidden(self, stored_keys) -> set[str]:
        return set()

    def dequantize(self, blocks: torch.Tensor, scales: torch.Tensor, name: str = "") -> torch.Tensor:
        return dequantize_mxfp4(blocks, scales, self.dtype, name)


def dequantize_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, block, dtype=torch.bfloat16,
                         name: str = "") -> torch.Tensor:
    """[..., R, C] float8 weight * its [..., ceil(R/bm), ceil(C/bn)] block scales, in fp32, rounded once to dtype."""
    rows, cols = weight.shape[-2:]
    bm, bn = block
    grid = (math.ceil(rows / bm), math.ceil(cols / bn))
    if tuple(scale_inv.shape[-2:]) != grid:
        raise SECompressError(f"{name or 'an FP8 weight'} {tuple(weight.shape)} has block scales "
                              f"{tuple(scale_inv.shape)}, not {grid} for weight_block_size {list(block)}: the "
                              f"checkpoint does not match its quantization_config; re-download it")
    if scale_inv.dtype == torch.uint8 or "e8m0" in str(scale_inv.dtype):  # e8m0 exponents (ue8m0 scale_fmt)
        scale = (scale_inv.view(torch.uint8).to(torch.float32) - 127.0).exp2()
    else:
        scale = scale_inv.to(torch.float32)
    scale = scale.repeat_interleave(bm, dim=-2).repeat_interleave(bn, dim=-1)[..., :rows, :cols]
    return (weight.to(torch.float32) * scale).to(dtype)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype=torch.bfloat16, name: str = "") -> torch.Tensor:
    """[E, R, G, 16] uint8 blocks and [E, R, G] uint8 scales -> [E, G*32, R] (transformers' in-memory layout)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or tuple(blocks.shape[:-1]) != tuple(scales.shape) \
            or blocks.shape[-1] != MXFP4_GROUP // 2:
        raise SECompressError(f"{name or 'an MXFP4 tensor'}: blocks {tuple(blocks.shape)} {blocks.dtype} and scales "
                              f"{tuple(scales.shape)} {scales.dtype} are not MXFP4 (uint8 [..., G, 16] and [..., G]); "
                              f"re-download the checkpoint")
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    values = torch.stack([lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]], dim=-1)  # [..., G, 16, 2]
    values = values.reshape(*blocks.shape[:-1], MXFP4_GROUP)                                 # low nibble first
    values = torch.ldexp(values, (scales.to(torch.int32) - 127).unsqueeze(-1)).to(dtype)
    values = values.reshape(*blocks.shape[:-2], blocks.shape[-2] * MXFP4_GROUP)              # [E, R, C]
    return values.transpose(-2, -1).contiguous()


# ---- recognising the format -------------------------------------------------------------------------------------

def _refuse(path: Path, label: str, quant_method) -> SECompressError:
    return SECompressError(
        f"{path} is already quantized ({label}, quant_method '{quant_method}'), a format se_compress does not read: "
        f"pass the original unquantized (bf16/fp16/fp32) checkpoint, or the model's FP8-block (fp8) or MXFP4 (mxfp4) "
        f"release")


def stored_format(path: Path, config: dict | None = None):
    """None (plain weights), Fp8Block or Mxfp4 for the checkpoint folder `path`; any other quantization is refused."""
    path = Path(path)
    if config is None:
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            return None  # Checkpoint.config reports an unreadable config.json in its own words
    qc = config.get("quantization_config") or config.get("compression_config")
    if not qc and (path / "quantize_config.json").exists():  # AutoGPTQ's file, before quantization_config existed
        raise _refuse(path, "GPTQ", "gptq (quantize_config.json)")
    if not qc and (path / "quant_config.json").exists():     # AutoAWQ's file
        raise _refuse(path, "AWQ", "awq (quant_config.json)")
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise _refuse(path, "an unknown format", qc)
    method = str(qc.get("quant_method") or ("compressed-tensors" if "config_groups" in qc else
                                            "bitsandbytes" if qc.get("load_in_4bit") or qc.get("load_in_8bit") else ""))
    dtype = _dtype(config)
    if method == "fp8":
        block = qc.get("weight_block_size")
        if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise _refuse(path, "FP8 without weight_block_size (per-tensor or per-channel scales)", method)
        if str(qc.get("fmt", "e4m3")) != "e4m3":
            raise _refuse(path, f"FP8 {qc.get('fmt')}", method)
        return Fp8Block(tuple(block), dtype)
    if method == "mxfp4":
        return Mxfp4(dtype)
    raise _refuse(path, REFUSED.get(method, "an unknown format"), method or "?")


# ---- the multi-token-prediction layer and rewritten configs -----------------------------------------------------

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


def mtp_layer_keys(stored_keys, config) -> list[str]:
    """Stored keys of layers past the last decoder layer: DeepSeek-V3/R1's multi-token-prediction layer(s)."""
    last = int(config.num_hidden_layers)
    return sorted(k for k in stored_keys if (m := _LAYER_KEY.match(k)) and int(m.group(1)) >= last)


def drop_mtp(config, stored_keys) -> str | None:
    """Set num_nextn_predict_layers to 0 in `config` (edited in place) if the input has MTP layers; what was done."""
    keys = mtp_layer_keys(stored_keys, config)
    count = int(getattr(config, "num_nextn_predict_layers", 0) or 0)
    if not keys and not count:
        return None
    if hasattr(config, "num_nextn_predict_layers"):
        config.num_nextn_predict_layers = 0
    layers = sorted({int(_LAYER_KEY.match(k).group(1)) for k in keys})
    return (f"multi-token-prediction layer{'s' if len(layers) != 1 else ''} {layers or '(none stored)'} of the input "
            f"(num_nextn_predict_layers {count}) not written: num_nextn_predict_layers set to 0 (transformers never "
            f"loads it; vLLM then runs without MTP speculative decoding)")


def rewritten_config(config, ckpt) -> tuple[object, list[str]]:
    """A copy of `config` for a checkpoint written in a new format (merge, quantize, zero: bf16 or compressed-tensors):
    the input's quantization_config is dropped, and so is the MTP layer. Returns (config, notes for the report)."""
    new_config = copy.deepcopy(config)
    notes = []
    fmt = getattr(ckpt, "format", None)
    if fmt is not None:
        if hasattr(new_config, "quantization_config"):
            del new_config.quantization_config
        notes.append(f"input stored as {fmt.describe()} (quant_method {fmt.quant_method}); read dequantized to "
                     f"{str(fmt.dtype).replace('torch.', '')}; this output is written in its own format and does not "
                     f"keep the input's quantization_config")
    mtp = drop_mtp(new_config, getattr(ckpt, "stored_map", {}))
    if mtp:
        notes.append(mtp)
    return new_config, notes
