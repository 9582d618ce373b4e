"""quantize_model: stream the model one decoder layer at a time, quantize it, write it.

Per decoder layer (GPTQ):
  1. attention Hessians: the calibration batches go through the layer (inputs: the outputs of the already
     quantized previous layers); attention Linears are quantized;
  2. MLP Hessians: the batches go through again (now through the quantized attention); the routed experts
     through `collecting_experts_forward` (hessian.py), dense MLPs and shared experts through hooks; quantized;
  3. the batches go through the quantized layer: the next layer's inputs.
RTN needs no calibration data and skips all three passes. The three passes are the rounds Engine.layer_rounds asks
of the streamed runner (models/runner.py), which owns the layer loop. Routers, shared-expert gates, norms,
embeddings and lm_head are never quantized.
"""
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from .. import distributed as dist
from ..errors import SECompressError
from ..models.adapters import adapter_for
from ..models.handle import model_name, open_model
from ..models.placement import current
from ..models.runner import Round, stream_layers
from ..models.streaming import LAYERS_PREFIX, StreamedModel
from . import compressed_tensors as ct
from .gptq import (CholeskyFailed, gptq_bytes_per_matrix, gptq_quantize, gptq_quantize_batched, prepare_hessian,
                   prepare_hessians, solve_chunk)
from .expert_split import ExpertSplit
from .hessian import ExpertCollector, HessianHooks, HessianSum, TriggerMask, expert_weights, reduce_hessians
from .policies import KEEP_BITS, Plan, parse_policy, super_experts_from_report, super_weight_mask, trigger_mask
from .report import build_model_card, summarize
from .rtn import QuantSpec, Quantized, metric_rows, output_error, rtn_quantize, weight_error

METHODS = ("rtn", "gptq")
FORMATS = ("pack-quantized", "fake-quant")
BITS = (2, 3, 4, 8)
EXPERT_CALIBRATION = ("all", "routed")


def _check_options(method, bits, group_size, output_format, layer_bits, expert_calibration, trigger_weight, samples,
                   seqlen, policy):
    if method not in METHODS:
        raise SECompressError(f"unknown method '{method}': use rtn or gptq")
    if bits not in BITS:
        raise SECompressError(f"--bits {bits} is not supported: use 2, 3, 4 or 8")
    if group_size is not None and (not isinstance(group_size, int) or group_size < 0):
        raise SECompressError(f"--group-size {group_size} is not supported: use a positive size (32, 64, 128) or 0 for per-channel")
    if output_format not in FORMATS:
        raise SECompressError(f"unknown output format '{output_format}': use pack-quantized or fake-quant")
    if layer_bits not in BITS + (KEEP_BITS,):
        raise SECompressError(f"--layer-bits {layer_bits} is not supported: use 2, 3, 4, 8, or 16 (keep bf16)")
    if "layer" in policy and layer_bits <= bits:
        raise SECompressError(f"--layer-bits {layer_bits} is not above --bits {bits}: the layer policy needs more bits for SE layers")
    if expert_calibration not in EXPERT_CALIBRATION:
        raise SECompressError(f"unknown expert calibration '{expert_calibration}': use all or routed")
    if not 0 <= trigger_weight < 1:
        raise SECompressError(f"trigger weight {trigger_weight} must be in [0, 1)")
    if samples < 1 or seqlen < 2:
        raise SECompressError(f"need --samples >= 1 and --seqlen >= 2 (got {samples}, {seqlen})")


def _layer_linears(adapter, config, layer, layer_idx, quantize_attention):
    """{relative name: (nn.Linear, kind)} of a decoder layer; kind is attention, dense or shared."""
    out = {}
    attn = getattr(layer, "self_attn", None)
    if attn is not None and quantize_attention:
        for name, mod in attn.named_modules():
            if isinstance(mod, nn.Linear):
                out[f"self_attn.{name}"] = (mod, "attention")
    if adapter.is_moe_layer(config, layer_idx):
        shared = adapter.shared_expert(layer)
        if shared is not None:
            for name, mod in shared.named_modules():
                if isinstance(mod, nn.Linear):
                    out[f"{adapter.moe_attr}.{adapter.shared_attr}.{name}"] = (mod, "shared")
    else:
        mlp = getattr(layer, adapter.moe_attr)
        for name, mod in mlp.named_modules():
            if isinstance(mod, nn.Linear):
                out[f"{adapter.moe_attr}.{name}"] = (mod, "dense")
    return out


