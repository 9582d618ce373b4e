"""config.json against the weights, from the safetensors headers alone (shapes, never data), before any work.

A config.json promising 65 experts where the weights hold 64 ended in `KeyError: '...experts.64.gate_proj.weight'`
after the calibration pass had started; one promising fewer than the weights hold gave another SE set and
"perplexity nan". So what the model is built from is compared with what the files hold:

- hidden size: `model.embed_tokens.weight` is [vocab, hidden], a routed expert's down_proj [hidden, intermediate];
- layer count: every `model.layers.{i}` for i < num_hidden_layers is held (validate.check_weights), and none beyond
  it but DeepSeek's multi-token-prediction layers (`num_nextn_predict_layers`, which transformers does not read);
- the MoE layer pattern: a layer the config makes MoE holds experts, a layer it makes dense holds a dense MLP
  (`first_k_dense_replace`, `decoder_sparse_step`, `mlp_only_layers`);
- routed experts per MoE layer: the distinct expert indices on disk (per-expert keys), or the fused tensor's
  first dimension (gpt-oss), against the config's count;
- the routed experts' intermediate size, and num_experts_per_tok within the expert count;
- attention heads: num_attention_heads / num_key_value_heads x head size against q_proj / k_proj (not DeepSeek's MLA).

A mismatch is one line naming the config key, its value and the tensor's. Stored quantized layouts keep these
shapes: FP8 weights are stored at full shape (the scales beside them), MXFP4 blocks pack 32 inputs per block row.
"""
import json
import re
import struct
from pathlib import Path
from types import SimpleNamespace

from ..errors import SECompressError
from .adapters import ADAPTERS

# The config key of a routed expert's intermediate width, per family (transformers 5.23's config classes).
EXPERT_INTERMEDIATE_KEY = {"qwen3_moe": "moe_intermediate_size", "qwen2_moe": "moe_intermediate_size",
                           "olmoe": "intermediate_size", "mixtral": "intermediate_size",
                           "deepseek_v2": "moe_intermediate_size", "deepseek_v3": "moe_intermediate_size",
                           "gpt_oss": "intermediate_size"}
LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
EXPERT = re.compile(r"^(?:mlp|block_sparse_moe)\.experts\.(\d+)\.")
FUSED = ("mlp.experts.gate_up_proj", "mlp.experts.gate_up_proj_blocks")
DOWN_KEYS = ("mlp.experts.{e}.down_proj.weight", "block_sparse_moe.experts.{e}.w2.weight")


def read_shapes(files) -> dict[str, list[int]]:
    """name -> shape, from the headers of whole safetensors files (checkpoint.check_safetensors_file first)."""
    shapes = {}
    for file in files:
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def _mismatch(key: str, value, tensor: str, shape, what: str) -> SECompressError:
    return SECompressError(f"config.json {key} is {value}, but the weights say {what} ({tensor} has shape {shape}): "
                           f"config.json does not describe these weights; restore the checkpoint's own config.json")


def check_consistency(path: Path, config: dict, shapes: dict[str, list[int]]) -> None:
    """Refuse a config.json that does not describe the tensors in `shapes` (see the module docstring)."""
    model_type = config["model_type"]
    adapter = ADAPTERS[model_type]
    cfg = SimpleNamespace(**config)
    hidden = config.get("hidden_size")
    embed = shapes.get("model.embed_tokens.weight")
    if embed is not None and len(embed) == 2 and embed[1] != hidden:
        raise _mismatch("hidden_size", hidden, "model.embed_tokens.weight", embed, f"hidden size {embed[1]}")

    _check_attention(config, shapes)

    per_layer: dict[int, dict[str, list[int]]] = {}
    for name, shape in shapes.items():
        match = LAYER.match(name)
        if match:
            per_layer.setdefault(int(match.group(1)), {})[match.group(2)] = shape
    num_layers = config["num_hidden_layers"]
    extra = int(config.get("num_nextn_predict_layers") or 0) if model_type == "deepseek_v3" else 0
    beyond = sorted(i for i in per_layer if i >= num_layers + extra)
    if beyond:
        raise SECompressError(f"config.json num_hidden_layers is {num_layers}, but the weights hold layer {beyond[-1]} "
                              f"(model.layers.{beyond[-1]}.*, {max(per_layer) + 1} layers in all): config.json does "
                              f"not describe these weights; restore the checkpoint's own config.json")

    # Every alias present must agree with the weights (transformers maps one onto the other; which one wins
    # depends on the order it sets them).
    count_keys = [k for k in adapter.expert_count_keys if k in config] or [adapter.expert_count_keys[0]]
    count_key = count_keys[0]
    expected_experts = config.get(count_key)
    top_k = config.get("num_experts_per_tok")
    if isinstance(top_k, int) and isinstance(expected_experts, int) and not 1 <= top_k <= expected_experts:
        raise SECompressError(f"config.json num_experts_per_tok is {top_k}, but a token can be routed to 1 to "
                              f"{count_key} ({expected_experts}) experts: fix config.json")
    inter_key = EXPERT_INTERMEDIATE_KEY[model_type]
    for i in range(num_layers):
        keys = per_layer.get(i, {})
        if not keys:
            continue  # validate.check_weights names absent layers
        experts = {int(m.group(1)) for k in keys for m in [EXPERT.match(k)] if m}
        fused = next((k for k in FUSED if k in keys), None)
        holds_experts = bool(experts) or fused is not None
        dense = next((k for k in ("mlp.down_proj.weight",) if k in keys), None)
        if adapter.is_moe_layer(cfg, i) != holds_experts and (holds_experts or dense):
            pattern = _pattern_reason(config, model_type, i)
            tensor = f"model.layers.{i}." + (fused or min(keys, key=lambda k: (not EXPERT.match(k), k)) if holds_experts
                                            else dense)
            said = "an MoE layer" if adapter.is_moe_layer(cfg, i) else "a dense layer"
            held = "experts" if holds_experts else "a dense MLP"
            raise SECompressError(f"config.json {pattern} makes layer {i} {said}, but the weights hold {held} there "
                                  f"({tensor}): config.json does not describe these weights; restore the "
                                  f"checkpoint's own config.json")
        if not holds_experts:
            continue
        if fused is not None:
            held_count, tensor = keys[fused][0], f"model.layers.{i}.{fused}"
        else:
            held_count, tensor = max(experts) + 1, f"model.layers.{i}.*.experts.{max(experts)}.*"
            missing = sorted(set(range(held_count)) - experts)
            if missing:
                raise SECompressError(f"the weights of layer {i} have no tensors for expert {missing[0]} of the "
                                      f"{held_count} they number: the checkpoint is incomplete; re-download it")
        for key in count_keys:
            if config.get(key) != held_count:
                raise SECompressError(f"config.json {key} is {config.get(key)}, but the weights hold {held_count} "
                                      f"routed experts in layer {i} ({tensor}): config.json does not describe these "
                                      f"weights; restore the checkpoint's own config.json")
        _check_expert_widths(config, keys, i, hidden, inter_key)


