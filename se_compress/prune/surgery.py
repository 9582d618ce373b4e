"""Changing the expert count of one loaded decoder layer in memory: keep some experts, or mix them into fewer.

Every tensor that has one entry per routed expert is changed along its first dimension, together:
  experts: gate_up_proj [E, 2I, H] (gpt-oss [E, H, 2I]), down_proj [E, H, I] (gpt-oss [E, I, H]),
           gpt-oss also gate_up_proj_bias [E, 2I] and down_proj_bias [E, H];
  router:  weight [E, H], gpt-oss bias [E], DeepSeek-V3 e_score_correction_bias [E] (a buffer).
The checkpoint writer turns a fused [E', ...] tensor into per-expert keys 0..E'-1, so the result is renumbered.
"""
import torch
from torch import nn


def _per_expert_tensors(adapter, layer):
    """(module, name, is_buffer) for every tensor of the MoE block indexed by routed expert on dim 0."""
    moe = adapter.moe_block(layer)
    router = getattr(moe, adapter.router_attr)
    found = []
    for module in (moe.experts, router):
        for name, tensor in module._parameters.items():
            if tensor is not None:
                found.append((module, name, False))
        for name, tensor in module._buffers.items():
            if tensor is not None and name not in module._non_persistent_buffers_set:
                found.append((module, name, True))
    return found, moe.experts, router


def _set(module, name: str, value: torch.Tensor, is_buffer: bool) -> None:
    if is_buffer:
        module._buffers[name] = value
    else:
        module._parameters[name] = nn.Parameter(value, requires_grad=False)


def _set_count(experts, router, count: int) -> None:
    for module in (experts, router):
        if hasattr(module, "num_experts"):
            module.num_experts = count


@torch.no_grad()
def keep_experts(adapter, layer, kept: list[int]) -> None:
    """Keep only the routed experts `kept` (original indices, in the new order); the rest are gone."""
    tensors, experts, router = _per_expert_tensors(adapter, layer)
    num_experts = experts.down_proj.shape[0]
    index = torch.tensor(kept, dtype=torch.long)
    for module, name, is_buffer in tensors:
        tensor = getattr(module, name)
        assert tensor.shape[0] == num_experts, f"{name} {tuple(tensor.shape)} is not per expert"
        _set(module, name, tensor.detach().index_select(0, index).clone(), is_buffer)
    _set_count(experts, router, len(kept))


@torch.no_grad()
def mix_experts(adapter, layer, expert_mix: torch.Tensor, router_mix: torch.Tensor) -> None:
    """New expert j = sum_e expert_mix[j, e] * old expert e (every weight and bias); router row / bias j likewise with
    router_mix. Both [E', E], rows summing to 1: a merge of clusters into one expert each."""
    tensors, experts, router = _per_expert_tensors(adapter, layer)
    num_experts = experts.down_proj.shape[0]
    for module, name, is_buffer in tensors:
        tensor = getattr(module, name).detach()
        assert tensor.shape[0] == num_experts, f"{name} {tuple(tensor.shape)} is not per expert"
        mix = expert_mix if module is experts else router_mix
        mixed = torch.tensordot(mix.to(torch.float64), tensor.to(torch.float64), dims=([1], [0]))  # [E', ...]
        _set(module, name, mixed.to(tensor.dtype).contiguous(), is_buffer)
    _set_count(experts, router, expert_mix.shape[0])