class LayerQuantizer:
    """Quantizes the matrices of one decoder layer in place (weights become their dequantized values)."""

    def __init__(self, engine, layer_idx, layer):
        self.e, self.i, self.layer = engine, layer_idx, layer
        self.packed: dict[str, Quantized] = {}  # disk-name prefix -> codes (pack-quantized output)
        self.solved: dict[tuple[int, str], Quantized] = {}  # (expert, gate_up|down) -> codes, for the exchange

    def spec(self, bits):
        return QuantSpec(bits, self.e.group_size, self.e.symmetric)

    def quantize(self, name, W, bits, H=None, prepared=None, exact=None, noclip=False, tokens=None, expert=None,
                 fallback_reason=None, track=None):
        """W [O, I] float32 view in nn.Linear orientation; returns the Quantized and records the errors."""
        e = self.e
        spec = self.spec(bits)
        clip = e.clip_search and not noclip
        record = {"name": name, "layer": self.i, "bits": bits, "shape": list(W.shape)}
        if expert is not None:
            record["expert"] = expert
        method = e.method
        if method == "gptq" and prepared is None and fallback_reason is None:
            try:
                prepared = prepare_hessian(H, e.damp, e.act_order)
            except CholeskyFailed:
                fallback_reason = "Hessian not positive definite"
        if fallback_reason:
            method = "rtn"
            e.warnings.append(f"{name}: {fallback_reason}; quantized with round-to-nearest instead of GPTQ")
            record["fallback"] = fallback_reason
        if method == "gptq":
            qt = gptq_quantize(W, prepared, spec, e.scale_dtype, clip=clip, exact=exact)
        else:
            qt = rtn_quantize(W, spec, e.scale_dtype, clip=clip, exact=exact)
        self._finish(record, W, qt, H, exact, clip, method, tokens, track)
        return qt

    def _finish(self, record, W, qt, H, exact, clip, method, tokens, track=None):
        """Errors and super weights (`track`: the SE's super weights, protected or not) into the report."""
        W_hat = qt.dequantize().float()
        record.update(method=method, weight_error=weight_error(W, W_hat))
        if tokens is not None:
            record["tokens"] = tokens
        if H is not None:  # on sampled rows (rtn.metric_rows): a few percent of the solve, not several times it
            started = time.perf_counter()
            rows = metric_rows(W.shape[0])
            record["output_error"] = output_error(W[rows], W_hat[rows], H)
            if method == "gptq":
                ex = exact[rows] if exact is not None else None
                rtn = rtn_quantize(W[rows], qt.spec, self.e.scale_dtype, clip=clip, exact=ex).dequantize().float()
                record["rtn_output_error"] = output_error(W[rows], rtn, H)
            self.e.metric_seconds += time.perf_counter() - started
        track = exact if track is None else track
        if track is not None and track.any():
            for r, c in track.nonzero().tolist():
                self.e.super_weights.append({"module": record["name"], "layer": self.i, "expert": record.get("expert"),
                                             "row": r, "col": c, "value": float(W[r, c]),
                                             "quantized": float(W_hat[r, c]),
                                             "rel_error": abs(float(W_hat[r, c] - W[r, c])) / max(abs(float(W[r, c])), 1e-12),
                                             "protected": exact is not None and bool(exact[r, c])})
        self.e.modules.append(record)
        W.copy_(W_hat)

    # ----- Linear modules (attention, dense MLP, shared expert) -----
    def linears(self, modules, sums, trigger_weight_for):
        for rel, (mod, kind) in modules.items():
            expert = "shared" if kind == "shared" else None
            bits = self.e.plan.expert_bits(self.i, "shared") if kind == "shared" else self.e.bits
            name = f"{LAYERS_PREFIX}{self.i}.{rel}"
            if bits == KEEP_BITS:
                self.e.modules.append({"name": name, "layer": self.i, "bits": KEEP_BITS, "kept": True, "expert": expert,
                                       "params": mod.weight.numel()})
                continue
            exact = track = None
            noclip = kind == "shared" and self.e.plan.noclip(self.i, "shared")
            if kind == "shared" and self.e.plan.is_se(self.i, "shared") and rel.endswith("down_proj"):
                track = self._super_weights(mod.weight.data, "shared")
                exact = track if noclip else None
            H = sums[rel].final(trigger_weight_for(kind)) if sums else None
            qt = self.quantize(name, mod.weight.data, bits, H=H, exact=exact, noclip=noclip,
                               tokens=sums[rel].n if sums else None, expert=expert, track=track)
            self.packed[f"{name}."] = qt

    def _super_weights(self, down, expert):
        mask = torch.zeros(down.shape, dtype=torch.bool, device=down.device)
        for channel in self.e.plan.channels(self.i, expert):
            found = super_weight_mask(down, channel)
            if not found.any():
                self.e.notes.append(f"SE ({self.i},{expert}) has no super weight (no entry of its channel-{channel} "
                                    f"down_proj row reaches 10x the matrix RMS): its outlier comes from the activation; "
                                    f"noclip only turns clipping off for it")
            mask |= found
        return mask

    # ----- routed experts -----
    def experts(self, experts, collector: ExpertCollector | None):
        """Quantize every routed expert of the layer. GPTQ: all experts' gate/up as one batched problem and all
        down_proj as another (gptq_quantize_batched), in chunks that fit the placement's work budget."""
        e, plan = self.e, self.e.plan
        inter = expert_weights(experts, 0)[1].shape[1]
        tw = e.trigger_weight
        shared_in = None  # the gate/up Hessian all non-calib experts share under all-expert calibration
        gate_up_jobs, down_jobs = [], []
        split = ExpertSplit(self, experts, inter)  # torchrun: this rank solves some experts, then all exchange
        for x in range(experts.num_experts):
            mine = split.begin(x)
            bits = plan.expert_bits(self.i, x)
            base = f"{LAYERS_PREFIX}{self.i}.{e.adapter.moe_attr}.experts.{x}"
            if bits == KEEP_BITS:
                params = sum(w.numel() for w in expert_weights(experts, x))
                if mine:
                    e.modules.append({"name": base, "layer": self.i, "expert": x, "bits": KEEP_BITS, "kept": True,
                                      "params": params})
                continue
            gate_up, down = expert_weights(experts, x)
            noclip, calib = plan.noclip(self.i, x), plan.calib(self.i, x) and collector is not None
            track = self._super_weights(down, x) if mine and plan.is_se(self.i, x) else None
            exact_down = track if noclip else None
            if not mine and collector is None:
                continue  # RTN: nothing to plan for another rank's expert
            if collector is None:  # RTN
                self._store(x, "gate_up", self.quantize(f"{base}.gate_up_proj", gate_up, bits, noclip=noclip, expert=x), inter)
                self._store(x, "down", self.quantize(f"{base}.down_proj", down, bits, exact=exact_down, noclip=noclip,
                                                     expert=x, track=track), inter)
                continue
            tokens = collector.tokens(x)
            if e.expert_calibration == "routed" and tokens < e.min_tokens:
                reason = f"only {tokens} calibration tokens routed to it (< {e.min_tokens})"
                for which, W, ex, tr in (("gate_up", gate_up, None, None), ("down", down, exact_down, track)):
                    if not mine:
                        break
                    qt = self.quantize(f"{base}.{which}_proj", W, bits, noclip=noclip, exact=ex, tokens=tokens,
                                       expert=x, fallback_reason=reason, track=tr)
                    self._store(x, which, qt, inter)
                continue
            shares = e.expert_calibration == "all" and not calib
            if shares and shared_in is None:
                shared_in = collector.input_hessian(x).final(0.0)
            if shares:
                H_in = shared_in
            elif e.expert_calibration == "all":  # the layer's one input sum, with this SE's trigger share
                H_in = collector.input_hessian(x).final(tw if calib else 0.0)
            else:  # routed: the expert's own input sum, used once
                H_in = collector.input_hessian(x).take(tw if calib else 0.0)
            clip = e.clip_search and not noclip
            gate_up_jobs.append(dict(x=x, name=f"{base}.gate_up_proj", W=gate_up, bits=bits, H=H_in, shared=shares,
                                     clip=clip, exact=None, track=None, tokens=tokens))
            down_jobs.append(dict(x=x, name=f"{base}.down_proj", W=down, bits=bits,
                                  H=collector.down[x].take(tw if calib else 0.0), shared=False, clip=clip,
                                  exact=exact_down, track=track, tokens=tokens))
        for which, jobs in (("gate_up", gate_up_jobs), ("down", down_jobs)):
            split.solve(which, jobs)  # torchrun: this rank's experts only (all of them in one process)
        split.finish()

    def _solve_batched(self, which, jobs, inter):
        """GPTQ of same-shaped expert matrices as batched problems: one per (bits, shared Hessian or not), chunked
        by the placement's work budget. A Hessian that stays indefinite falls back to RTN for its expert alone."""
        e = self.e
        by_kind = {}
        for job in jobs:
            by_kind.setdefault((job["bits"], job["shared"]), []).append(job)
        for (bits, shared), items in by_kind.items():
            rows, cols = items[0]["W"].shape
            shared_prep = None
            if shared:
                try:
                    shared_prep = prepare_hessian(items[0]["H"], e.damp, e.act_order)
                except CholeskyFailed:
                    shared_prep = False
            chunk = solve_chunk(len(items), rows, cols, own_hessian=not shared)
            for c in range(0, len(items), chunk):
                part = items[c: c + chunk]
                if shared:
                    prepared, ok = shared_prep, [shared_prep is not False] * len(part)
                else:
                    prepared = prepare_hessians(torch.stack([j["H"] for j in part]), e.damp, e.act_order)
                    ok = prepared["ok"].tolist()
                solve = [k for k, good in enumerate(ok) if good]
                results = {}
                if solve:
                    if not shared and len(solve) < len(part):
                        prepared = {key: (v[solve] if torch.is_tensor(v) else v) for key, v in prepared.items()}
                    W = torch.stack([part[k]["W"] for k in solve])
                    clip = torch.tensor([part[k]["clip"] for k in solve], device=W.device)
                    has_exact = any(part[k]["exact"] is not None for k in solve)
                    exact = torch.stack([part[k]["exact"] if part[k]["exact"] is not None
                                         else torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
                                         for k in solve]) if has_exact else None
                    qts = gptq_quantize_batched(W, prepared, self.spec(bits), e.scale_dtype, clip=clip, exact=exact)
                    del W
                    results = dict(zip(solve, qts))
                for k, job in enumerate(part):
                    if k in results:
                        record = {"name": job["name"], "layer": self.i, "bits": bits, "shape": list(job["W"].shape),
                                  "expert": job["x"]}
                        self._finish(record, job["W"], results[k], job["H"], job["exact"], job["clip"], "gptq",
                                     job["tokens"], job["track"])
                        qt = results[k]
                    else:
                        qt = self.quantize(job["name"], job["W"], bits, H=job["H"], exact=job["exact"],
                                           noclip=not job["clip"] and e.clip_search, tokens=job["tokens"],
                                           expert=job["x"], fallback_reason="Hessian not positive definite",
                                           track=job["track"])
                    self._store(job["x"], which, qt, inter)
                    job["H"] = None  # solved and measured: its Hessian is not needed again

    def _store(self, x, which, qt, inter):
        self.solved[(x, which)] = qt
        if self.e.templates is None:
            return
        gate_t, up_t, down_t = self.e.templates
        prefix = f"{LAYERS_PREFIX}{self.i}."
        strip = lambda t: prefix + t.format(e=x)[: -len("weight")]
        if which == "down":
            self.packed[strip(down_t)] = qt
            return
        for t, sl in ((gate_t, slice(0, inter)), (up_t, slice(inter, 2 * inter))):
            self.packed[strip(t)] = Quantized(qt.q[sl], qt.scale[sl], qt.zero[sl] if qt.zero is not None else None, qt.spec)


