"""Tiny random-weight models of every supported architecture, built from the real transformers config
classes, with Super Experts planted where asked. Used by the tests and the memory benchmark.

A planted SE at (layer, expert) writes `strength` into hidden channel `channel` on the BOS token: its router
row points along the BOS token's actual input to that MoE layer (BOS at position 0 sees only itself, so that
vector is the same in every sample), and one neuron of the expert fires along it, with a super weight in
down_proj. `expert="shared"` plants it in the layer's shared expert instead.
"""
from pathlib import Path

import torch


def tiny_config(model_type: str, vocab_size: int, layers: int = 4, experts: int = 16, hidden: int = 32):
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                  tie_word_embeddings=False)
    if model_type == "qwen3_moe":
        return tf.Qwen3MoeConfig(**common, num_key_value_heads=2, head_dim=8, num_experts=experts, num_experts_per_tok=2,
                                 moe_intermediate_size=16, intermediate_size=64, norm_topk_prob=True)
    if model_type == "qwen2_moe":
        return tf.Qwen2MoeConfig(**common, num_key_value_heads=2, num_experts=experts, num_experts_per_tok=2,
                                 moe_intermediate_size=16, intermediate_size=64, shared_expert_intermediate_size=32)
    if model_type == "olmoe":
        return tf.OlmoeConfig(**common, num_key_value_heads=4, num_experts=experts, num_experts_per_tok=2,
                              intermediate_size=16)
    if model_type == "mixtral":
        return tf.MixtralConfig(**common, num_key_value_heads=2, num_local_experts=experts, num_experts_per_tok=2,
                                intermediate_size=16)
    if model_type == "deepseek_v2":
        return tf.DeepseekV2Config(**common, num_key_value_heads=4, n_routed_experts=experts, n_shared_experts=1,
                                   num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=64,
                                   first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8,
                                   qk_rope_head_dim=8, v_head_dim=8, topk_method="greedy", n_group=1, topk_group=1)
    if model_type == "deepseek_v3":
        return tf.DeepseekV3Config(**common, num_key_value_heads=4, n_routed_experts=experts, n_shared_experts=1,
                                   num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=64,
                                   first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8,
                                   qk_rope_head_dim=8, v_head_dim=8, n_group=4, topk_group=2, norm_topk_prob=True)
    if model_type == "gpt_oss":
        return tf.GptOssConfig(**common, num_key_value_heads=2, head_dim=8, num_local_experts=experts,
                               num_experts_per_tok=2, intermediate_size=16, sliding_window=8,
                               layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)])
    raise ValueError(f"no tiny config for {model_type}")


@torch.no_grad()
def _moe_input(model, adapter, layer_idx: int, bos_id: int) -> torch.Tensor:
    captured = {}
    moe = adapter.moe_block(model.model.layers[layer_idx])

    def grab(module, args):
        captured.setdefault("x", args[0].reshape(-1, args[0].shape[-1])[0].clone())

    handle = moe.register_forward_pre_hook(grab)
    model(input_ids=torch.tensor([[bos_id]]))
    handle.remove()
    return captured["x"]


@torch.no_grad()
def plant_super_expert(model, layer_idx: int, expert, channel: int, strength: float = 40.0, bos_id: int = 0) -> None:
    from .models.adapters import adapter_for

    adapter = adapter_for(model.config)
    x = _moe_input(model, adapter, layer_idx, bos_id)
    direction = x / x.norm()
    moe = adapter.moe_block(model.model.layers[layer_idx])
    if expert == "shared":
        mlp = adapter.shared_expert(model.model.layers[layer_idx])
        mlp.gate_proj.weight[0] = direction * 4.0
        mlp.up_proj.weight[0] = direction * 4.0
        mlp.down_proj.weight[:, 0] = 0.0
        mlp.down_proj.weight[channel, 0] = strength
        return
    router = getattr(moe, adapter.router_attr)
    router.weight[expert] = direction * 30.0
    experts = moe.experts
    if experts.is_transposed:  # gpt-oss: [E, H, 2I], gate/up interleaved; [E, I, H]
        experts.gate_up_proj[expert, :, 0] = direction * 4.0
        experts.gate_up_proj[expert, :, 1] = direction * 4.0
        experts.down_proj[expert, 0, :] = 0.0
        experts.down_proj[expert, 0, channel] = strength
    else:  # [E, 2I, H] with gate rows then up rows; [E, H, I]
        inter = experts.down_proj.shape[-1]
        experts.gate_up_proj[expert, 0] = direction * 4.0
        experts.gate_up_proj[expert, inter] = direction * 4.0
        experts.down_proj[expert, :, 0] = 0.0
        experts.down_proj[expert, channel, 0] = strength


def build_tiny_model(model_type: str, out_dir: Path, tokenizer, plants=(), layers: int = 4, experts: int = 16,
                     hidden: int = 32, seed: int = 0, dtype=torch.float32, max_shard_size: str | None = None) -> Path:
    """Save a random tiny model (+ tokenizer) with the planted SEs [(layer, expert, channel), ...]; returns its folder."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(model_type, len(tokenizer), layers, experts, hidden)
    config.bos_token_id = tokenizer.bos_token_id
    model = AutoModelForCausalLM.from_config(config).eval()
    for layer_idx, expert, channel in plants:
        plant_super_expert(model, layer_idx, expert, channel, bos_id=tokenizer.bos_token_id)
    out_dir = Path(out_dir)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.to(dtype).save_pretrained(out_dir, **kwargs)
    tokenizer.save_pretrained(out_dir)
    return out_dir
