"""Where each MoE family keeps its parts, in transformers 5.23.

In memory every family stores a layer's routed experts fused: `experts.gate_up_proj` [E, 2I, H] and
`experts.down_proj` [E, H, I] (gpt-oss: transposed, [E, H, 2I] and [E, I, H], gate/up interleaved, with
biases). On disk most families keep one 2-D tensor per expert; `disk_expert_keys` says how they are named.
"""
from dataclasses import dataclass, field

from ..errors import SECompressError


@dataclass(frozen=True)
class MoEAdapter:
    model_type: str
    expert_count_keys: tuple[str, ...]      # every config alias of the routed-expert count
    moe_attr: str = "mlp"                    # decoder_layer.<moe_attr> is the MoE block
    router_attr: str = "gate"                # moe_block.<router_attr> is the router
    shared_attr: str | None = None           # moe_block.<shared_attr> is the shared expert (an MLP)
    shared_gate_attr: str | None = None      # sigmoid gate on the shared expert (Qwen2-MoE)
    scoring: str = "softmax_topk"            # how the router scores experts (see router_scoring)
    # On-disk per-expert key templates relative to the layer prefix, (gate, up, down); None: fused on disk.
    disk_expert_keys: tuple[str, str, str] | None = (
        "mlp.experts.{e}.gate_proj.weight",
        "mlp.experts.{e}.up_proj.weight",
        "mlp.experts.{e}.down_proj.weight",
    )
    disk_renames: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (disk substring, memory substring)

    def num_experts(self, config) -> int:
        return int(getattr(config, self.expert_count_keys[0]))

    def set_num_experts(self, config, count: int) -> None:
        for key in self.expert_count_keys:
            setattr(config, key, count)

    def is_moe_layer(self, config, layer_idx: int) -> bool:
        if self.model_type in ("qwen3_moe", "qwen2_moe"):
            step = getattr(config, "decoder_sparse_step", 1) or 1
            return layer_idx not in (getattr(config, "mlp_only_layers", None) or []) and (layer_idx + 1) % step == 0
        if self.model_type in ("deepseek_v2", "deepseek_v3"):
            return layer_idx >= (getattr(config, "first_k_dense_replace", 0) or 0)
        return True

    def router_scoring(self, config) -> str:
        if self.model_type == "deepseek_v3" or self.scoring == "sigmoid_group":
            return "sigmoid + e_score_correction_bias, group-limited top-k (n_group=%s, topk_group=%s)" % (
                getattr(config, "n_group", None), getattr(config, "topk_group", None))
        if self.model_type == "deepseek_v2":
            return "softmax, %s top-k" % getattr(config, "topk_method", "greedy")
        if self.model_type == "gpt_oss":
            return "top-k of logits (with bias), softmax over the k"
        return "softmax top-k" + (", renormalized" if getattr(config, "norm_topk_prob", False) else "")

    def moe_block(self, layer):
        return getattr(layer, self.moe_attr)

    def shared_expert(self, layer):
        return getattr(self.moe_block(layer), self.shared_attr) if self.shared_attr else None


ADAPTERS = {
    a.model_type: a
    for a in [
        MoEAdapter("qwen3_moe", ("num_experts", "num_local_experts")),
        MoEAdapter("qwen2_moe", ("num_experts",), shared_attr="shared_expert", shared_gate_attr="shared_expert_gate"),
        MoEAdapter("olmoe", ("num_experts", "num_local_experts")),
        MoEAdapter(
            "mixtral",
            ("num_local_experts", "num_experts"),
            disk_expert_keys=(
                "block_sparse_moe.experts.{e}.w1.weight",
                "block_sparse_moe.experts.{e}.w3.weight",
                "block_sparse_moe.experts.{e}.w2.weight",
            ),
            disk_renames=((".block_sparse_moe.", ".mlp."),),
        ),
        MoEAdapter("deepseek_v2", ("n_routed_experts", "num_experts"), shared_attr="shared_experts"),
        MoEAdapter("deepseek_v3", ("n_routed_experts", "num_local_experts"), shared_attr="shared_experts",
                   scoring="sigmoid_group"),
        MoEAdapter("gpt_oss", ("num_local_experts", "num_experts"), router_attr="router", disk_expert_keys=None),
    ]
}


def adapter_for(config) -> MoEAdapter:
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise SECompressError(
            f"unsupported architecture '{model_type}': se_compress supports {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]
