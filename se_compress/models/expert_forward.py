"""The routed experts of one MoE layer, computed expert by expert on grouped tokens: the one forward that the SE
statistics (detect/stats.py) and the calibration Hessians (quant/hessian.py) both run.

transformers 5 stores a layer's experts fused, gate_up_proj [E, 2I, H] and down_proj [E, H, I] (gpt-oss:
transposed, with biases). For T tokens routed to k experts each, the forward is

    order  = argsort(top_k_index.flatten(), stable)      # once per call: the T k (token, slot) pairs by expert
    x_e    = hidden[(order // k)[rows of e]]             # [n_e, H], tokens of e in increasing token order
    h_e    = act(x_e @ gate_up[e]^T)                     # [n_e, I]    (gate * act(up), or act(up) without gate)
    y_e    = h_e @ down[e]^T                             # [n_e, H]    the expert's output before the routing weight
    out[t] += w[t, e] * y_e[t]                           # index_add_ in increasing expert order

so each expert runs its projections as two matmuls on all its tokens at once, with no per-token Python and no
per-expert search of the routing table. Callers see each expert's tensors while they are hot, through callbacks:
`on_input(e, x, h)` (inputs of gate/up and of down_proj: Hessians) and `on_output(e, rows, y, w)` (the output
before the routing weight: SE statistics). With `all_tokens`, every token goes through every expert's gate/up
(all-expert calibration: every expert's down_proj Hessian sees all tokens), and the routed rows are taken from
that intermediate, so the layer's output still follows the real routing.

Each expert's matmuls have the same operands and shapes as transformers' eager loop, and the output is summed in
the same expert order. The eager loop gathers an expert's tokens slot by slot (torch.where over [k, T]); this
gathers them in token order. A BLAS matmul's result for one row can depend on where the row sits in its block
(row-permuted [n, 64] @ [64, 64] products differ in the last bit for 3 of 5 small n on our CPU), so the output
equals eager's to fp32 rounding, not bit for bit, on every machine.
"""
from dataclasses import dataclass

import torch


@dataclass
class RoutedGroups:
    """The (token, slot) pairs of one call grouped by expert: rows lo:hi of `tokens` belong to expert e."""
    tokens: torch.Tensor    # [N] token index of each routed row, grouped by expert, increasing within a group
    slots: torch.Tensor     # [N] flat index t * k + j into top_k_index / top_k_weights
    bounds: list[int]       # [E + 1] row offsets: expert e has rows bounds[e]:bounds[e + 1]

    def rows(self, e: int) -> slice:
        return slice(self.bounds[e], self.bounds[e + 1])


def group_by_expert(top_k_index: torch.Tensor, num_experts: int) -> RoutedGroups:
    """Sort the routing table [T, k] by expert once. Indices >= num_experts (expert-parallel sentinels) sort last
    and belong to no group."""
    flat = top_k_index.reshape(-1)
    slots = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat.clamp(max=num_experts), minlength=num_experts + 1)[:num_experts]
    bounds = [0] + torch.cumsum(counts, 0).tolist()  # the one host sync of the call
    return RoutedGroups(slots // top_k_index.shape[-1], slots, bounds)


def expert_weights(experts, e: int):
    """(gate_up [2I, H], down [H, I]) of expert e in nn.Linear orientation (views, whatever the storage layout)."""
    up = experts.gate_up_proj[e] if experts.has_gate else experts.up_proj[e]
    down = experts.down_proj[e]
    return (up.T, down.T) if experts.is_transposed else (up, down)


def expert_intermediate(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """The activated intermediate of expert e for tokens x [n, H]: the input of its down_proj, [n, I]."""
    up = experts.gate_up_proj[e] if experts.has_gate else experts.up_proj[e]
    h = x @ up if experts.is_transposed else x @ up.T
    if experts.has_bias:
        h = h + (experts.gate_up_proj_bias[e] if experts.has_gate else experts.up_proj_bias[e])
    return experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)


def expert_down(experts, e: int, h: torch.Tensor) -> torch.Tensor:
    """down_proj of expert e on its intermediate h [n, I]: the expert's output before the routing weight, [n, H]."""
    y = h @ experts.down_proj[e] if experts.is_transposed else h @ experts.down_proj[e].T
    if experts.has_bias:
        y = y + experts.down_proj_bias[e]
    return y


def routed_experts_forward(experts, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor, *, all_tokens: bool = False, on_input=None,
                           on_output=None) -> tuple[torch.Tensor, RoutedGroups]:
    """The experts' contribution [T, H] for hidden_states [T, H] routed by top_k_index/top_k_weights [T, k].

    on_input(e, x, h): x the tokens expert e's gate/up saw ([n_e, H], or all [T, H] with all_tokens) and h
    their activated intermediate. on_output(e, rows, y, w): y [n_e, H] the expert's output on its routed
    tokens (rows of the returned groups), w [n_e] their routing weights. Returns (output, groups)."""
    groups = group_by_expert(top_k_index, experts.num_experts)
    routed_w = top_k_weights.reshape(-1)[groups.slots]           # [N] routing weights, grouped by expert
    final = torch.zeros_like(hidden_states)
    for e in range(experts.num_experts):
        rows = groups.rows(e)
        if rows.start == rows.stop and not all_tokens:
            continue
        tokens = groups.tokens[rows]
        if all_tokens:
            h_all = expert_intermediate(experts, e, hidden_states)
            if on_input is not None:
                on_input(e, hidden_states, h_all)
            if rows.start == rows.stop:
                continue
            h = h_all[tokens]
        else:
            x = hidden_states[tokens]  # a fresh [n_e, H] gather, as the eager loop makes
            h = expert_intermediate(experts, e, x)
            if on_input is not None:
                on_input(e, x, h)
        y = expert_down(experts, e, h)
        w = routed_w[rows]
        if on_output is not None:
            on_output(e, rows, y, w)
        final.index_add_(0, tokens, (y * w[:, None]).to(final.dtype))
    return final, groups
