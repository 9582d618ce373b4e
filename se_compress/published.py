"""Tiny checkpoints shaped like the published ones of every supported family, with planted Super Experts.

Each fixture's config.json has the keys and structure of the family's published config.json (values shrunk: widths,
layers, experts, token ids), and its weights are stored as the published checkpoint stores them: the same on-disk
key names, dtypes, quantization (FP8 blocks with weight_scale_inv for DeepSeek-V3 and Qwen3-30B-A3B-FP8, MXFP4
blocks/scales for gpt-oss), DeepSeek-V3's multi-token-prediction layer, and sharding into model-XXXXX-of-YYYYY files
with the family's own numbering and a model.safetensors.index.json.

The published configs below were written from our knowledge of the Hub repos (no Hub access from here); each key
is the published one, sizes aside. `fmt="bf16"` writes the same model with every quantized tensor dequantized ahead
of time (the reference the FP8/MXFP4 reader must agree with).

    python -m se_compress.published deepseek_v3 /tmp/dsv3-tiny      # FP8 + MTP, 3 shards, planted SEs
"""
import copy
import json
import math
import tempfile
from pathlib import Path

import torch

from .models.formats import E2M1_VALUES, MXFP4_GROUP, dequantize_fp8_block, dequantize_mxfp4

_QWEN3 = {  # Qwen/Qwen3-30B-A3B
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 40960,
    "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768,
    "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}
PUBLISHED = {
    "Qwen/Qwen3-30B-A3B": _QWEN3,
    "Qwen/Qwen3-30B-A3B-FP8": {**_QWEN3, "quantization_config": {
        "activation_scheme": "dynamic", "modules_to_not_convert": ["lm_head"], "quant_method": "fp8",
        "weight_block_size": [128, 128]}},
    "Qwen/Qwen1.5-MoE-A2.7B": {
        "architectures": ["Qwen2MoeForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
        "intermediate_size": 5632, "max_position_embeddings": 8192, "max_window_layers": 21, "model_type": "qwen2_moe",
        "num_attention_heads": 16, "num_hidden_layers": 24, "num_key_value_heads": 16, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.40.0.dev0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
        "decoder_sparse_step": 1, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
        "num_experts_per_tok": 4, "num_experts": 60, "norm_topk_prob": False, "output_router_logits": False,
        "router_aux_loss_coef": 0.001},
    "allenai/OLMoE-1B-7B-0924": {
        "architectures": ["OlmoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "clip_qkv": None,
        "eos_token_id": 50279, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
        "intermediate_size": 1024, "max_position_embeddings": 4096, "model_type": "olmoe", "norm_topk_prob": False,
        "num_attention_heads": 16, "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 16,
        "num_key_value_heads": 16, "output_router_logits": False, "pad_token_id": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": None, "rope_theta": 10000.0, "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 50304},
    "mistralai/Mixtral-8x7B-v0.1": {
        "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
        "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32, "num_experts_per_tok": 2,
        "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False,
        "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.36.0.dev0",
        "use_cache": True, "vocab_size": 32000},
    "deepseek-ai/DeepSeek-V2-Lite": {
        "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV2Config",
                     "AutoModel": "modeling_deepseek.DeepseekV2Model",
                     "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM"},
        "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
        "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944,
        "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
        "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64,
        "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6,
        "num_hidden_layers": 27, "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
        "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
        "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 102400},
    "deepseek-ai/DeepSeek-V3": {
        "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                     "AutoModel": "modeling_deepseek.DeepseekV3Model",
                     "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
        "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
        "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
        "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
        "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
        "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
        "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "pretraining_tp": 1,
        "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]},
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
        "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
        "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280},
    "openai/gpt-oss-20b": {
        "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
        "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
        "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 2880,
        "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
        "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24,
        "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
        "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                           "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                         "rope_type": "yarn", "truncate": False},
        "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
        "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088},
}

# family -> (published repo, tiny overrides, shard file name for (index from 1, count))
_5 = lambda i, n: f"model-{i:05d}-of-{n:05d}.safetensors"  # noqa: E731
_DEEPSEEK = lambda i, n: f"model-{i:05d}-of-{n:06d}.safetensors"  # noqa: E731  (model-00001-of-000163)
_GPT_OSS = lambda i, n: f"model-{i - 1:05d}-of-{n - 1:05d}.safetensors"  # noqa: E731  (model-00000-of-00002 ...)
_ATTN = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4)
_MLA = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, num_key_value_heads=4,
            intermediate_size=64, moe_intermediate_size=16, first_k_dense_replace=1, num_experts_per_tok=2)
FAMILIES = {
    "qwen3_moe": ("Qwen/Qwen3-30B-A3B", dict(_ATTN, num_key_value_heads=2, head_dim=8, intermediate_size=64,
                                              moe_intermediate_size=16, num_experts=16, num_experts_per_tok=2,
                                              max_window_layers=4), _5),
    "qwen3_moe_fp8": ("Qwen/Qwen3-30B-A3B-FP8", dict(_ATTN, num_key_value_heads=2, head_dim=8, intermediate_size=64,
                                                      moe_intermediate_size=16, num_experts=16, num_experts_per_tok=2,
                                                      max_window_layers=4), _5),
    "qwen2_moe": ("Qwen/Qwen1.5-MoE-A2.7B", dict(_ATTN, num_key_value_heads=4, intermediate_size=64,
                                                  moe_intermediate_size=16, shared_expert_intermediate_size=32,
                                                  num_experts=16, num_experts_per_tok=2, max_window_layers=4), _5),
    "olmoe": ("allenai/OLMoE-1B-7B-0924", dict(_ATTN, num_key_value_heads=4, intermediate_size=16, num_experts=16,
                                               num_experts_per_tok=2), _5),
    "mixtral": ("mistralai/Mixtral-8x7B-v0.1", dict(_ATTN, num_key_value_heads=2, intermediate_size=16), _5),
    "deepseek_v2": ("deepseek-ai/DeepSeek-V2-Lite", dict(_ATTN, **_MLA, n_routed_experts=16), _DEEPSEEK),
    "deepseek_v3": ("deepseek-ai/DeepSeek-V3", dict(_ATTN, **_MLA, q_lora_rank=16, n_routed_experts=16, n_group=4,
                                                    topk_group=2), _DEEPSEEK),
    "gpt_oss": ("openai/gpt-oss-20b", dict(_ATTN, num_key_value_heads=2, head_dim=8, intermediate_size=32,
                                           num_local_experts=16, num_experts_per_tok=2, experts_per_token=2,
                                           sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2),
                _GPT_OSS),
}
# FP8 blocks shrunk with the widths (published: 128 x 128) so that the tiny matrices hold several blocks, and
# DeepSeek's kv_a_proj_with_mqa (kv_lora_rank + qk_rope_head_dim rows) ends in a partial block, as 576 does in V3.
TINY_FP8_BLOCK = [16, 16]
SHARDS = 3


def tiny_published_config(family: str, vocab_size: int, bos: int, eos: int, pad: int) -> dict:
    repo, overrides, _ = FAMILIES[family]
    config = copy.deepcopy(PUBLISHED[repo])
    for key, value in overrides.items():
        assert key in config or key in ("head_dim", "q_lora_rank"), (family, key)  # only published keys
        config[key] = value
    config["vocab_size"] = vocab_size
    for key, value in (("bos_token_id", bos), ("eos_token_id", eos), ("pad_token_id", pad)):
        if key in config:
            config[key] = value
    if "quantization_config" in config and config["quantization_config"]["quant_method"] == "fp8":
        config["quantization_config"]["weight_block_size"] = list(TINY_FP8_BLOCK)
    return config


# ---- quantizing the way the published checkpoints are stored ----------------------------------------------------

def quantize_fp8_block(weight: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, C] -> (float8_e4m3fn [R, C], fp32 weight_scale_inv [ceil(R/bm), ceil(C/bn)]): scale = block amax / 448."""
    rows, cols = weight.shape
    bm, bn = block
    w = weight.float()
    padded = torch.zeros(math.ceil(rows / bm) * bm, math.ceil(cols / bn) * bn)
    padded[:rows, :cols] = w
    amax = padded.reshape(padded.shape[0] // bm, bm, padded.shape[1] // bn, bn).abs().amax(dim=(1, 3))
    scale = (amax / torch.finfo(torch.float8_e4m3fn).max).clamp(min=1e-12)
    full = scale.repeat_interleave(bm, 0).repeat_interleave(bn, 1)[:rows, :cols]
    return (w / full).to(torch.float8_e4m3fn), scale


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, R, C] (C a multiple of 32) -> (uint8 blocks [E, R, C/32, 16], uint8 e8m0 scales [E, R, C/32]): OCP MX,
    shared exponent floor(log2(amax)) - 2, elements rounded to the nearest e2m1 value."""
    *lead, cols = weight.shape
    groups = weight.float().reshape(*lead, cols // MXFP4_GROUP, MXFP4_GROUP)
    amax = groups.abs().amax(dim=-1)
    exponent = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp(min=2.0 ** -126))) - 2, torch.full_like(amax, -127))
    exponent = exponent.clamp(-127, 127)
    scaled = groups / torch.exp2(exponent).unsqueeze(-1)
    table = torch.tensor(E2M1_VALUES[:8])
    magnitude = (scaled.abs().unsqueeze(-1) - table).abs().argmin(dim=-1)  # nearest of 0 .. 6
    nibbles = (magnitude | ((scaled < 0).long() << 3)).to(torch.uint8)
    blocks = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    return blocks.contiguous(), (exponent + 127).to(torch.uint8)