class Engine:
    def __init__(self, **kw):
        self.__dict__.update(kw)
        self.modules, self.super_weights, self.warnings, self.notes = [], [], [], []
        self.metric_seconds = 0.0  # the report's output errors (rtn.metric_rows), against the run's total
        self.trigger_ref = {}  # "mask": the trigger tokens of the batch running now (TriggerMask), for the hooks

    def trigger_weight_for(self, kind):
        return self.trigger_weight if kind == "shared" and self.plan.calib(self._layer, "shared") else 0.0

    def layer_rounds(self, writer, i: int, layer, triggers: TriggerMask | None):
        """What quantizing decoder layer i asks of the streamed runner (models/runner.py), as a generator of rounds:
        GPTQ collects the attention inputs, quantizes attention, collects the MLP inputs (through the quantized
        attention), quantizes the MLP, then runs the quantized layer for the next layer's inputs; RTN needs no
        round. The quantized layer is written before the runner frees it."""
        self._layer = i
        lq = LayerQuantizer(self, i, layer)
        linears = _layer_linears(self.adapter, self.config, layer, i, self.quantize_attention)
        attention = {k: v for k, v in linears.items() if v[1] == "attention"}
        mlp_linears = {k: v for k, v in linears.items() if v[1] != "attention"}
        is_moe = self.adapter.is_moe_layer(self.config, i)
        experts = self.adapter.moe_block(layer).experts if is_moe else None
        if self.method == "rtn":
            lq.linears(linears, None, self.trigger_weight_for)
            if experts is not None:
                lq.experts(experts, None)
            self.write_layer(writer, i, layer, lq)
            return
        if attention:
            sums = {k: HessianSum(m.in_features) for k, (m, _) in attention.items()}
            yield Round([triggers, HessianHooks({k: m for k, (m, _) in attention.items()}, sums, self.trigger_ref)],
                        keep_outputs=False)
            reduce_hessians(sums.values())
            lq.linears(attention, sums, self.trigger_weight_for)
        track = lambda kind: kind == "shared" and self.plan.calib(i, "shared")
        sums = {k: HessianSum(m.in_features, track(kind)) for k, (m, kind) in mlp_linears.items()}
        collector = None
        if experts is not None:
            calib_experts = {x for x in range(experts.num_experts) if self.plan.calib(i, x)}
            collector = ExpertCollector(experts, self.expert_calibration, calib_experts, self.trigger_ref)
        yield Round([triggers, HessianHooks({k: m for k, (m, _) in mlp_linears.items()}, sums, self.trigger_ref,
                                            experts, collector)], keep_outputs=False)
        reduce_hessians(sums.values(), collector)
        lq.linears(mlp_linears, sums, self.trigger_weight_for)
        if experts is not None:
            lq.experts(experts, collector)
            self.expert_tokens[i] = collector.count.tolist()
        sums = collector = None  # the Hessians are spent: not held through the last round
        yield Round([])  # the quantized layer's outputs: the next layer's inputs
        self.write_layer(writer, i, layer, lq)

    def write_layer(self, writer, i, layer, lq):
        prefix = f"{LAYERS_PREFIX}{i}."
        if self.output_format == "fake-quant":
            writer.add_module(prefix[:-1], layer)
            return
        packed_linear = {p[len(prefix):] + "weight" for p in lq.packed if ".experts." not in p[len(prefix):]}
        for name, tensor in layer.state_dict().items():
            if name in packed_linear:
                continue
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                self._write_kept_experts(writer, i, name, tensor)
                continue
            writer.add(prefix + name, tensor)
        lq.solved.clear()  # the exchange is over: each matrix's codes are freed as soon as they are packed
        for disk_prefix in list(lq.packed):
            qt = lq.packed.pop(disk_prefix)
            for key, value in ct.packed_tensors(disk_prefix, qt).items():
                writer.add(key, value, handed_over=True)

    def _write_kept_experts(self, writer, i, name, tensor):
        """Per-expert .weight keys of the experts that stay bf16 (layer_bits 16); the quantized ones are packed."""
        gate_t, up_t, down_t = self.templates
        prefix = f"{LAYERS_PREFIX}{i}."
        inter = tensor.shape[1] // 2 if name.endswith("gate_up_proj") else tensor.shape[2]
        for x in range(tensor.shape[0]):
            if self.plan.expert_bits(i, x) != KEEP_BITS:
                continue
            if name.endswith("gate_up_proj"):
                writer.add(prefix + gate_t.format(e=x), tensor[x, :inter])
                writer.add(prefix + up_t.format(e=x), tensor[x, inter:])
            else:
                writer.add(prefix + down_t.format(e=x), tensor[x])