def _check_attention(config: dict, shapes: dict) -> None:
    """Heads x head size against q_proj / k_proj [out, hidden] of layer 0 (MLA's DeepSeek projections differ and
    are left out): a changed num_attention_heads ran until a Hessian's shape did not match (a traceback)."""
    if config["model_type"].startswith("deepseek"):
        return
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads") or config.get("num_attention_heads")
    if not isinstance(heads, int) or heads < 1:
        return
    head_dim = config.get("head_dim") or config.get("hidden_size", 0) // heads
    for key, count, name in (("num_attention_heads", heads, "q_proj"), ("num_key_value_heads", kv_heads, "k_proj")):
        tensor = f"model.layers.0.self_attn.{name}.weight"
        shape = shapes.get(tensor)
        if shape is not None and isinstance(count, int) and shape[0] != count * head_dim:
            raise _mismatch(key, count, tensor, shape, f"{shape[0]} output rows, not {count} heads x head size "
                            f"{head_dim}")


def _pattern_reason(config: dict, model_type: str, layer: int) -> str:
    """The config key (and value) that decides whether `layer` is MoE: what adapters.is_moe_layer reads."""
    if model_type in ("qwen3_moe", "qwen2_moe"):
        if layer in (config.get("mlp_only_layers") or []):
            return f"mlp_only_layers {config.get('mlp_only_layers')}"
        return f"decoder_sparse_step {config.get('decoder_sparse_step', 1)}"
    if model_type in ("deepseek_v2", "deepseek_v3"):
        return f"first_k_dense_replace {config.get('first_k_dense_replace', 0)}"
    return f"model_type {model_type} (every layer MoE)"


def _check_expert_widths(config: dict, keys: dict, layer: int, hidden, inter_key: str) -> None:
    """A routed expert's down_proj is [hidden, intermediate] on disk (MXFP4 blocks: [E, hidden, intermediate/32, 16];
    gpt-oss bf16: [E, intermediate, hidden], transposed in memory as on disk)."""
    inter = config.get(inter_key)
    for template in DOWN_KEYS:
        name = template.format(e=0)
        if name in keys:
            shape = keys[name]
            found_hidden, found_inter = shape[0], shape[1]
            break
    else:
        if "mlp.experts.down_proj_blocks" in keys:
            name, shape = "mlp.experts.down_proj_blocks", keys["mlp.experts.down_proj_blocks"]
            found_hidden, found_inter = shape[1], shape[2] * shape[3] * 2
        elif "mlp.experts.down_proj" in keys:
            name, shape = "mlp.experts.down_proj", keys["mlp.experts.down_proj"]
            found_hidden, found_inter = shape[2], shape[1]
        else:
            return
    tensor = f"model.layers.{layer}.{name}"
    if found_hidden != hidden:
        raise _mismatch("hidden_size", hidden, tensor, shape, f"hidden size {found_hidden}")
    if found_inter != inter:
        raise _mismatch(inter_key, inter, tensor, shape, f"expert intermediate size {found_inter}")
