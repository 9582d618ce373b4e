"""Calibration Hessians H = sum x x^T of every matrix GPTQ quantizes, and the expert coverage rule.

Linear modules (attention, dense MLPs, shared experts) get a forward pre-hook. The fused routed experts have no
per-expert module to hook, so `collecting_experts_forward` is registered as a transformers experts
implementation: it runs the grouped expert forward of models/expert_forward.py (the eager loop's math, to fp32
rounding: the layer's output, and so the next layer's inputs, follow the real routing) and accumulates the
Hessians from each expert's inputs as they are computed:

- expert_calibration="all" (default, as llm-compressor's moe_calibrate_all_experts): every calibration token
  goes through every expert. The gate/up input Hessian is then the same for all experts of a layer (computed
  once); each expert's down_proj Hessian comes from its own activations of all tokens. No expert lacks data.
- expert_calibration="routed": each expert sees only the tokens routed to it; an expert with fewer than
  `min_tokens` falls back to round-to-nearest (with a warning in the report).

Trigger tokens (policy `calib`): for SE experts the inputs of the trigger tokens are accumulated apart (also in
"routed" mode, routed or not) and mixed in with a fixed share `trigger_weight` of the Hessian's trace.
"""
import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from .. import distributed as dist
from ..models.expert_forward import expert_down, expert_intermediate, expert_weights, routed_experts_forward  # noqa: F401
from ..models.placement import current

IMPLEMENTATION = "se_compress_quant_collect"


class HessianSum:
    """The accumulator of one Hessian: add(x) per calibration batch, reduce() across ranks, final() for GPTQ.

    H = sum over batches b of X_b^T X_b. Each batch's product is computed in the placement's stats dtype (fp32, GPTQ's
    reference precision) and added into a float64 running sum; the token mean is rounded to fp32 once, at the end.
    Why float64: fp32 partial products (24-bit mantissas) add up exactly in float64 (53 bits) while they lie within
    about 2^(29 - log2 batches) of each other, and otherwise with an error far below fp32's last bit; so the sum
    hardly depends on the order of the batches, and after the one rounding to fp32 N processes that each add their
    own batches and then sum the ranks in a fixed order give the one-process Hessian bit for bit, unless an entry
    lands on a rounding tie (none in tests/test_distributed.py; issue 21: same bytes for any N).
    Triggers (policy `calib`): the trigger rows' X^T X is kept apart the same way."""

    def __init__(self, dim: int, track_triggers: bool = False):
        self.dim, self.dtype = dim, current().stats_dtype
        self.H = None  # float64, created on the first inputs' device
        self.n = 0
        self.track_triggers = track_triggers
        self.Ht = None
        self.nt = 0

    def _zeros(self, device) -> torch.Tensor:
        return torch.zeros(self.dim, self.dim, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor, trigger: torch.Tensor | None = None) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.dtype)
        if self.H is None:
            self.H = self._zeros(x.device)
        self.H += x.T @ x
        self.n += x.shape[0]
        if self.track_triggers and trigger is not None and trigger.any():
            self.add_triggers(x[trigger.to(x.device)])

    def add_triggers(self, xt: torch.Tensor) -> None:
        xt = xt.to(self.dtype)
        if self.Ht is None:
            self.Ht = self._zeros(xt.device)
        self.Ht += xt.T @ xt
        self.nt += xt.shape[0]

    def final(self, trigger_weight: float = 0.0) -> torch.Tensor:
        """The Hessian GPTQ uses: the token mean, with the triggers' share of the trace set to trigger_weight."""
        if self.H is None:  # no input at all: an all-zero Hessian (every column dead)
            return torch.zeros(self.dim, self.dim, dtype=self.dtype, device=current().device)
        H = self.H / max(self.n, 1)
        if trigger_weight > 0 and self.Ht is not None and self.nt > 0:
            Ht = self.Ht / max(self.nt, 1)
            H = (1 - trigger_weight) * H / H.trace().clamp(min=1e-30) + trigger_weight * Ht / Ht.trace().clamp(min=1e-30)
        return H.to(self.dtype)

    result = final

    def take(self, trigger_weight: float = 0.0) -> torch.Tensor:
        """final(), after which the float64 sums are dropped: the solve needs only the fp32 Hessian, and a
        Qwen3-30B-A3B layer's 128 down_proj sums are 0.6 GiB (issue 19: peak RSS)."""
        H = self.final(trigger_weight)
        self.H = self.Ht = None
        return H


def reduce_hessians(sums, collector=None) -> None:
    """Every rank's HessianSums (and an ExpertCollector's, with its routing counts) summed, in place, the same on
    every rank: the float64 matrices are gathered and added in rank order (see HessianSum). One process: nothing."""
    if not dist.active():
        return
    sums = list(sums)
    if collector is not None:
        sums += ([collector.shared_in] if collector.shared_in is not None else [])
        sums += [collector.expert_in[e] for e in sorted(collector.expert_in)]
        sums += [collector.down[e] for e in sorted(collector.down)]
        collector.count = dist.sum_in_rank_order(collector.count)
    if not sums:
        return
    where = next((m.device for s in sums for m in (s.H, s.Ht) if m is not None), current().device)
    for s in sums:  # a sum that saw no input on this rank has no matrix yet: it adds zeros
        if s.H is None:
            s.H = s._zeros(where)
        if s.track_triggers and s.Ht is None:
            s.Ht = s._zeros(where)
    counts = dist.sum_in_rank_order(torch.tensor([[s.n, s.nt] for s in sums], dtype=torch.long))
    for s, (n, nt) in zip(sums, counts.tolist()):
        s.n, s.nt = n, nt
    matrices = [m for s in sums for m in (s.H, s.Ht) if m is not None]
    for group in dist.groups_of(matrices, budget=1 << 24):  # float64 elements per exchange (128 MB)
        total = dist.sum_in_rank_order(torch.cat([m.reshape(-1) for m in group]))
        offset = 0
        for m in group:
            m.copy_(total[offset: offset + m.numel()].view_as(m))
            offset += m.numel()


