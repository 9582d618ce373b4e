"""compression_report.json and the model card (README.md) written next to the quantized weights."""
import statistics

from .policies import KEEP_BITS

VLLM_NOTE = ("vLLM loads compressed-tensors WNA16 (symmetric int experts, one scheme per MoE layer); "
             "not run here (no vLLM on this CPU machine)")


def loading(engine, requested_format) -> dict:
    plan = engine.plan
    if engine.output_format == "fake-quant":
        keep = plan.keeps_experts()
        why = ("SE experts kept in bf16 inside quantized layers: per-expert mixed precision, not loadable as a "
               "quantized model by vLLM or transformers; the weights are dequantized (fake-quant) for evaluation"
               if keep else "dequantized (fake-quant) weights: a plain dense checkpoint for evaluation, not compressed")
        return {"format": "fake-quant", "compressed_on_disk": False, "deployable_quantized": False,
                "transformers": "loads as a dense model (the quantization error is in the weights)",
                "vllm": "loads as a dense model, no memory saving", "se_compress": True, "why": why}
    if plan.mixed_layers():
        return {"format": "pack-quantized", "compressed_on_disk": True, "deployable_quantized": True,
                "transformers": False, "vllm": "expected: " + VLLM_NOTE, "se_compress": True,
                "why": f"layers {sorted(plan.se_layers)} hold Super Experts and use "
                       f"{'bf16' if engine.layer_bits == KEEP_BITS else f'int{engine.layer_bits}'} experts: vLLM takes "
                       f"one scheme per MoE layer; transformers 5.23 decompresses every layer's experts with the first "
                       f"experts scheme, so it cannot load this checkpoint (se_compress's PackedCheckpoint can)"}
    return {"format": "pack-quantized", "compressed_on_disk": True, "deployable_quantized": True,
            "transformers": True, "vllm": "expected: " + VLLM_NOTE, "se_compress": True,
            "why": "one uniform scheme for all experts: plain AutoModelForCausalLM.from_pretrained loads it (CPU "
                   "included; tested: logits equal the fake-quant model)"}


def _mean(values):
    return statistics.fmean(values) if values else None


def layer_summary(modules) -> list[dict]:
    by_layer = {}
    for m in modules:
        by_layer.setdefault(m["layer"], []).append(m)
    out = []
    for layer, mods in sorted(by_layer.items()):
        experts = [m for m in mods if isinstance(m.get("expert"), int) and not m.get("kept")]
        others = [m for m in mods if m not in experts and not m.get("kept")]
        row = {"layer": layer, "kept": sum(1 for m in mods if m.get("kept")),
               "fallbacks": sum(1 for m in mods if m.get("fallback"))}
        for key in ("weight_error", "output_error", "rtn_output_error"):
            ev = [m[key] for m in experts if key in m]
            row[f"experts_mean_{key}"] = _mean(ev)
            row[f"experts_max_{key}"] = max(ev) if ev else None
        row["other_modules"] = {m["name"].split(".", 3)[-1]: {k: m.get(k) for k in ("bits", "weight_error", "output_error")}
                                for m in others}
        out.append(row)
    return out