def _fp8_target(key: str, tensor: torch.Tensor, modules_to_not_convert) -> bool:
    """The Linear weights the published FP8 checkpoints store in FP8: every *_proj weight of the decoder layers
    (attention incl. kv_a_proj_with_mqa, dense and expert MLPs, shared experts, MTP's eh_proj); not routers, norms, embeddings."""
    module = key[: -len(".weight")]
    return (key.startswith("model.layers.") and key.endswith(".weight") and "_proj" in module.rsplit(".", 1)[-1]
            and tensor.dim() == 2
            and not any(module == m or module.startswith(m + ".") for m in modules_to_not_convert))


# ---- writing ------------------------------------------------------------------------------------------------------

def _layer(key: str) -> int:
    parts = key.split(".")
    return int(parts[2]) if key.startswith("model.layers.") else (-1 if "embed" in key else 10 ** 6)


def _write_shards(out: Path, tensors: dict, name) -> None:
    from safetensors.torch import save_file

    keys = sorted(tensors, key=lambda k: (_layer(k), k))
    per = math.ceil(len(keys) / SHARDS)
    weight_map, total = {}, 0
    for i in range(SHARDS):
        part = keys[i * per: (i + 1) * per]
        filename = name(i + 1, SHARDS)
        save_file({k: tensors[k].contiguous() for k in part}, str(out / filename), metadata={"format": "pt"})
        weight_map.update({k: filename for k in part})
        total += sum(tensors[k].numel() * tensors[k].element_size() for k in part)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=2))


