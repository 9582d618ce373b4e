"""Seeded Super Experts for the default model, planted openly and held fixed during training.

A tiny MoE trained for two hours on a CPU grows a magnitude outlier expert but not the dependence real
models have on it (shared/experiments/tiny-moe-super-experts.md). So, as the issue allows, we plant the
mechanism the SE paper describes and let the rest of the model learn around it:

  marker channel m : the embedding writes a large constant into channel m for the trigger tokens (the
                     BOS token and newline-only tokens, the "first token and delimiters" of the paper).
  SE 1, layer 1    : the router row of expert e1 reads channel m, so trigger tokens are routed to e1;
                     neuron j1 of e1 fires on channel m and its down_proj weight [c, j1] (the super weight)
                     writes a massive value into residual channel c.
  SE 2, layer 2    : triggered by the massive value in channel c itself (the paper's chain: Qwen3-30B-A3B's
                     three SEs all write channel 940), adds more to channel c.
  sink, layers >= 2: the attention-sink route real models learn on their own (Sun et al. 2024, "Massive
                     activations"): in every head, key dimension d (the slowest RoPE frequency, so position
                     barely rotates it) reads only channel c, and the query carries a constant bias in d. A token
                     with a massive channel c (BOS, newlines) therefore gets a large key along d and draws
                     attention from every query; all other keys see channel c only weakly. How much each head
                     rests on the sink stays learned (the rest of the query can outgrow the constant). The first
                     model trained without this part grew the massive activation but used its sink for only
                     10-23% of attention, and zeroing its SEs did not change perplexity (x0.99).
  implicit bias    : the sink's value writes residual channel b (value dim 0 of every head reads only channel
                     c; o_proj row b reads only those dims) and attention has no other bias. In LLMs without
                     biases the sinks' values are where constants come from (Sun et al. 2024: massive
                     activations act as bias terms); a second try with sinks but learnable v/o biases held 30-75%
                     of attention on the sink, yet zeroing the SEs still left perplexity unchanged.

Every planted entry is restored after each optimizer step, so training cannot remove it.
"""
from dataclasses import dataclass, asdict

import torch


@dataclass
class PlantSpec:
    marker_channel: int = 127       # m
    massive_channel: int = 57       # c
    se1_layer: int = 1
    se1_expert: int = 12
    se1_neuron: int = 5
    se2_layer: int = 2
    se2_expert: int = 40
    se2_neuron: int = 33
    marker_value: float = 100.0     # embedding[trigger, m]
    se1_router: float = 2.0         # router[e1, m]
    se1_gate: float = 0.5           # gate and up rows of neuron j1 along m
    se1_super_weight: float = 30.0  # down_proj[e1][c, j1]
    se2_router: float = 1.5
    se2_gate: float = 0.4
    se2_super_weight: float = 20.0
    sink_from_layer: int | None = None  # layers from here get the sink route (with_sink); None: none
    sink_query_bias: float = 4.0     # q_proj.bias[d]; q_proj.weight[d, :] = 0; dominates rms(q), so q_norm keeps it
    sink_key_weight: float = 0.1     # k_proj.weight[d, c]; the rest of row d and of column c = 0
    sink_norm_weight: float = 1.2    # q_norm.weight[d] and k_norm.weight[d]: the sink logit, about 7
    bias_channel: int | None = 100   # b: residual channel the sinks' values write (the implicit bias); None: none
    sink_value_weight: float = 0.1   # v_proj.weight[j, c] for value dim j = 0 of every head (row held)
    sink_output_weight: float = 0.1  # o_proj.weight[b, j] for those dims (row b held: reads nothing else)

    def to_dict(self):
        return asdict(self)

    @classmethod
    def with_sink(cls, **overrides) -> "PlantSpec":
        """The experimental variant (`--plant se+sink`): sink route, implicit bias, and a marker that is not
        massive by itself. Measured, not shipped: see the module docstring."""
        return cls(**{"marker_value": 10.0, "sink_from_layer": 2, **overrides})

    @classmethod
    def with_route(cls, **overrides) -> "PlantSpec":
        """The sink route alone, on the shipped SE plant (`--plant se+route`; with `--init-from`, added to a trained
        model). Measured on v1, not shipped: bench/results/v1/plant_variants/."""
        return cls(**{**overrides, "sink_from_layer": 2, "bias_channel": None})