def summarize(engine, *, model, source, requested_format, calibration, se_report, seconds) -> dict:
    plan = engine.plan
    quantized = [m for m in engine.modules if not m.get("kept")]
    params = sum(m["shape"][0] * m["shape"][1] for m in quantized)
    bits_sum = sum(m["shape"][0] * m["shape"][1] * m["bits"] for m in quantized)
    kept = sum(m.get("params", 0) for m in engine.modules if m.get("kept"))  # weights left in 16 bit by the policy
    ses = []
    for s in plan.ses:
        ses.append({"layer": s.layer, "expert": s.expert, "channel": s.channel, "trigger_token_id": s.token_id,
                    "trigger_position": s.position, "bits": plan.expert_bits(s.layer, s.expert),
                    "noclip": plan.noclip(s.layer, s.expert), "calib": plan.calib(s.layer, s.expert) and engine.method == "gptq",
                    "routed_tokens": (engine.expert_tokens.get(s.layer) or [None] * (int(s.expert) + 1))[s.expert]
                    if isinstance(s.expert, int) else None})
    zero_token = [(l, x) for l, counts in engine.expert_tokens.items() for x, c in enumerate(counts) if c == 0]
    return {
        "model": model,
        "source": str(source),
        "architecture": engine.config.model_type,
        "method": engine.method,
        "bits": engine.bits,
        "group_size": engine.group_size,
        "group_strategies": engine.strategies,
        "symmetric": engine.symmetric,
        "se_policy": sorted(plan.policy) or ["none"],
        "layer_bits": engine.layer_bits if "layer" in plan.policy else None,
        "clip_search": engine.clip_search,
        "act_order": engine.act_order,
        "quantize_attention": engine.quantize_attention,
        "requested_format": requested_format,
        "output_format": engine.output_format,
        "loading": loading(engine, requested_format),
        "never_quantized": ["embeddings", "lm_head", "routers", "shared-expert gates", "norms", "biases"],
        "calibration": calibration,
        "expert_calibration": {
            "mode": engine.expert_calibration if engine.method == "gptq" else None,
            "rule": ("every calibration token through every expert for the Hessians; the layer output follows the "
                     "real routing" if engine.expert_calibration == "all" else
                     f"routed tokens only; experts with < {engine.min_tokens} tokens fall back to round-to-nearest"),
            "trigger_weight": engine.trigger_weight if "calib" in plan.policy else None,
            "experts_with_no_routed_token": len(zero_token),
        },
        "gptq": {"damp": engine.damp, "blocksize": 128, "act_order": engine.act_order,
                 "static_groups": engine.act_order} if engine.method == "gptq" else None,
        "super_experts": ses,
        "super_weights": engine.super_weights,
        "se_report": {"criterion": (se_report or {}).get("criterion"), "count": len(plan.ses)} if se_report else None,
        "quantized_parameters": params,
        "average_bits": bits_sum / params if params else None,
        "effective_bits": (bits_sum + KEEP_BITS * kept) / (params + kept) if params + kept else None,
        "kept_modules": [m["name"] for m in engine.modules if m.get("kept")],
        "layers": layer_summary(engine.modules),
        "modules": engine.modules,
        "warnings": engine.warnings,
        "notes": engine.notes,
        "seconds": round(seconds, 2),
    }


def build_model_card(report: dict) -> str:
    load = report["loading"]
    bits = report["bits"]
    g = f"g{report['group_size']}" if report["group_size"] else "per-channel"
    tags = ["se_compress", "moe", "super-experts", f"int{bits}", report["method"]]
    if load["format"] == "pack-quantized":
        tags.append("compressed-tensors")
    lines = ["---", f"base_model: {report['model']}", "base_model_relation: quantized", "library_name: transformers",
             "tags:"] + [f"- {t}" for t in tags] + ["---", "",
             f"# {report['model']}: W{bits} {g} {report['method'].upper()}, SE policy {'+'.join(report['se_policy'])}", "",
             f"Quantized with se_compress ({report['method']}, int{bits} {g}, "
             f"{'symmetric' if report['symmetric'] else 'asymmetric'}), format **{load['format']}**.", "",
             "## Where it loads", "",
             f"- transformers: {load['transformers']}",
             f"- vLLM: {load['vllm']}",
             "- se_compress: yes (`se_compress.quant.compressed_tensors.PackedCheckpoint` for pack-quantized)",
             f"- {load['why']}.", ""]
    if not load.get("deployable_quantized"):
        lines += ["**Not deployable as a quantized model**: use it for evaluation.", ""]
    if report["super_experts"]:
        lines += ["## Super Experts", "", "| layer | expert | channel | bits | noclip | calib |", "|---|---|---|---|---|---|"]
        for s in report["super_experts"]:
            lines.append(f"| {s['layer']} | {s['expert']} | {s['channel']} | {'bf16' if s['bits'] == KEEP_BITS else s['bits']} "
                         f"| {s['noclip']} | {s['calib']} |")
        lines.append("")
    if report["super_weights"]:
        lines += ["Super weights after quantization:", ""]
        for w in report["super_weights"]:
            lines.append(f"- {w['module']}[{w['row']}, {w['col']}]: {w['value']:.5g} -> {w['quantized']:.5g}")
        lines.append("")
    lines += ["Never quantized: " + ", ".join(report["never_quantized"]) + ".", "",
              "Details: `compression_report.json` (bits, group size, per-module error, SE handling)."]
    for note in report["notes"]:
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"
