"""Which experts are Super Experts, where their super weights are, which tokens trigger them, and what each
SE policy does to them.

Policies (combinable; `none` alone is the naive baseline):
- noclip: SE experts get no clip search, and each group holding a super weight is scaled so that weight is on
  the grid (rtn.py). One uniform format: deploys everywhere.
- calib:  the inputs of the SE's trigger tokens (sequence starts, or the delimiter id the detector reports) get a
  fixed share of the SE expert's Hessians (GPTQ), and are added even when routing would not send them there.
- layer:  every expert (and the shared expert) of an MoE layer holding an SE gets `layer_bits` (16: bf16).
  vLLM takes one scheme per MoE layer, so this deploys there; transformers 5.23 applies the first experts scheme
  to all layers, so it does not load there.
- keep:   the SE experts alone stay bf16: per-expert mixed precision, which neither vLLM nor transformers loads
  from a quantized checkpoint; written as fake-quant (dequantized) weights and labelled so.
"""
from dataclasses import dataclass, field

import torch

from ..errors import SECompressError

POLICIES = ("none", "noclip", "calib", "layer", "keep")
KEEP_BITS = 16


def parse_policy(se_policy) -> frozenset:
    items = [p.strip() for p in se_policy.split(",")] if isinstance(se_policy, str) else list(se_policy or ["none"])
    items = [p for p in items if p] or ["none"]
    unknown = [p for p in items if p not in POLICIES]
    if unknown:
        raise SECompressError(f"unknown SE policy '{unknown[0]}': use a comma list of {', '.join(POLICIES[1:])}, or none")
    if "none" in items and len(set(items)) > 1:
        raise SECompressError("SE policy 'none' (no SE handling) cannot be combined with others: drop 'none'")
    return frozenset(p for p in items if p != "none")


@dataclass(frozen=True)
class SuperExpert:
    layer: int
    expert: object  # int, or "shared"
    channel: int
    token_id: int | None
    position: int | None


def super_experts_from_report(report: dict, config, adapter) -> list[SuperExpert]:
    if not isinstance(report, dict) or not isinstance(report.get("super_experts"), list):
        raise SECompressError("the SE report has no 'super_experts' list: pass the se_report.json written by se-compress detect")
    num_layers, num_experts = config.num_hidden_layers, adapter.num_experts(config)
    if report.get("architecture") not in (None, config.model_type):
        raise SECompressError(f"the SE report is for a {report['architecture']} model, this is {config.model_type}: "
                              f"run se-compress detect on this model")
    out = []
    for s in report["super_experts"]:
        layer, expert = int(s["layer"]), s["expert"]
        bad_expert = expert != "shared" and not (isinstance(expert, int) and 0 <= expert < num_experts)
        if not 0 <= layer < num_layers or bad_expert or not adapter.is_moe_layer(config, layer):
            raise SECompressError(f"the SE report names expert ({layer},{expert}), which this model does not have: "
                                  f"the report belongs to another model; run se-compress detect on this one")
        if not 0 <= int(s["channel"]) < config.hidden_size:
            raise SECompressError(f"the SE report's channel {s['channel']} is outside hidden size {config.hidden_size}: "
                                  f"the report belongs to another model")
        out.append(SuperExpert(layer, expert, int(s["channel"]), s.get("token_id"), s.get("position")))
    return out


def super_weight_mask(down: torch.Tensor, channel: int, k: int = 3, outlier: float = 10.0) -> torch.Tensor:
    """Super weights of an SE's down_proj [H, I] (Linear orientation): the largest |w| of the SE's output channel
    row, up to k of them, each at least a quarter of that row's largest and `outlier` x the matrix's RMS. Bool [H, I].

    An SE whose row holds no such outlier gets none: its huge output comes from a huge intermediate activation
    (which `calib` puts into the Hessian), and pinning an ordinary weight to the grid would only coarsen its group.
    """
    row = down[channel].float().abs()
    rms = down.float().pow(2).mean().sqrt().item()
    values, cols = row.topk(min(k, row.numel()))
    mask = torch.zeros(down.shape, dtype=torch.bool, device=down.device)
    top = values[0].item()
    for v, c in zip(values.tolist(), cols.tolist()):
        if v >= 0.25 * top and v >= outlier * rms:
            mask[channel, c] = True
    return mask


def trigger_mask(input_ids: torch.Tensor, ses: list[SuperExpert]) -> torch.Tensor:
    """Tokens that trigger the SEs [B, L]: every sequence start when an SE fires at position 0, and every
    occurrence of the reported token id when it fires later (a delimiter)."""
    mask = torch.zeros(input_ids.shape, dtype=torch.bool)
    for s in ses:
        if s.position == 0 or s.position is None:
            mask[:, 0] = True
        elif s.token_id is not None:
            mask |= input_ids == int(s.token_id)
    return mask


@dataclass
class Plan:
    policy: frozenset
    bits: int
    layer_bits: int
    ses: list[SuperExpert]
    se_keys: set = field(init=False)
    se_layers: set = field(init=False)

    def __post_init__(self):
        self.se_keys = {(s.layer, s.expert) for s in self.ses}
        self.se_layers = {s.layer for s in self.ses}

    def expert_bits(self, layer: int, expert) -> int:
        """Bit width of a routed expert (int) or the shared expert ("shared") of an MoE layer; 16 = kept bf16."""
        if "keep" in self.policy and (layer, expert) in self.se_keys:
            return KEEP_BITS
        if "layer" in self.policy and layer in self.se_layers:
            return self.layer_bits
        return self.bits

    def is_se(self, layer: int, expert) -> bool:
        return (layer, expert) in self.se_keys

    def noclip(self, layer: int, expert) -> bool:
        return "noclip" in self.policy and self.is_se(layer, expert)

    def calib(self, layer: int, expert) -> bool:
        return "calib" in self.policy and self.is_se(layer, expert)

    def channels(self, layer: int, expert) -> list[int]:
        return sorted({s.channel for s in self.ses if (s.layer, s.expert) == (layer, expert)})

    def mixed_layers(self) -> bool:
        return "layer" in self.policy and bool(self.se_layers) and self.layer_bits != self.bits

    def keeps_experts(self) -> bool:
        return "keep" in self.policy and bool(self.ses)