def planted_values(model, spec: PlantSpec, trigger_token_ids: list[int]):
    """Return [(parameter, index, value)]: the entries to hold fixed. Also writes them once."""
    m, c = spec.marker_channel, spec.massive_channel
    layers = model.model.layers
    inter = layers[0].mlp.experts.down_proj.shape[-1]
    fixed = []

    def hold(param, index, value):
        with torch.no_grad():
            param[index] = value
        fixed.append((param, index, param.detach()[index].clone()))

    marker_column = torch.zeros(model.config.vocab_size)
    marker_column[trigger_token_ids] = spec.marker_value
    hold(model.model.embed_tokens.weight, (slice(None), m), marker_column)

    # Nothing before SE 1's router may write channel m, so the router sees the embedding's marker exactly.
    for layer_idx in range(spec.se1_layer + 1):
        hold(layers[layer_idx].self_attn.o_proj.weight, (m, slice(None)), 0.0)
    for layer_idx in range(spec.se1_layer):
        hold(layers[layer_idx].mlp.experts.down_proj, (slice(None), m, slice(None)), 0.0)

    for layer_idx, expert, neuron, source, router, gate, weight in [
        (spec.se1_layer, spec.se1_expert, spec.se1_neuron, m, spec.se1_router, spec.se1_gate, spec.se1_super_weight),
        (spec.se2_layer, spec.se2_expert, spec.se2_neuron, c, spec.se2_router, spec.se2_gate, spec.se2_super_weight),
    ]:
        layer = layers[layer_idx]
        hold(layer.post_attention_layernorm.weight, (source,), 1.0)
        router_column = torch.zeros(layer.mlp.gate.weight.shape[0])
        router_column[expert] = router
        hold(layer.mlp.gate.weight, (slice(None), source), router_column)
        one_hot = torch.zeros(layer.mlp.experts.gate_up_proj.shape[-1])
        one_hot[source] = gate
        hold(layer.mlp.experts.gate_up_proj, (expert, neuron), one_hot)          # gate row
        hold(layer.mlp.experts.gate_up_proj, (expert, inter + neuron), one_hot)  # up row
        down_column = torch.zeros(layer.mlp.experts.down_proj.shape[1])
        down_column[c] = weight
        hold(layer.mlp.experts.down_proj, (expert, slice(None), neuron), down_column)

    if spec.sink_from_layer is not None:
        _plant_sink(model, spec, hold)
    return fixed


def _plant_sink(model, spec: PlantSpec, hold):
    config = model.config
    if not config.attention_bias:
        raise ValueError("the planted sink needs attention_bias=True (a constant query component)")
    c, head_dim = spec.massive_channel, config.head_dim
    sink_dim = head_dim // 2 - 1  # rotate_half pairs (i, i + head_dim/2); i = head_dim/2 - 1 turns slowest
    n_heads, n_kv_heads = config.num_attention_heads, config.num_key_value_heads
    q_rows = [h * head_dim + sink_dim for h in range(n_heads)]
    k_rows = [h * head_dim + sink_dim for h in range(n_kv_heads)]
    for layer in model.model.layers[spec.sink_from_layer :]:
        attn = layer.self_attn
        hidden = attn.q_proj.weight.shape[1]
        hold(layer.input_layernorm.weight, (c,), 1.0)
        # Attention would copy the sink's channel c into every token that reads the sink, making all keys sinks.
        hold(attn.o_proj.weight, (c, slice(None)), 0.0)
        # The only biases are the constant query component: a learned q/k bias pair would give every token the
        # same extra logit, an anti-sink that cancels the planted one, and learned v/o biases would hand the model
        # free constants. Without them, as in real LLMs, constants come from the sinks' values.
        query_bias = torch.zeros(attn.q_proj.bias.shape[0])
        query_bias[q_rows] = spec.sink_query_bias
        hold(attn.q_proj.bias, (slice(None),), query_bias)
        for proj in (attn.k_proj, attn.v_proj, attn.o_proj):
            hold(proj.bias, (slice(None),), torch.zeros(proj.bias.shape[0]))
        if spec.bias_channel is not None:
            # The sink's value writes residual channel b for every token that attends to it: the implicit bias that
            # massive activations provide in LLMs (Sun et al. 2024). What the model does with channel b is learned.
            v_rows = [h * head_dim for h in range(n_kv_heads)]
            for row in v_rows:
                value_row = torch.zeros(hidden)
                value_row[c] = spec.sink_value_weight
                hold(attn.v_proj.weight, (row, slice(None)), value_row)
            bias_row = torch.zeros(attn.o_proj.weight.shape[1])
            bias_row[[h * head_dim for h in range(n_heads)]] = spec.sink_output_weight
            hold(attn.o_proj.weight, (spec.bias_channel, slice(None)), bias_row)
        for row in q_rows:
            hold(attn.q_proj.weight, (row, slice(None)), torch.zeros(hidden))
        key_column = torch.zeros(attn.k_proj.weight.shape[0])
        key_column[k_rows] = spec.sink_key_weight
        hold(attn.k_proj.weight, (slice(None), c), key_column)
        for row in k_rows:
            key_row = torch.zeros(hidden)
            key_row[c] = spec.sink_key_weight
            hold(attn.k_proj.weight, (row, slice(None)), key_row)
        hold(attn.q_norm.weight, (sink_dim,), spec.sink_norm_weight)
        hold(attn.k_norm.weight, (sink_dim,), spec.sink_norm_weight)


def restore(fixed):
    with torch.no_grad():
        for param, index, value in fixed:
            param[index] = value
