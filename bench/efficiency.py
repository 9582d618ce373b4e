"""Each pass of one real-shaped MoE layer as a share of the machine's own matmul rate (used by bench/scale.py).

On a shared 2-core CPU an absolute time means little; a ratio to what the same process can do right now does:

    efficiency = ideal time / measured time,   ideal time = sum over the pass's matmul kinds of FLOPs_k / rate_k

where rate_k is measured in the same process right before the pass, on the shapes and dtype that pass needs
(e.g. [tokens per expert x 2048] @ [2048 x 1536] for the routed gate/up of Qwen3-30B-A3B), best of a few runs.
Weights are streamed as the pass streams them: a pass reads each expert's (and attention's) weights once per
batch, so the rate cycles through distinct weight matrices beyond the cache size (matmul_rate's `weights`);
the efficiency against the rate with one weight that stays in cache (an upper bound no pass over 128 experts
reaches at a few tokens per expert) is reported beside it.
With one kind, efficiency = needed FLOPs / (time x measured rate). Needed FLOPs count only the work the pass
must do (2 flops per multiply-add):
- detect: the layer's forward with the real routing, counted by torch's FlopCounterMode on one sample (attention,
  router, shared expert) plus the routed experts, T k (2 H 2I + 2 I H);
- hessian (all-expert calibration): every token through every expert's gate/up, E T 2 H 2I; each expert's
  down_proj input Hessian, E T 2 I^2; the shared gate/up input Hessian, T 2 H^2; the routed down_proj, T k 2 I H;
- gptq: per matrix [O, I]: the error feedback O I^2 (block updates) + O I b (in-block, b = 128) and the
  Cholesky/inverse/Cholesky of H, 4/3 I^3 when the matrix has its own Hessian;
- metrics: tr((W - Q) H (W - Q)^T) per matrix on the 64 rows the engine samples (quant/rtn.metric_rows), 2 x 64 x I^2.
"""
import time

import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


STREAM_BYTES = 128 << 20  # more than any cache here (CPU L3 32 MiB; H100/H200 L2 50-60 MiB)