def linear_hooks(modules: dict[str, nn.Linear], sums: dict[str, HessianSum], trigger_ref: dict):
    """Pre-hooks adding each Linear's inputs to sums[name]; trigger_ref["mask"] holds the current batch's triggers."""
    handles = []
    for name, module in modules.items():
        def hook(mod, args, name=name):
            sums[name].add(args[0], trigger_ref.get("mask"))
        handles.append(module.register_forward_pre_hook(hook))
    return handles


class ExpertCollector:
    """Hessians of one layer's routed experts. `trigger_ref["mask"]`: trigger tokens of the current batch [T]."""

    def __init__(self, experts, mode: str, calib_experts: set[int], trigger_ref: dict):
        self.mode, self.calib_experts, self.trigger_ref = mode, set(calib_experts), trigger_ref
        E = experts.num_experts
        gate_up, down = expert_weights(experts, 0)
        hidden, inter = gate_up.shape[1], down.shape[1]
        self.count = torch.zeros(E, dtype=torch.long)  # tokens routed to each expert (host: small)
        if mode == "all":
            self.shared_in = HessianSum(hidden, track_triggers=bool(calib_experts))
            self.expert_in = {}
        else:
            self.shared_in = None
            self.expert_in = {e: HessianSum(hidden, e in self.calib_experts) for e in range(E)}
        self.down = {e: HessianSum(inter, e in self.calib_experts) for e in range(E)}

    def input_hessian(self, e: int) -> HessianSum:
        return self.shared_in if self.mode == "all" else self.expert_in[e]

    def tokens(self, e: int) -> int:
        return self.input_hessian(e).n if self.mode == "all" else int(self.count[e])


def collecting_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    col: ExpertCollector = self.se_quant_collector
    trig = col.trigger_ref.get("mask")
    trig = trig if trig is not None and trig.any() else None
    if col.mode == "all":
        col.shared_in.add(hidden_states, trig)

        def on_input(e, x, h):  # h: expert e's down_proj input for every token of the batch
            col.down[e].add(h, trig if e in col.calib_experts else None)
    else:
        def on_input(e, x, h):  # x, h: the tokens routed to e and their down_proj input
            col.expert_in[e].add(x)
            col.down[e].add(h)

    final, groups = routed_experts_forward(self, hidden_states, top_k_index, top_k_weights,
                                           all_tokens=col.mode == "all", on_input=on_input)
    col.count += torch.tensor(groups.bounds[1:]) - torch.tensor(groups.bounds[:-1])
    if col.mode != "all" and trig is not None:  # SE experts see the trigger tokens, routed to them or not
        xt = hidden_states[trig.to(hidden_states.device)]
        for e in (e for e in range(self.num_experts) if e in col.calib_experts):
            col.expert_in[e].add_triggers(xt)
            col.down[e].add_triggers(expert_intermediate(self, e, xt))
    return final


ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, collecting_experts_forward)


class use_collector:
    """Route `experts` through collecting_experts_forward with `collector` attached: open() ... close(), or a context."""

    def __init__(self, experts, collector: ExpertCollector):
        self.experts, self.collector, self.saved = experts, collector, None

    def open(self) -> ExpertCollector:
        self.saved = self.experts.config._experts_implementation
        self.experts.se_quant_collector = self.collector
        self.experts.config._experts_implementation = IMPLEMENTATION
        return self.collector

    def close(self) -> None:
        self.experts.config._experts_implementation = self.saved
        del self.experts.se_quant_collector

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()
        return False


class TriggerMask:
    """Accumulator that tells the Hessian sums which tokens of the batch about to run are trigger tokens (policy
    `calib`): trigger_ref["mask"] <- the batch's rows of `triggers` [N, L], flattened, where the layer computes."""

    def __init__(self, triggers: torch.Tensor, batch_size: int, trigger_ref: dict):
        self.triggers, self.batch_size, self.trigger_ref = triggers, batch_size, trigger_ref

    def begin(self, place) -> None:
        first = place.index * self.batch_size
        self.trigger_ref["mask"] = current().to_compute(self.triggers[first: first + self.batch_size].reshape(-1))


class HessianHooks:
    """Accumulator of one collection round: the Linear modules' inputs into their HessianSums (forward pre-hooks) and,
    given a layer's experts, their inputs into `collector` (collecting_experts_forward). close() takes both off."""

    def __init__(self, linears: dict[str, nn.Linear], sums: dict[str, HessianSum], trigger_ref: dict, experts=None,
                 collector: ExpertCollector | None = None):
        self.handles = linear_hooks(linears, sums, trigger_ref)
        self.using = use_collector(experts, collector) if experts is not None else None
        if self.using is not None:
            self.using.open()

    def close(self) -> None:
        if self.using is not None:
            self.using.close()
            self.using = None
        for h in self.handles:
            h.remove()
        self.handles = []