def _disk_templates(ckpt, adapter, config):
    """The per-expert on-disk key templates (gate, up, down) of this checkpoint, or None (fused on disk)."""
    from ..models.streaming import _expert_templates

    first = next((i for i in range(config.num_hidden_layers) if adapter.is_moe_layer(config, i)), None)
    for gate_t, up_t, down_t in _expert_templates(adapter) if adapter.disk_expert_keys else []:
        if first is not None and f"{LAYERS_PREFIX}{first}." + gate_t.format(e=0) in ckpt:
            return gate_t, up_t, down_t
    return None


def _pack_layout(engine, sm: StreamedModel) -> dict:
    """config.json's quantization_config for pack-quantized output; fails early (one line) on what cannot load."""
    adapter, config, plan = engine.adapter, engine.config, engine.plan
    moe_layers = [i for i in range(config.num_hidden_layers) if adapter.is_moe_layer(config, i)]
    families = {}  # (kind, bits) -> {"layers": set, "names": set, "in": list}

    def add(kind, bits, layer, names, in_features):
        if bits == KEEP_BITS:
            return
        f = families.setdefault((kind, bits), {"layers": set(), "names": set(), "in": []})
        f["layers"].add(layer)
        f["names"].update(names)
        f["in"] += in_features

    for i, layer in enumerate(sm.layers):
        lin = _layer_linears(adapter, config, layer, i, engine.quantize_attention)
        for kind in ("attention", "dense", "shared"):
            mods = {k: m for k, (m, kd) in lin.items() if kd == kind}
            if mods:
                bits = plan.expert_bits(i, "shared") if kind == "shared" else engine.bits
                add("dense", bits, (kind, i), list(mods), [m.in_features for m in mods.values()])
        if i in moe_layers:
            experts = adapter.moe_block(layer).experts
            gate_up, down = expert_weights(experts, 0)
            bits = engine.layer_bits if ("layer" in plan.policy and i in plan.se_layers) else engine.bits
            add("experts", bits, i, [], [gate_up.shape[1], down.shape[1]])
    groups, strategies = [], {}
    ordered = sorted(families, key=lambda k: (k[0] != "experts", k[1] != engine.bits, k[1]))
    for kind, bits in ordered:
        f = families[(kind, bits)]
        spec = QuantSpec(bits, engine.group_size, engine.symmetric)
        strategy = ct.strategy_for(spec, f["in"])
        if strategy is None:
            raise SECompressError(
                f"--group-size {engine.group_size} does not fit the {kind} input widths {sorted(set(f['in']))} "
                f"(one compressed-tensors group needs a size that divides all of them, or exceeds all): pick a "
                f"group size that divides them, 'channel', or --format fake-quant")
        if kind == "experts":
            layers = sorted(f["layers"])
            targets = [ct.expert_regex(engine.templates, layers if plan.mixed_layers() else None)]
        else:
            by_sub = {}
            for sub_kind, layer in f["layers"]:
                by_sub.setdefault(sub_kind, set()).add(layer)
            targets = []
            for sub_kind, layers in sorted(by_sub.items()):
                names = set()
                for layer in layers:
                    names |= {k for k, (_, kd) in _layer_linears(adapter, config, sm.layers[layer], layer,
                                                                 engine.quantize_attention).items() if kd == sub_kind}
                all_layers = sub_kind == "attention"
                targets.append(ct.module_regex(names, None if all_layers else layers))
        name = f"{kind}_w{bits}"
        strategies[name] = strategy
        if strategy == "channel" and engine.group_size:
            note = (f"Every {kind} row has at most {engine.group_size} inputs ({sorted(set(f['in']))}), so group size "
                    f"{engine.group_size} is one group per row: written as compressed-tensors 'channel', the same numbers.")
            if note not in engine.notes:
                engine.notes.append(note)
        groups.append({"name": name, "targets": targets, "spec": QuantSpec(bits, engine.group_size, engine.symmetric),
                       "strategy": strategy})
    router = f"re:.*({adapter.moe_attr}|block_sparse_moe)\\.{adapter.router_attr}$"
    ignore = ["lm_head", "re:.*embed_tokens$", router]
    if adapter.shared_gate_attr:
        ignore.append(f"re:.*{adapter.shared_gate_attr}$")
    kept = sorted(i for i in plan.se_layers if "layer" in plan.policy and engine.layer_bits == KEEP_BITS)
    if kept:
        ignore.append(ct.expert_regex(engine.templates, kept))
    engine.strategies = strategies
    return ct.quantization_config(groups, ignore)