def matmul_rate(m: int, k: int, n: int, dtype, device, min_seconds: float = 0.3, transposed_a: bool = False,
                weights: int = 1) -> float:
    """FLOP/s of [m x k] @ [k x n] here and now (best of several runs of at least min_seconds in all).

    transposed_a: A is given as the transpose of a [k x m] tensor (the X^T X of a Hessian). weights > 1: the pass
    streams that many distinct [k x n] weight matrices (one per expert, stored [n, k] as nn.Linear, used
    transposed), each read once per batch: the measure cycles through as many copies as fill STREAM_BYTES (at
    most `weights`), so reading the weights from memory is part of the rate, as it is part of the pass."""
    a = torch.randn(k, m, dtype=dtype, device=device).T if transposed_a else torch.randn(m, k, dtype=dtype, device=device)
    item = torch.empty((), dtype=dtype).element_size()
    copies = 1 if weights <= 1 else min(weights, max(2, -(-STREAM_BYTES // (k * n * item))))
    bs = [torch.randn(n, k, dtype=dtype, device=device).T for _ in range(copies)] if weights > 1 else \
        [torch.randn(k, n, dtype=dtype, device=device)]
    a @ bs[0]
    _sync(device)
    best, spent, runs = float("inf"), 0.0, 0
    while spent < min_seconds or runs < 3:
        t = time.perf_counter()
        for b in bs:
            a @ b
        _sync(device)
        dt = (time.perf_counter() - t) / len(bs)
        best, spent, runs = min(best, dt), spent + dt * len(bs), runs + 1
    return 2.0 * m * k * n / best


def share(kinds: dict, seconds: float, cached: dict | None = None) -> dict:
    """kinds: name -> (flops, rate). Returns the pass's needed FLOPs, ideal time, effective rate and efficiency;
    with `cached` (name -> rate of the same matmul with one weight that stays in cache) also that efficiency."""
    flops = sum(f for f, _ in kinds.values())
    ideal = sum(f / r for f, r in kinds.values())
    out = {"flops": flops, "seconds": seconds, "ideal_seconds": ideal, "rate": flops / ideal,
           "efficiency": ideal / seconds, "kinds": {k: {"flops": f, "rate": r} for k, (f, r) in kinds.items()}}
    if cached:
        ideal_cached = sum(f / cached.get(k, r) for k, (f, r) in kinds.items())
        out["efficiency_vs_cached_weights"] = ideal_cached / seconds
        for k, r in cached.items():
            out["kinds"][k]["rate_cached"] = r
    return out


def layer_shape(config, adapter) -> dict:
    E, k = adapter.num_experts(config), config.num_experts_per_tok
    inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    return {"E": E, "k": k, "H": config.hidden_size, "I": inter}


def build_layer(config, dtype, device, generator):
    """Decoder layer 1 of `config` (its own transformers class; layer 0 of DeepSeek-V2 is dense) with random
    weights (N(0, 0.02); norms 1), and the model around it (rotary embedding, mask helpers) left empty."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config.num_hidden_layers = 2
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    layer = model.model.layers[1].to_empty(device=device).to(dtype).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.empty(p.shape).normal_(0, 0.02, generator=generator))
    return model.model, layer, 1


def layer_inputs(base, layer, batch: int, seqlen: int, dtype, device, generator):
    """Hidden states [batch, seqlen, H] (unit scale) and the kwargs the model passes to a decoder layer."""
    hidden = torch.randn(batch, seqlen, base.config.hidden_size, generator=generator).to(device, dtype)
    position_ids = torch.arange(seqlen, device=device)[None].expand(batch, seqlen)
    rotary = base.rotary_emb.to(device)
    position_embeddings = rotary(hidden, position_ids)
    from transformers.masking_utils import create_causal_mask

    mask = create_causal_mask(config=base.config, inputs_embeds=hidden, attention_mask=None,
                              past_key_values=None, position_ids=position_ids)
    return hidden, dict(attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings)


@torch.no_grad()
def detect_pass(config, adapter, base, layer, layer_idx, batches, layer_kwargs, dtype, device) -> dict:
    """The SE statistics pass (detect/stats.py recorders, the detection experts implementation) over `batches`."""
    from torch.utils.flop_counter import FlopCounterMode

    from se_compress.detect.stats import attach_recorders, detach_recorders

    s = layer_shape(config, adapter)
    one = {k: (v[:1] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == batches[0].shape[0] else v)
           for k, v in layer_kwargs.items()}
    pe = layer_kwargs["position_embeddings"]  # (cos, sin), or DeepSeek-V2's complex frequencies
    one["position_embeddings"] = tuple(t[:1] for t in pe) if isinstance(pe, tuple) else pe[:1]
    moe = adapter.moe_block(layer)
    saved = moe.experts.forward
    moe.experts.forward = lambda *a, **kw: torch.zeros_like(a[0])  # routed experts counted analytically below
    # FlopCounterMode cannot count grouped-query SDPA (torch asserts that q, k and v have as many heads; transformers
    # passes enable_gqa on CUDA): the count runs the eager attention, the same matmuls with k/v repeated per head.
    attn_config = layer.self_attn.config
    saved_impl, attn_config._attn_implementation = attn_config._attn_implementation, "eager"
    try:
        with FlopCounterMode(display=False) as counter:
            layer(batches[0][:1], **one)
    finally:
        moe.experts.forward = saved
        attn_config._attn_implementation = saved_impl
    tokens = sum(b.shape[0] * b.shape[1] for b in batches)
    dense_flops = counter.get_total_flops() * tokens / batches[0].shape[1]  # attention, router, shared: per sample
    routed_flops = tokens * s["k"] * (2 * s["H"] * 2 * s["I"] + 2 * s["I"] * s["H"])
    per_expert = max(1, tokens * s["k"] // s["E"] // len(batches))  # tokens an expert sees per batch, on average
    T = batches[0].shape[0] * batches[0].shape[1]

    def routed_rate(weights):  # gate/up is 2/3 of an expert's FLOPs, down 1/3: the ideal time of the mix
        up = matmul_rate(per_expert, s["H"], 2 * s["I"], dtype, device, weights=weights)
        down = matmul_rate(per_expert, s["I"], s["H"], dtype, device, weights=weights)
        return 1 / (2 / 3 / up + 1 / 3 / down)

    rates = {"attention+dense": matmul_rate(T, s["H"], s["H"], dtype, device, weights=4),
             "routed experts": routed_rate(s["E"])}
    cached = {"attention+dense": matmul_rate(T, s["H"], s["H"], dtype, device), "routed experts": routed_rate(1)}
    recorder, handles = attach_recorders(adapter, layer, layer_idx, config)
    _sync(device)
    t = time.perf_counter()
    for b in batches:
        layer(b, **layer_kwargs)
    _sync(device)
    seconds = time.perf_counter() - t
    detach_recorders(adapter, layer, handles)
    out = share({"attention+dense": (dense_flops, rates["attention+dense"]),
                 "routed experts": (routed_flops, rates["routed experts"])}, seconds, cached)
    out.update(tokens=tokens, tokens_per_expert_per_batch=per_expert, max_output=float(recorder.max_output.max()))
    return out


@torch.no_grad()
def hessian_pass(config, adapter, layer, batches, dtype, device) -> dict:
    """All-expert Hessian collection of the routed experts (quant/hessian.py) on the MoE block's inputs."""
    from se_compress.quant.hessian import ExpertCollector, use_collector

    s = layer_shape(config, adapter)
    moe = adapter.moe_block(layer)
    tokens = sum(b.shape[0] * b.shape[1] for b in batches)
    T = batches[0].shape[0] * batches[0].shape[1]
    E, H, I, k = s["E"], s["H"], s["I"], s["k"]
    kinds = {"gate/up, all tokens x all experts": (E * tokens * 2 * H * 2 * I,
                                                   matmul_rate(T, H, 2 * I, dtype, device, weights=E)),
             "down_proj X^T X per expert": (E * tokens * 2 * I * I,
                                            matmul_rate(I, T, I, torch.float32, device, transposed_a=True)),
             "gate/up X^T X (shared by experts)": (tokens * 2 * H * H,
                                                   matmul_rate(H, T, H, torch.float32, device, transposed_a=True)),
             "routed down_proj": (tokens * k * 2 * I * H, matmul_rate(max(1, T * k // E), I, H, dtype, device,
                                                                     weights=E))}
    cached = {"gate/up, all tokens x all experts": matmul_rate(T, H, 2 * I, dtype, device),
              "routed down_proj": matmul_rate(max(1, T * k // E), I, H, dtype, device)}
    collector = ExpertCollector(moe.experts, "all", set(), {})
    _sync(device)
    t = time.perf_counter()
    with use_collector(moe.experts, collector):
        for b in batches:
            moe(b)
    _sync(device)
    seconds = time.perf_counter() - t
    out = share(kinds, seconds, cached)
    out["tokens"] = tokens
    out["down_hessians"] = collector  # the caller solves GPTQ with them
    return out


def gptq_flops(rows: int, cols: int, own_hessian: bool, blocksize: int = 128) -> float:
    return rows * cols * cols + rows * cols * blocksize + (4 / 3 * cols ** 3 if own_hessian else 0)


def sampled_rows(rows: int) -> int:
    """How many rows of a [rows, cols] matrix the engine's report metrics use (rtn.metric_rows)."""
    from se_compress.quant.rtn import metric_rows

    return len(range(rows)[metric_rows(rows)])


def metrics_flops(rows: int, cols: int) -> float:
    """tr(D H D^T) for GPTQ and for RTN, and tr(W H W^T), on the rows the engine samples."""
    return 3 * 2 * sampled_rows(rows) * cols * cols


def gptq_pass(config, adapter, layer, collector, experts: int, device) -> dict:
    """GPTQ W4 g128 of `experts` routed experts of the layer (down_proj with its own Hessian, gate/up with the
    shared one) through quant/gptq.py's solver, then the report metrics of each matrix; both as shares."""
    from se_compress.quant.gptq import gptq_quantize_batched, prepare_hessian, prepare_hessians
    from se_compress.quant.hessian import expert_weights
    from se_compress.quant.rtn import QuantSpec, metric_rows, output_error, rtn_quantize

    s = layer_shape(config, adapter)
    H, I = s["H"], s["I"]
    spec = QuantSpec(4, 128, True)
    for e in range(experts, s["E"]):  # Hessians of the experts not solved here: freed (Mixtral: 0.8 GiB each)
        collector.down[e] = None
    moe = adapter.moe_block(layer)
    mats = {"down": [expert_weights(moe.experts, e)[1].float() for e in range(experts)],
            "gate_up": [expert_weights(moe.experts, e)[0].float() for e in range(experts)]}
    hess = {"down": [collector.down[e].final() for e in range(experts)], "gate_up": collector.shared_in.final()}
    kinds, metric_kinds, seconds, metric_seconds, chunks = {}, {}, 0.0, 0.0, {}
    for which, (rows, cols) in (("down", (H, I)), ("gate_up", (2 * I, H))):
        own = which == "down"
        kinds[which] = (experts * gptq_flops(rows, cols, own), matmul_rate(rows, 128, cols, torch.float32, device))
        metric_kinds[which] = (experts * metrics_flops(rows, cols),
                               matmul_rate(sampled_rows(rows), cols, cols, torch.float32, device))
        chunk = chunks[which] = _solve_chunk(experts, rows, cols, own)
        _sync(device)
        t = time.perf_counter()
        shared = None if own else prepare_hessian(hess[which])
        solved = []
        for c in range(0, experts, chunk):
            prepared = prepare_hessians(torch.stack(hess[which][c: c + chunk])) if own else shared
            solved += gptq_quantize_batched(torch.stack(mats[which][c: c + chunk]), prepared, spec)
        _sync(device)
        seconds += time.perf_counter() - t
        t = time.perf_counter()
        r = metric_rows(rows)
        for e, qt in enumerate(solved):  # the report's metrics, as the engine computes them (LayerQuantizer._finish)
            Hm = hess[which][e] if own else hess[which]
            W = mats[which][e]
            output_error(W[r], qt.dequantize().float()[r], Hm)
            output_error(W[r], rtn_quantize(W[r], spec).dequantize().float(), Hm)
        _sync(device)
        metric_seconds += time.perf_counter() - t
    out = {"gptq": share(kinds, seconds), "metrics": share(metric_kinds, metric_seconds)}
    out.update(experts=experts, of_experts=s["E"], chunks=chunks)
    out["metrics"]["share_of_gptq_time"] = metric_seconds / seconds
    return out


def _solve_chunk(count, rows, cols, own_hessian):
    """How many expert matrices the engine solves at once (main before issue 19: as many as fit in memory)."""
    from se_compress.quant import gptq

    if hasattr(gptq, "solve_chunk"):
        return gptq.solve_chunk(count, rows, cols, own_hessian)
    from se_compress.models.placement import current

    return current().chunk(count, gptq.gptq_bytes_per_matrix(rows, cols, own_hessian=own_hessian))
