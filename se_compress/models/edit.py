"""In-memory edits of one loaded decoder layer (the checkpoint on disk is never touched)."""
import torch

from .adapters import MoEAdapter


@torch.no_grad()
def zero_experts(adapter: MoEAdapter, layer, experts) -> None:
    """Zero the down_proj of the given experts of this layer (ints, or "shared"): the paper's pruning ablation.

    The expert keeps its shape and its routing; its output becomes 0. gpt-oss experts also have a down_proj
    bias, zeroed too, so that the output really is 0.
    """
    moe = adapter.moe_block(layer)
    for e in experts:
        if e == "shared":
            adapter.shared_expert(layer).down_proj.weight.zero_()
            continue
        moe.experts.down_proj[e].zero_()
        if getattr(moe.experts, "has_bias", False):
            moe.experts.down_proj_bias[e].zero_()
