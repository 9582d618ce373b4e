"""The compressed-tensors `pack-quantized` checkpoint we write: config.json's quantization_config and the on-disk
tensor names. Reading (ours and any other writer's) is models/ct_checkpoint.py, through the library itself.

What loads where (measured here with transformers 5.23 + compressed-tensors 0.20 on CPU, tests check it):
- Routed experts are written per expert (`...experts.{e}.down_proj.weight_packed / weight_scale / weight_shape`).
  transformers merges them into its fused experts by dequantizing at load, using ONE scheme for all experts:
  the first config group with a `re:` target containing "experts" (integrations/compressed_tensors.py,
  get_experts_scheme). So "experts" appears only in the routed-experts groups' regexes; the shared expert's regex
  is spelled `shared_expert[s]` so it never counts as one. It reads no expert zero point: experts must be
  symmetric. Logits then equal our fake-quant model bit for bit (uniform schemes).
- Attention, dense MLPs, shared experts are nn.Linear: compressed-tensors matches them per module, any scheme.
- Layer-wise bit widths (policy `layer`): one experts group per bit width. vLLM picks a scheme per MoE layer;
  transformers 5.23 would decompress every layer's experts with the first group's scheme: not loadable there.
- gpt-oss stores its experts fused on disk, for which compressed-tensors has no per-expert layout that
  transformers 5.23 reads: fake-quant only.
"""
import re

import torch

from ..models.ct_checkpoint import CompressedTensorsCheckpoint
from .pack import pack_int32, pack_zero_point
from .rtn import QuantSpec, Quantized

SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")


def layer_alternation(layers) -> str:
    return "(" + "|".join(str(i) for i in sorted(layers)) + ")"


def _names_regex(names) -> str:
    return "(" + "|".join(re.escape(n) for n in sorted(set(names))) + ")"


def expert_regex(templates, layers=None) -> str:
    """Regex of the per-expert disk keys (without .weight): e.g. re:.*mlp\\.experts\\.\\d+\\.(down_proj|gate_proj|up_proj)$."""
    parents = {t.split(".experts.")[0] for t in templates}
    projs = {t.split("{e}.")[1].rsplit(".weight", 1)[0] for t in templates}
    prefix = rf"layers\.{layer_alternation(layers)}\." if layers is not None else ""
    return rf"re:.*{prefix}{_names_regex(parents)}\.experts\.\d+\.{_names_regex(projs)}$"


def module_regex(relative_names, layers=None) -> str:
    """Regex over names relative to a decoder layer, e.g. self_attn.q_proj; never contains the word 'experts'."""
    alternatives = "|".join(re.escape(n).replace("experts", "expert[s]") for n in sorted(set(relative_names)))
    prefix = rf"layers\.{layer_alternation(layers)}\." if layers is not None else r"layers\.\d+\."
    return rf"re:.*{prefix}({alternatives})$"


def weights_args(spec: QuantSpec, strategy: str) -> dict:
    return {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric, "strategy": strategy,
            "group_size": spec.group_size if strategy == "group" else None, "dynamic": False, "actorder": None,
            "observer": "minmax", "block_structure": None}


def strategy_for(spec: QuantSpec, in_features: list[int]) -> str | None:
    """'channel' when every row is one group, 'group' when every width divides, None when they do not mix."""
    if not spec.group_size or all(n <= spec.group_size for n in in_features):
        return "channel"
    if all(n % spec.group_size == 0 for n in in_features):
        return "group"
    return None


def quantization_config(groups: list[dict], ignore: list[str]) -> dict:
    """groups: [{"name", "targets", "spec", "strategy"}] -> config.json's quantization_config."""
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            g["name"]: {"targets": g["targets"], "weights": weights_args(g["spec"], g["strategy"]),
                        "input_activations": None, "output_activations": None, "format": "pack-quantized"}
            for g in groups
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
    }


def packed_tensors(prefix: str, qt: Quantized) -> dict[str, torch.Tensor]:
    """`prefix` is the disk name without 'weight' (e.g. model.layers.0.self_attn.q_proj.)."""
    rows, cols = qt.q.shape
    out = {prefix + "weight_packed": pack_int32(qt.q, qt.spec.bits),
           prefix + "weight_scale": qt.scale.contiguous(),
           prefix + "weight_shape": torch.tensor([rows, cols], dtype=torch.int64)}
    if qt.zero is not None:
        out[prefix + "weight_zero_point"] = pack_zero_point(qt.zero, qt.spec.bits)
    return out


# Reading: any compressed-tensors checkpoint, ours included, through the library's own matching and decompressors.
PackedCheckpoint = CompressedTensorsCheckpoint