def _mtp_layer(tensors: dict, config) -> dict:
    """DeepSeek-V3's MTP layer as stored: model.layers.{L}.* with a whole decoder layer (attention + MoE, here a
    copy of layer L-1's tensors with their own random values) and enorm, hnorm, eh_proj, embed_tokens, shared_head."""
    last, hidden, vocab = config.num_hidden_layers, config.hidden_size, config.vocab_size
    prefix, source = f"model.layers.{last}.", f"model.layers.{last - 1}."
    g = torch.Generator().manual_seed(61)
    mtp = {}
    for key, value in tensors.items():
        if key.startswith(source):
            noise = torch.randn(value.shape, generator=g) * 0.02
            mtp[prefix + key[len(source):]] = (value.float() + noise).to(value.dtype) if value.dim() > 1 else value.clone()
    mtp[prefix + "enorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    mtp[prefix + "hnorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    mtp[prefix + "eh_proj.weight"] = (torch.randn(hidden, 2 * hidden, generator=g) * 0.02).to(torch.bfloat16)
    mtp[prefix + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    mtp[prefix + "shared_head.norm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    mtp[prefix + "shared_head.head.weight"] = (torch.randn(vocab, hidden, generator=g) * 0.02).to(torch.bfloat16)
    return mtp


def build_published_fixture(family: str, out_dir, tokenizer, plants=(), seed: int = 0, fmt: str = "published") -> Path:
    """Write the tiny `family` checkpoint (see FAMILIES) with planted SEs [(layer, expert|'shared', channel)] to
    out_dir. fmt 'published': as the published checkpoint stores it; 'bf16': the same weights, every quantized tensor
    dequantized ahead of time, stored in bf16 without quantization_config (MTP layer kept)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from .synthetic import plant_super_expert

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    repo, _, shard_name = FAMILIES[family]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config_dict = tiny_published_config(family, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, pad)
    (out / "config.json").write_text(json.dumps(config_dict, indent=2))
    config = AutoConfig.from_pretrained(out)  # transformers reads the published structure as is
    build_config = copy.deepcopy(config)
    if hasattr(build_config, "quantization_config"):
        del build_config.quantization_config  # build in bf16; the stored format is written below
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(build_config).eval()
    for layer_idx, expert, channel in plants:
        plant_super_expert(model, layer_idx, expert, channel, bos_id=tokenizer.bos_token_id)
    with tempfile.TemporaryDirectory() as tmp:
        model.to(torch.bfloat16).save_pretrained(tmp)  # transformers' own on-disk names (the published ones)
        tensors = {}
        for f in sorted(Path(tmp).glob("*.safetensors")):
            tensors.update(load_file(str(f)))
    for key in [k for k in tensors if k.endswith("e_score_correction_bias")]:
        tensors[key] = tensors[key].float()  # DeepSeek-V3 stores it in fp32
    if int(config_dict.get("num_nextn_predict_layers", 0) or 0):
        tensors.update(_mtp_layer(tensors, config))
    qc = config_dict.get("quantization_config") or {}
    if qc.get("quant_method") == "fp8":
        block = qc["weight_block_size"]
        for key in [k for k in tensors if _fp8_target(k, tensors[k], qc.get("modules_to_not_convert") or [])]:
            q, scale = quantize_fp8_block(tensors[key], block)
            if fmt == "bf16":
                tensors[key] = dequantize_fp8_block(q, scale, block, torch.bfloat16)
            else:
                tensors[key], tensors[key + "_scale_inv"] = q, scale
    elif qc.get("quant_method") == "mxfp4":
        for key in [k for k in tensors if k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))]:
            blocks, scales = quantize_mxfp4(tensors.pop(key).transpose(1, 2))  # stored [E, out, in/32, 16]
            if fmt == "bf16":
                tensors[key] = dequantize_mxfp4(blocks, scales, torch.bfloat16)
            else:
                tensors[key + "_blocks"], tensors[key + "_scales"] = blocks, scales
    if fmt == "bf16":
        config_dict.pop("quantization_config", None)
        (out / "config.json").write_text(json.dumps(config_dict, indent=2))
    _write_shards(out, tensors, shard_name)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv=None) -> int:
    import argparse

    from transformers import AutoTokenizer

    from .models.checkpoint import DEFAULT_MODEL_DIR

    parser = argparse.ArgumentParser(description="write a tiny checkpoint shaped like a published one, with planted "
                                                 "Super Experts at (2, 5) channel 7 (and the shared expert of layer 3)")
    parser.add_argument("family", choices=sorted(FAMILIES))
    parser.add_argument("out")
    parser.add_argument("--bf16", action="store_true", help="dequantized ahead of time, no quantization_config")
    args = parser.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    plants = [(2, 5, 7)] + ([(3, "shared", 11)] if family_has_shared(args.family) else [])
    path = build_published_fixture(args.family, args.out, tokenizer, plants, fmt="bf16" if args.bf16 else "published")
    print(f"written: {path} ({FAMILIES[args.family][0]} layout)")
    return 0


def family_has_shared(family: str) -> bool:
    return family in ("qwen2_moe", "deepseek_v2", "deepseek_v3")


if __name__ == "__main__":
    raise SystemExit(main())