def quantize_model(model: str, out, *, method: str = "gptq", bits: int = 4, group_size: int | None = 32,
                   symmetric: bool = True, se_policy=("noclip", "calib"), output_format: str = "pack-quantized",
                   clip_search: bool = False, act_order: bool = False, quantize_attention: bool = True,
                   layer_bits: int | None = None, se_report: dict | None = None, calib: str = "wikitext2",
                   samples: int = 64, seqlen: int = 256, seed: int = 0, force: bool = False, progress: bool = True,
                   expert_calibration: str = "all", trigger_weight: float = 0.25, damp: float = 0.01,
                   min_tokens: int | None = None, batch_size: int = 8, allow_pickle: bool = False,
                   trust_remote_code: bool = False) -> Path:
    """Quantize `model` ('default', a folder or a Hub id) into `out`; returns the output folder.

    method rtn|gptq; bits 2/3/4/8; group_size 32/64/128/... or 0/None for per-channel; se_policy: a tuple (or a
    comma string) from none, noclip, calib, layer, keep; output_format pack-quantized (compressed-tensors) or
    fake-quant (dequantized weights in the input's layout and dtype). See policies.py and compressed_tensors.py for
    what each choice does and where the result loads; compression_report.json in `out` says it for this run.
    """
    start = time.time()
    policy = parse_policy(se_policy)
    group_size = group_size or None
    layer_bits = 8 if layer_bits is None else layer_bits
    _check_options(method, bits, group_size, output_format, layer_bits, expert_calibration, trigger_weight, samples,
                   seqlen, policy)
    if out is None:
        raise SECompressError("no output folder given: pass --out DIR")
    handle = open_model(model, allow_pickle, trust_remote_code)  # the caller's handle, or opened here once
    path, ckpt = handle.path, handle.checkpoint
    config, adapter = handle.config, handle.adapter
    # FP8-block / MXFP4 inputs are read dequantized (models/formats.py); other quantized inputs were refused by
    # Checkpoint. The output has its own format: the input's quantization_config and MTP layer are not carried over.
    from ..models.formats import rewritten_config

    new_config, notes = rewritten_config(config, ckpt)
    requested_format = output_format
    if output_format == "pack-quantized" and "keep" in policy:
        output_format = "fake-quant"
        notes.append("SE policy 'keep' leaves single experts in bf16 inside quantized layers (per-expert mixed "
                     "precision), which neither vLLM nor transformers loads from a quantized checkpoint: written as "
                     "fake-quant (dequantized weights), for evaluation only.")
    if output_format == "pack-quantized":
        if not symmetric:
            raise SECompressError("pack-quantized experts must be symmetric (vLLM's MoE kernels and transformers 5.23's "
                                  "expert loader read no zero point): drop --asymmetric or use --format fake-quant")
        if adapter.disk_expert_keys is None:
            raise SECompressError(f"{config.model_type} stores its experts fused on disk, and compressed-tensors has no "
                                  f"layout for them that transformers 5.23 loads: use --format fake-quant")

    # device and dtype: the current placement (--device); round-to-nearest runs no layer, so each layer is held
    # as stored (bf16: half the memory of fp32; rtn.py computes in fp32 and writes the same values)
    sm = StreamedModel(ckpt, keep_stored_dtype=method == "rtn")
    templates = _disk_templates(ckpt, adapter, config)
    common = dict(method=method, bits=bits, group_size=group_size, symmetric=symmetric, clip_search=clip_search,
                  act_order=act_order, quantize_attention=quantize_attention, layer_bits=layer_bits, damp=damp,
                  expert_calibration=expert_calibration, trigger_weight=trigger_weight, output_format=output_format,
                  min_tokens=min_tokens if min_tokens is not None else max(8, round(0.005 * samples * seqlen)),
                  adapter=adapter, config=config, scale_dtype=torch.float32, templates=templates, expert_tokens={},
                  strategies={})
    if output_format == "pack-quantized" and templates is None:
        raise SECompressError(f"{path} stores its experts fused on disk, which compressed-tensors cannot describe "
                              f"per expert: use --format fake-quant")
    if output_format == "pack-quantized":  # fail on group widths before any long work
        _pack_layout(Engine(plan=Plan(policy, bits, layer_bits, []), **common), sm)

    from ..detect import detect

    tokenizer = handle.tokenizer
    calibration = None
    if method == "gptq":
        from ..data.calibration import build_calibration

        calibration = build_calibration(tokenizer, calib, samples, seqlen, seed)
    if policy and se_report is None:
        se_report = detect(handle, calib=calib, samples=samples, seqlen=seqlen, seed=seed, batch_size=batch_size,
                           progress=progress)
    ses = super_experts_from_report(se_report, config, adapter) if se_report is not None else []
    if policy and not ses:
        notes.append("The SE report lists no Super Experts: the SE policies had nothing to protect.")
    if "calib" in policy and method == "rtn":
        notes.append("SE policy 'calib' shapes GPTQ's Hessians; round-to-nearest uses no calibration, so it changes nothing.")
    plan = Plan(policy, bits, layer_bits, ses)

    from ..export.writer import open_writer

    engine = Engine(plan=plan, **common)
    engine.notes += notes
    with open_writer(ckpt, Path(out), new_config, force=force) as writer:  # torchrun: rank 0 writes
        engine.scale_dtype = writer.dtype
        if output_format == "pack-quantized":
            new_config.quantization_config = _pack_layout(engine, sm)
        writer.add_outside_layers(sm.model)
        ids = calibration.input_ids if method == "gptq" else None  # RTN: no batches, layers only written
        triggers = TriggerMask(trigger_mask(ids, ses), batch_size, engine.trigger_ref) if ids is not None else None
        stream_layers(sm, ids, batch_size, rounds_for=lambda i, layer: engine.layer_rounds(writer, i, layer, triggers),
                      data_parallel=True, progress=progress, desc=f"quantize {method} w{bits}")  # torchrun: own batches
        if not dist.is_main():
            return Path(out)
        report = summarize(engine, model=model_name(model), source=path, requested_format=requested_format,
                           calibration=calibration.describe() if calibration else None, se_report=se_report,
                           seconds=time.time() - start)
        extra = {"compression_report.json": json.dumps(report, indent=2),
                 "README.md": build_model_card(report)}
        out_path = writer.finish(extra_files=extra)
    report["size_bytes"] = sum(f.stat().st_size for f in out_path.glob("*.safetensors"))
    report["source_size_bytes"] = ckpt.size_bytes()
    report["seconds"] = round(time.time() - start, 2)
    report["metrics_seconds"] = round(engine.metric_seconds, 3)  # of which: the output errors of this report
    report["torch_threads"] = torch.get_num_threads()  # the BLAS's sums follow the threads: 1 and 2 give other bytes
    tmp = out_path / ".compression_report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out_path / "compression_report.json")
    from ..ownership import mark

    mark(out_path, ["compression_report.json"])  # rewritten by us: still ours (ownership.py)
    return out_path
