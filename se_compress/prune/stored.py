"""Writing a pruned checkpoint in the input's stored format (FP8-block, MXFP4): tensors are copied as stored.

Pruning changes no weight: it drops experts and the router rows that point at them. So the output is made from the
stored tensors directly, never from dequantized ones:
  - per-expert keys (`...experts.{e}.<proj>.weight` and its `weight_scale_inv`) of a kept expert: copied byte for
    byte under the expert's new index (kept experts are renumbered 0..E'-1 in their original order);
  - fused per-expert tensors (gpt-oss `experts.gate_up_proj_blocks` [E, 2I, G, 16], `_scales`, `_bias`, ...) and
    the router (`gate.weight`, `router.weight/bias`, DeepSeek-V3 `gate.e_score_correction_bias`): rows of the kept
    experts, selected along dim 0 (the bytes of each kept row are unchanged);
  - everything else (attention, shared experts, dense layers, embeddings, norms): copied as stored;
  - layers past num_hidden_layers (DeepSeek-V3's multi-token-prediction layer): not written, and the config says
    num_nextn_predict_layers 0.
The config keeps its quantization_config; the output is as much smaller as the bytes of the removed experts.
"""
import re
from pathlib import Path

import torch

from ..errors import SECompressError
from ..export.writer import CheckpointWriter

PER_EXPERT = re.compile(r"^(model\.layers\.(\d+)\.[a-z_]+\.experts\.)(\d+)\.(.+)$")
FUSED_EXPERTS = re.compile(r"^model\.layers\.(\d+)\.[a-z_]+\.experts\.[a-z_]+$")
ROUTER = re.compile(r"^model\.layers\.(\d+)\.[a-z_]+\.(gate|router)\.(weight|bias|e_score_correction_bias)$")
LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _layer_of(key: str) -> int:
    m = LAYER.match(key)
    return int(m.group(1)) if m else -1


def write_pruned_stored(ckpt, out, new_config, kept_by_layer: dict[int, list[int]], num_experts: int,
                        extra_files: dict, force: bool, progress: bool = True) -> Path:
    from tqdm.auto import tqdm

    last = int(new_config.num_hidden_layers)
    keys = sorted(ckpt.stored_map, key=lambda k: (_layer_of(k), k))
    with CheckpointWriter(ckpt, out, new_config, force=force) as writer:
        for key in tqdm(keys, desc="copy stored tensors", disable=not progress):
            layer = _layer_of(key)
            if layer >= last:
                continue  # the MTP layer: dropped (num_nextn_predict_layers 0)
            kept = kept_by_layer.get(layer)
            if kept is None:
                writer.add_stored(key, ckpt.get_stored(key))
                continue
            if m := PER_EXPERT.match(key):
                expert = int(m.group(3))
                if expert in kept:
                    writer.add_stored(f"{m.group(1)}{kept.index(expert)}.{m.group(4)}", ckpt.get_stored(key))
                continue
            if FUSED_EXPERTS.match(key) or ROUTER.match(key):
                tensor = ckpt.get_stored(key)
                if tensor.shape[0] != num_experts or key + "_scale_inv" in ckpt.stored_map:
                    raise SECompressError(f"{ckpt.path}: {key} {tuple(tensor.shape)} is not stored one row per expert "
                                          f"({num_experts}): this layout cannot be pruned in its stored format")
                writer.add_stored(key, tensor.index_select(0, torch.tensor(kept, dtype=torch.long)))
                continue
            writer.add_stored(key, ckpt.get_stored(key))
        return writer.finish(extra_files=extra_files)
