"""Speed and memory on the real layer shapes of Qwen3-30B-A3B, Mixtral-8x7B and DeepSeek-V2-Lite.

    python bench/scale.py --device auto                        # a few layers of each model, small calibration
    python bench/scale.py --device cuda --full-calibration     # on a GPU: 128 x 2048 tokens, as the issue's targets
    python bench/scale.py --big                                # + a Qwen3-30B-A3B-shaped checkpoint larger than RAM

Checkpoints with random bf16 weights and the exact layer shapes (real transformers config classes, per-expert
2-D keys on disk as on the Hub, a 4096-token vocabulary) are written layer by layer under --data (never the
whole model in memory), then each measure runs in its own subprocess (its peak RSS is its own):
- detect: the SE statistics pass, per-layer wall time from the detector's layer hook;
- quantize: GPTQ W4 g128, all-expert calibration (every token through every expert), pack-quantized output;
- solve: expert GPTQ of one layer, batched (gptq_quantize_batched, chunked by free memory) vs one expert at a
  time (gptq_quantize in a loop), same device, same inputs; codes compared.
Per-layer times are the mean over the MoE layers measured; full-model figures multiply by the real depth (a
dense first layer counted as an MoE one: an overestimate). With a small calibration budget the token-dependent
part is extrapolated linearly in tokens from two budgets (detect) and said so; GPTQ's solve does not depend on
the token count. Results: bench/results/scale.md/.json/.png.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

FULL_TOKENS = 128 * 2048  # the detection/calibration budget

MODELS = {
    "qwen3-30b-a3b": dict(cls="Qwen3MoeConfig", depth=48, kw=dict(
        hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[])),
    "mixtral-8x7b": dict(cls="MixtralConfig", depth=32, kw=dict(
        hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        intermediate_size=14336)),
    "deepseek-v2-lite": dict(cls="DeepseekV2Config", depth=27, kw=dict(
        hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64, n_shared_experts=2,
        num_experts_per_tok=6, moe_intermediate_size=1408, intermediate_size=10944, first_k_dense_replace=1,
        kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0)),
}


# ---------------------------------------------------------------------------------------------- checkpoints

EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def make_config(name: str, layers: int, vocab: int, experts: int | None = None):
    """The real shape of `name`; `experts`: build that many routed experts per layer instead (the per-expert shapes
    stay real: Mixtral-8x7B's passes on a CPU whose RAM cannot hold 8 experts' float64 Hessian sums beside the layer)."""
    import transformers

    spec = MODELS[name]
    if experts:
        spec = {**spec, "kw": {**spec["kw"], **{k: experts for k in EXPERT_COUNT_KEYS if k in spec["kw"]}}}
    return getattr(transformers, spec["cls"])(vocab_size=vocab, num_hidden_layers=layers, max_position_embeddings=4096,
                                              bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                                              dtype="bfloat16", **spec["kw"])


def _random(shape, name: str, generator) -> torch.Tensor:
    if name.endswith("norm.weight") or "layernorm" in name and name.endswith("weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=torch.bfloat16)
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)


class ExpertWeights:
    """Random expert matrices made fast: one random bf16 matrix per shape, each expert a different column roll of
    it (drawing 15 G normal numbers for the 30 GB checkpoint would take longer than the measures themselves)."""

    def __init__(self, generator):
        self.generator, self.base = generator, {}

    def __call__(self, shape, e: int) -> torch.Tensor:
        if shape not in self.base:
            self.base[shape] = _random(shape, "w", self.generator)
        return self.base[shape].roll(e * 7 + 1, dims=1)


def write_checkpoint(name: str, layers: int, out: Path) -> Path:
    """Random bf16 weights with `name`'s exact layer shapes, one safetensors shard per decoder layer."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from se_compress.models.adapters import adapter_for
    from se_compress.models.streaming import _expert_templates

    if (out / "model.safetensors.index.json").exists():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = REPO / "se_compress/default_model/weights"
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(weights / f, tmp / f)
    vocab = len(json.loads((weights / "tokenizer.json").read_text())["model"]["vocab"])
    config = make_config(name, layers, vocab)
    config.save_pretrained(tmp)
    adapter = adapter_for(config)
    gate_t, up_t, down_t = _expert_templates(adapter)[0]
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(0)
    expert = ExpertWeights(generator)
    weight_map, shards = {}, {}
    for key, t in model.state_dict().items():
        layer = int(key.split(".")[2]) if key.startswith("model.layers.") else None
        shards.setdefault(layer, []).append((key, tuple(t.shape)))
    for layer, entries in sorted(shards.items(), key=lambda kv: -1 if kv[0] is None else kv[0]):
        tensors = {}
        for key, shape in entries:
            if key.endswith(("experts.gate_up_proj", "experts.down_proj")):  # per-expert 2-D keys, as on the Hub
                prefix = f"model.layers.{layer}."
                for e in range(shape[0]):
                    if key.endswith("gate_up_proj"):
                        inter = shape[1] // 2
                        tensors[prefix + gate_t.format(e=e)] = expert((inter, shape[2]), 3 * e + layer)
                        tensors[prefix + up_t.format(e=e)] = expert((inter, shape[2]), 3 * e + layer + 1)
                    else:
                        tensors[prefix + down_t.format(e=e)] = expert(tuple(shape[1:]), 3 * e + layer + 2)
            else:
                tensors[key] = _random(shape, key, generator)
        file = f"model-{'outside' if layer is None else f'layer{layer:03d}'}.safetensors"
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in tensors})
        del tensors
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tmp.rename(out)
    return out


def replicate_layers(src: Path, layers: int, out: Path) -> Path:
    """A deeper checkpoint from a one-layer one: layer 0's shard copied (by the kernel) under each layer's names.

    The safetensors header (8-byte length + JSON) is rewritten with model.layers.0 -> model.layers.i; the data
    bytes are copied unchanged with os.copy_file_range, so a 30 GB checkpoint costs disk time, not CPU time.
    Every layer then holds the same random weights: the same work and memory per layer as distinct ones."""
    if (out / "model.safetensors.index.json").exists():
        return out
    tmp = out.with_name(out.name + ".partial")  # kept across interrupted runs: whole layer files are reused
    tmp.mkdir(parents=True, exist_ok=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    layer_file = next(f for k, f in index["weight_map"].items() if k.startswith("model.layers.0."))
    weight_map = {k: f for k, f in index["weight_map"].items() if not k.startswith("model.layers.")}
    for f in {*weight_map.values(), "tokenizer.json", "tokenizer_config.json"}:
        shutil.copy(src / f, tmp / f)
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    with open(src / layer_file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    data_start, data_len = 8 + header_len, (src / layer_file).stat().st_size - 8 - header_len
    for i in range(layers):
        renamed = {(k.replace("model.layers.0.", f"model.layers.{i}.", 1)): v for k, v in header.items()}
        text = json.dumps(renamed).encode()
        text += b" " * (-len(text) % 8)
        name = f"model-layer{i:03d}.safetensors"
        weight_map.update({k: name for k in renamed if k != "__metadata__"})
        if (tmp / name).exists() and (tmp / name).stat().st_size == 8 + len(text) + data_len:
            continue
        with open(src / layer_file, "rb") as fin, open(tmp / name, "wb") as fout:
            fout.write(len(text).to_bytes(8, "little") + text)
            fout.flush()
            offset, left = data_start, data_len
            while left:
                n = os.copy_file_range(fin.fileno(), fout.fileno(), left, offset)
                offset, left = offset + n, left - n
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tmp.rename(out)
    return out


# ---------------------------------------------------------------------------------------------- workers

def _peaks(placement) -> dict:
    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "peak_gpu_gb": (placement.peak_bytes() or 0) / 2**30 if placement.is_cuda else None}


def worker_detect(args) -> dict:
    from se_compress.detect import detect
    from se_compress.models.placement import use_device

    stamps = []
    with use_device(args.device) as placement:
        placement.reset_peak()
        start = time.perf_counter()
        detect(str(args.ckpt), samples=args.samples, seqlen=args.seqlen, batch_size=args.batch_size, progress=False,
               layer_hook=lambda i, layer: stamps.append(time.perf_counter()))
        end = time.perf_counter()
        _sync(placement)
    per_layer = [b - a for a, b in zip(stamps, stamps[1:] + [end])]
    return {"seconds": end - start, "per_layer": per_layer, "tokens": args.samples * args.seqlen,
            "placement": placement.describe(), **_peaks(placement)}


def worker_quantize(args) -> dict:
    from se_compress.models.placement import use_device
    from se_compress.quant import engine, quantize_model

    per_layer = []
    layer_rounds = engine.Engine.layer_rounds

    def timed(self, *a, **kw):  # a generator: the layer's time runs from its first round to its write
        t = time.perf_counter()
        yield from layer_rounds(self, *a, **kw)
        _sync(self_placement[0])
        per_layer.append(time.perf_counter() - t)

    engine.Engine.layer_rounds = timed
    self_placement = [None]
    out = Path(args.out_dir)
    with use_device(args.device) as placement:
        self_placement[0] = placement
        placement.reset_peak()
        start = time.perf_counter()
        quantize_model(str(args.ckpt), out, method=args.method, bits=4, group_size=128, se_policy="none",
                       expert_calibration="all", samples=args.samples, seqlen=args.seqlen, batch_size=args.batch_size,
                       progress=False, force=True)
        end = time.perf_counter()
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    report = json.loads((out / "compression_report.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": end - start, "per_layer": per_layer, "tokens": args.samples * args.seqlen, "method": args.method,
            "metrics_seconds": report.get("metrics_seconds"), "output_gb": size / 2**30,
            "placement": placement.describe(), **_peaks(placement)}


def worker_solve(args) -> dict:
    """One layer's down_proj GPTQ (own Hessian per expert) for `args.experts` experts: batched vs one at a time."""
    from se_compress.models.placement import use_device
    from se_compress.quant.gptq import (gptq_bytes_per_matrix, gptq_quantize, gptq_quantize_batched, prepare_hessian,
                                        prepare_hessians)
    from se_compress.quant.rtn import QuantSpec

    spec_m = MODELS[args.model]["kw"]
    hidden = spec_m["hidden_size"]
    inter = spec_m.get("moe_intermediate_size") or spec_m["intermediate_size"]
    E = args.experts
    spec = QuantSpec(4, 128, True)
    with use_device(args.device) as placement:
        dev = placement.device
        g = torch.Generator(device=dev).manual_seed(0)
        W = (torch.randn(E, hidden, inter, generator=g, device=dev) * 0.02).to(placement.compute_dtype)
        X = torch.randn(E, 2 * inter, inter, generator=g, device=dev)
        H = X.transpose(1, 2) @ X / X.shape[1]
        del X
        _sync(placement)
        placement.reset_peak()
        chunk = placement.chunk(E, gptq_bytes_per_matrix(hidden, inter, own_hessian=True))

        def run_batched():
            out = []
            for c in range(0, E, chunk):
                out += gptq_quantize_batched(W[c: c + chunk], prepare_hessians(H[c: c + chunk]), spec, torch.bfloat16)
            return out

        def run_single():
            return [gptq_quantize(W[e], prepare_hessian(H[e]), spec, torch.bfloat16) for e in range(E)]

        times = {"batched": [], "single": []}
        for _ in range(args.repeats):  # alternated, best of each: a shared machine's load shifts under a long run
            for kind, fn in (("batched", run_batched), ("single", run_single)):
                t = time.perf_counter()
                result = fn()
                _sync(placement)
                times[kind].append(time.perf_counter() - t)
                batched, single = (result, None) if kind == "batched" else (batched, result)
        t_batched, t_single = min(times["batched"]), min(times["single"])
        peak_batched = placement.peak_bytes()
    same = sum(int((a.q == b.q).sum()) for a, b in zip(batched, single)) / (E * hidden * inter)
    return {"experts": E, "shape": [hidden, inter], "chunk": chunk, "batched_s": t_batched, "one_at_a_time_s": t_single,
            "all_times": times,
            "speedup": t_single / t_batched, "codes_equal": same, "placement": placement.describe(),
            "peak_gpu_gb_batched": (peak_batched or 0) / 2**30 if placement.is_cuda else None}


def worker_passes(args) -> dict:
    """Each pass of one layer of `args.model` as a share of this process's measured matmul rate (bench/efficiency.py)."""
    import efficiency as eff

    from se_compress.models.adapters import adapter_for
    from se_compress.models.placement import use_device

    with use_device(args.device) as placement:
        dev, dtype = placement.device, placement.compute_dtype
        g = torch.Generator().manual_seed(0)
        config = make_config(args.model, 2, 4096, experts=args.built_experts)
        adapter = adapter_for(config)
        base, layer, idx = eff.build_layer(config, dtype, dev, g)
        batches, kwargs = [], None
        for _ in range(args.samples // args.batch_size):
            hidden, kwargs = eff.layer_inputs(base, layer, args.batch_size, args.seqlen, dtype, dev, g)
            batches.append(hidden)
        detect = eff.detect_pass(config, adapter, base, layer, idx, batches, kwargs, dtype, dev)
        hess = eff.hessian_pass(config, adapter, layer, batches, dtype, dev)
        collector = hess.pop("down_hessians")
        E = adapter.num_experts(config)
        gptq = eff.gptq_pass(config, adapter, layer, collector, min(E, args.experts or E), dev)
    return {"detect": detect, "hessian": hess, **gptq, "threads": torch.get_num_threads(),
            "placement": placement.describe(), "built_experts": E}


def _sync(placement):
    if placement is not None and placement.is_cuda:
        torch.cuda.synchronize(placement.device)


THREADS = [0]  # --threads: 0 = torch's default
WORKERS = {"detect": worker_detect, "quantize": worker_quantize, "solve": worker_solve, "passes": worker_passes}


def run_worker(kind: str, log, **kw) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind] + [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    print(f"[scale] {' '.join(cmd[2:])}", flush=True)
    start = time.time()
    threads = str(THREADS[0])  # a shared machine: one thread per measure (OpenMP barriers stall under oversubscription)
    env = {**os.environ, "PYTHONPATH": str(REPO), **({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
                                                    if THREADS[0] else {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    log.write(proc.stderr[-4000:])
    if proc.returncode != 0:
        print(proc.stderr[-2000:], flush=True)
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"[scale]   -> {time.time() - start:.0f} s: {json.dumps({k: v for k, v in result.items() if k != 'per_layer'})}",
          flush=True)
    return result


# ---------------------------------------------------------------------------------------------- report

def moe_mean(per_layer, name):
    """Mean per-layer time over the MoE layers (DeepSeek's first layer is dense)."""
    skip = MODELS[name]["kw"].get("first_k_dense_replace", 0)
    values = per_layer[skip:] or per_layer
    return sum(values) / len(values)


def summarize(results: dict) -> dict:
    rows = []
    for name, r in results["models"].items():
        depth = MODELS[name]["depth"]
        row = {"model": name, "layers_measured": r.get("layers", "-"), "full_depth": depth, "passes": r.get("passes")}
        for kind in ("detect", "detect_small", "quantize"):
            m = r.get(kind)
            if not m or "error" in m:
                continue
            per = moe_mean(m["per_layer"], name)
            row[kind] = {"tokens": m["tokens"], "per_layer_s": per, "full_model_min": per * depth / 60,
                         "peak_rss_gb": m["peak_rss_gb"], "peak_gpu_gb": m["peak_gpu_gb"]}
            if m.get("metrics_seconds") is not None:  # the report's output errors, inside the quantize run
                row[kind].update(metrics_seconds=m["metrics_seconds"], seconds=m["seconds"],
                                 metrics_share=m["metrics_seconds"] / m["seconds"])
        p, q = r.get("passes") or {}, row.get("quantize")
        if q and all(k in p for k in ("hessian", "gptq", "metrics")):  # the whole layer against the passes' rates
            tokens_ratio = q["tokens"] / p["hessian"]["tokens"]
            experts_ratio = p["of_experts"] / p["experts"]
            parts = {"hessian": tokens_ratio, "gptq": experts_ratio, "metrics": experts_ratio}
            ideal = sum(p[k]["ideal_seconds"] * f for k, f in parts.items())
            q["layer_efficiency"] = {"ideal_s": ideal, "efficiency": ideal / q["per_layer_s"],
                                     "flops": sum(p[k]["flops"] * f for k, f in parts.items()),
                                     **{f"{k}_flops": p[k]["flops"] * f for k, f in parts.items()}}
        d, s = row.get("detect"), row.get("detect_small")
        if d and s and d["tokens"] != s["tokens"]:  # linear in tokens: load + tokens x cost per token
            slope = (d["per_layer_s"] - s["per_layer_s"]) / (d["tokens"] - s["tokens"])
            fixed = d["per_layer_s"] - slope * d["tokens"]
            per = fixed + max(slope, 0) * FULL_TOKENS
            row["detect_full_tokens_estimate"] = {"per_layer_s": per, "full_model_min": per * depth / 60,
                                                  "fixed_per_layer_s": fixed, "seconds_per_1k_tokens": slope * 1000}
        row["solve"] = r.get("solve")
        rows.append(row)
    results["rows"] = rows
    return results


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [f"# Scale: real layer shapes ({env['device']}, {env['when']})", "",
             f"Command: `{results['command']}`", "",
             f"Device: {env['device_name']}; torch {env['torch']}; {env['cpus']} CPU cores ({env.get('threads', '?')} "
             f"thread(s) per measure); RAM {env['ram_gb']:.0f} GiB.",
             "Random bf16 weights with the exact layer shapes; a 4096-token vocabulary (embedding and lm_head are "
             "small here, as they are a small share of the real models). GPTQ: W4 g128 symmetric, all-expert "
             "calibration, pack-quantized output, report metrics included.", ""]
    if not results["environment"]["cuda"]:
        lines += ["**No GPU was measured in this run.** The GPU figures need `bench/gpu_checks.sh` on a CUDA machine.", ""]
    lines += passes_markdown(results)
    lines += ["| model | layers run | full depth | detect tokens | detect s/layer | detect full model (min) | "
              "GPTQ tokens | GPTQ s/layer | GPTQ full model (min) | peak RSS GiB (detect / GPTQ) | peak GPU GiB |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        if row["layers_measured"] == "-":  # --only-passes
            continue
        d, q = row.get("detect") or {}, row.get("quantize") or {}
        gpu = "/".join(f"{x['peak_gpu_gb']:.1f}" for x in (d, q) if x and x.get("peak_gpu_gb") is not None) or "-"
        fmt = lambda x, k, f="{:.1f}": f.format(x[k]) if x and k in x else "-"  # noqa: E731
        lines.append(f"| {row['model']} | {row['layers_measured']} | {row['full_depth']} | {fmt(d, 'tokens', '{}')} | "
                     f"{fmt(d, 'per_layer_s')} | {fmt(d, 'full_model_min')} | {fmt(q, 'tokens', '{}')} | "
                     f"{fmt(q, 'per_layer_s')} | {fmt(q, 'full_model_min')} | "
                     f"{fmt(d, 'peak_rss_gb')} / {fmt(q, 'peak_rss_gb')} | {gpu} |")
    for row in results["rows"]:
        q = row.get("quantize") or {}
        if "metrics_share" in q:
            lines.append(f"\n{row['model']}: the report's metrics took {q['metrics_seconds']:.1f} s of the GPTQ run's "
                         f"{q['seconds']:.0f} s ({100 * q['metrics_share']:.1f}%; issue 18's target: at most 10%).")
        if "layer_efficiency" in q:
            e = q["layer_efficiency"]
            lines.append(f"{row['model']}: one whole layer's GPTQ (every expert) needs {e['flops'] / 1e12:.2f} TFLOP "
                         f"(Hessians of {q['tokens']} tokens {e['hessian_flops'] / 1e9:.0f} GFLOP, solves "
                         f"{e['gptq_flops'] / 1e9:.0f}, metrics {e['metrics_flops'] / 1e9:.0f}): ideal {e['ideal_s']:.0f} s "
                         f"at the per-pass rates measured above, measured {q['per_layer_s']:.0f} s: "
                         f"{100 * e['efficiency']:.0f}% of the matmul rate.")
    est = [r for r in results["rows"] if "detect_full_tokens_estimate" in r]
    if est:
        lines += ["", f"Detection extrapolated to {FULL_TOKENS} calibration tokens (128 x 2048), linear in tokens "
                  "from the two budgets measured (per layer = fixed load/setup + tokens x cost per token):", "",
                  "| model | fixed s/layer | s per 1k tokens per layer | s/layer at 128x2048 | full model (min) |",
                  "|---|---|---|---|---|"]
        for r in est:
            e = r["detect_full_tokens_estimate"]
            lines.append(f"| {r['model']} | {e['fixed_per_layer_s']:.1f} | {e['seconds_per_1k_tokens']:.2f} | "
                         f"{e['per_layer_s']:.0f} | {e['full_model_min']:.0f} |")
    solves = [r for r in results["rows"] if r.get("solve") and "error" not in r["solve"]]
    if solves:
        lines += ["", "Expert GPTQ of one layer's down_proj (own Hessian per expert), same device, same inputs:", "",
                  "| model | experts | matrix | chunk | batched s | one at a time s | speedup | codes equal |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in solves:
            s = r["solve"]
            lines.append(f"| {r['model']} | {s['experts']} | {s['shape'][0]}x{s['shape'][1]} | {s['chunk']} | "
                         f"{s['batched_s']:.2f} | {s['one_at_a_time_s']:.2f} | {s['speedup']:.1f}x | "
                         f"{100 * s['codes_equal']:.3f}% |")
    big = results.get("big")
    if big:
        lines += ["", f"Checkpoint larger than RAM: {big['layers']} Qwen3-30B-A3B layers, {big['size_gb']:.1f} GiB on "
                  f"disk, {env['ram_gb']:.0f} GiB RAM:", "", "| stage | tokens | wall s | s/layer | peak RSS GiB | "
                  "share of RAM |", "|---|---|---|---|---|---|"]
        for kind in ("detect", "quantize", "quantize_rtn", "quantize_gptq"):  # "quantize": runs before 'rtn,gptq'
            m = big.get(kind)
            if m and "error" not in m:
                label = f"quantize ({m.get('method', 'gptq').upper()} W4 g128)" if kind.startswith("quantize") else kind
                lines.append(f"| {label} | {m['tokens']} | {m['seconds']:.0f} | {moe_mean(m['per_layer'], 'qwen3-30b-a3b'):.1f} "
                             f"| {m['peak_rss_gb']:.2f} | {100 * m['peak_rss_gb'] / env['ram_gb']:.0f}% |")
            elif m:
                lines.append(f"| {kind} | - | failed: {m['error']} | | | |")
    lines += ["", *[f"- {n}" for n in results.get("notes", [])]]
    return "\n".join(lines) + "\n"


PASS_NAMES = {"detect": "detection (attention + routed experts, SE statistics)",
              "hessian": "Hessians (all-expert: gate/up of every token, X^T X per expert)",
              "gptq": "GPTQ W4 g128 solve (down_proj own H, gate/up shared H)",
              "metrics": "report metrics (GPTQ and RTN output error)"}


def passes_markdown(results: dict) -> list[str]:
    """The per-pass efficiency table (bench/efficiency.py), with the earlier run's figures when --before is given."""
    rows = [(name, r["passes"]) for name, r in results["models"].items() if r.get("passes")]
    if not rows:
        return []
    before = results.get("before") or {}
    lines = ["Each pass of one real-shaped layer as a share of this process's own matmul rate, measured right before "
             "the pass on that pass's shapes and dtype (bench/efficiency.py: efficiency = needed FLOPs / (time x "
             "measured rate); with several matmul kinds, the ideal time is the sum of each kind's FLOPs / rate).", "",
             "| model | pass | tokens | needed GFLOP | measured rate GFLOP/s | ideal s | measured s | efficiency | "
             "vs cached-weight rate |" + (" efficiency before |" if before else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if before else "")]
    for name, p in rows:
        if "error" in p:
            lines.append(f"| {name} | failed: {p['error']} | | | | | | | |" + (" |" if before else ""))
            continue
        for kind in ("detect", "hessian", "gptq", "metrics"):
            m = p[kind]
            tokens = m.get("tokens", f"{p['experts']} of {p['of_experts']} experts" if kind in ("gptq", "metrics") else "-")
            old = ((before.get(name) or {}).get(kind) or {}).get("efficiency")
            lines.append(f"| {name} | {PASS_NAMES[kind]} | {tokens} | {m['flops'] / 1e9:.0f} | {m['rate'] / 1e9:.0f} | "
                         f"{m['ideal_seconds']:.2f} | {m['seconds']:.2f} | {100 * m['efficiency']:.0f}% | "
                         + (f"{100 * m['efficiency_vs_cached_weights']:.0f}% |" if "efficiency_vs_cached_weights" in m
                            else "- |")
                         + (f" {100 * old:.0f}% |" if old is not None else (" - |" if before else "")))
    lines.append("")
    for name, p in rows:
        if "error" not in p:
            real = MODELS[name]["kw"]
            real_count = next(real[k] for k in EXPERT_COUNT_KEYS if k in real)
            if p.get("built_experts", real_count) != real_count:
                lines.append(f"- {name}: the layer was built with {p['built_experts']} of its {real_count} routed "
                             f"experts (real per-expert shapes; this CPU's RAM cannot hold all of them with their "
                             f"float64 Hessian sums); every figure is per FLOP, so it holds for the whole layer.")
            lines.append(f"- {name}: report metrics take {100 * p['metrics']['share_of_gptq_time']:.0f}% of the GPTQ "
                         f"solve time; GPTQ solved {p['experts']} of {p['of_experts']} experts, in chunks of "
                         f"{p['chunks']['down']} (down_proj) and {p['chunks']['gate_up']} (gate/up); threads "
                         f"{p['threads']}.")
    return lines + [""]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["model"] for r in rows]
    x = range(len(rows))
    for k, (kind, label) in enumerate((("detect", "detect"), ("quantize", "GPTQ W4 g128"))):
        vals = [(r.get(kind) or {}).get("full_model_min", 0) for r in rows]
        axes[0].bar([i + 0.4 * k for i in x], vals, width=0.4, label=label)
    axes[0].set_xticks([i + 0.2 for i in x], names, fontsize=8)
    axes[0].set_ylabel("minutes, full depth (extrapolated)")
    axes[0].set_title(f"measured budgets, {results['environment']['device']}")
    axes[0].legend()
    rss = [(f"{r['model']}\n{r['layers_measured']} layers", (r.get("quantize") or r.get("detect") or {}).get("peak_rss_gb", 0))
           for r in rows]
    if results.get("big") and results["big"].get("detect") and "error" not in results["big"]["detect"]:
        b = results["big"]
        rss.append((f"qwen3 {b['layers']} layers\n({b['size_gb']:.0f} GiB ckpt)",
                    max(b[k]["peak_rss_gb"] for k in ("detect", "quantize", "quantize_rtn", "quantize_gptq")
                        if b.get(k) and "error" not in b[k])))
    axes[1].bar(range(len(rss)), [v for _, v in rss])
    axes[1].set_xticks(range(len(rss)), [n for n, _ in rss], fontsize=7)
    axes[1].axhline(0.25 * results["environment"]["ram_gb"], color="red", ls="--", label="25% of RAM")
    axes[1].set_ylabel("peak RSS (GiB)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------------------------- main

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--layers", default="2", help="decoder layers per small checkpoint: N, or name=N,name=N")
    p.add_argument("--data", default="/work/scale-data", help="where the checkpoints go (not the repo)")
    p.add_argument("--out", default=str(REPO / "bench/results"))
    p.add_argument("--detect-tokens", default="4x128,16x128", help="two budgets SxL for the detect fit")
    p.add_argument("--gptq-tokens", default="2x128", help="GPTQ calibration budget SxL")
    p.add_argument("--full-calibration", action="store_true", help="128x2048 for detect and GPTQ (GPU)")
    p.add_argument("--solve-experts", type=int, default=16, help="experts in the batched-vs-loop solve (0: all)")
    p.add_argument("--skip-quantize", default="", help="models whose GPTQ run is skipped (CPU: too slow), comma list")
    p.add_argument("--skip-solve", default="", help="models whose batched-vs-loop solve is skipped, comma list")
    p.add_argument("--reuse", help="a scale.json of an earlier run: its measures fill in the skipped ones (labelled)")
    p.add_argument("--big", action="store_true", help="also the >RAM Qwen3-shaped checkpoint (~30 GB, 24 layers)")
    p.add_argument("--big-layers", type=int, default=24)
    p.add_argument("--big-quantize", default="gptq",
                   help="the >RAM checkpoint through quantize: gptq, rtn (the same streamed load/write without the "
                   "solves), both as 'rtn,gptq', or none")
    p.add_argument("--no-big-detect", action="store_true", help="the >RAM checkpoint: skip detect (merge an earlier run's)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=0, help="CPU threads per measure (0: torch's default; 1 on a shared CPU)")
    p.add_argument("--passes-tokens", default="4x128", help="SxL of the per-pass efficiency measure (bench/efficiency.py)")
    p.add_argument("--passes-experts", default="8", help="experts GPTQ-solved in the efficiency measure: N or name=N,..")
    p.add_argument("--only-passes", action="store_true", help="only the per-pass efficiency measure (no checkpoints)")
    p.add_argument("--passes-built-experts", default="", help="name=N,...: build N routed experts of that model's real "
                   "per-expert shape for the passes (a CPU without the RAM for all of them; said in the table)")
    p.add_argument("--built-experts", type=int, help=argparse.SUPPRESS)  # worker: passed by --passes-built-experts
    p.add_argument("--before", help="scale.json of a run of the code before a change: its pass efficiencies are "
                   "shown beside these")
    p.add_argument("--merge", help="comma list of scale.json files from runs on the same device: one report from them")
    # worker mode (one measure in this process)
    p.add_argument("--worker", choices=list(WORKERS))
    p.add_argument("--ckpt")
    p.add_argument("--method", default="gptq")
    p.add_argument("--out-dir")
    p.add_argument("--model")
    p.add_argument("--samples", type=int)
    p.add_argument("--seqlen", type=int)
    p.add_argument("--experts", type=int)
    p.add_argument("--repeats", type=int, default=2, help="solve: alternated repeats, best of each")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return
    THREADS[0] = args.threads

    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge.split(",")]
        results = parts[0]
        results["command"] = " ; ".join(dict.fromkeys(r["command"] for r in parts))
        for r in parts[1:]:
            for name, m in r["models"].items():  # one model's measures may come from several runs
                results["models"].setdefault(name, {}).update({k: v for k, v in m.items() if k not in
                                                               results["models"][name]})
            results["before"] = results.get("before") or r.get("before")
            results["big"] = {**(r.get("big") or {}), **(results.get("big") or {})}  # per stage, the first run's wins
            results["notes"] += [n for n in r["notes"] if n not in results["notes"]]
        write_results(results, Path(args.out))
        return

    from se_compress.models.placement import resolve_device

    device = resolve_device(args.device)
    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    budget = lambda s: tuple(int(v) for v in s.split("x"))  # noqa: E731
    detect_budgets = [(128, 2048)] if args.full_calibration else [budget(b) for b in args.detect_tokens.split(",")]
    gptq_budget = (128, 2048) if args.full_calibration else budget(args.gptq_tokens)
    cuda = device.type == "cuda"
    env = {"device": str(device), "cuda": cuda, "threads": args.threads or torch.get_num_threads(), "device_name": torch.cuda.get_device_name(device) if cuda else "CPU",
           "torch": torch.__version__, "cpus": os.cpu_count(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "ram_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30}
    results = {"command": "python " + " ".join(sys.argv), "environment": env, "models": {}, "notes": []}
    if args.before:
        results["before"] = {n: r.get("passes") for n, r in json.loads(Path(args.before).read_text())["models"].items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(data / "scale.log", "a")
    common = dict(device=str(device), batch_size=args.batch_size)
    def reused(name, kind):  # read when needed: the earlier run may still be finishing
        if not args.reuse or not Path(args.reuse).exists():
            return None
        return json.loads(Path(args.reuse).read_text())["models"].get(name, {}).get(kind)

    layer_counts = dict(kv.split("=") for kv in args.layers.split(",")) if "=" in args.layers else {}
    passes_experts = dict(kv.split("=") for kv in args.passes_experts.split(",")) if "=" in args.passes_experts else {}
    for name in [m for m in args.models.split(",") if m]:
        s, l = budget(args.passes_tokens)
        built = dict(kv.split("=") for kv in args.passes_built_experts.split(",") if kv)
        results["models"].setdefault(name, {})["passes"] = run_worker(
            "passes", log, model=name, samples=s, seqlen=l, batch_size=min(args.batch_size, s), device=str(device),
            **({"built_experts": int(built[name])} if name in built else {}),
            experts=int(passes_experts.get(name, 8 if passes_experts else args.passes_experts)))
        if args.only_passes:
            write_results(results, out)  # after each model: a run stopped at its time limit keeps what it measured
            continue
        (out / "scale.json").write_text(json.dumps(results, indent=2))
        t = time.time()
        layers = int(layer_counts.get(name, 2 if layer_counts else args.layers))
        ckpt = write_checkpoint(name, layers, data / f"{name}-{layers}layers")
        print(f"[scale] {name}: checkpoint ready ({time.time() - t:.0f} s)", flush=True)
        r = results["models"][name]
        r.update(layers=layers, checkpoint=str(ckpt))
        runs = [("detect", detect_budgets[-1])] + ([("detect_small", detect_budgets[0])] if len(detect_budgets) > 1 else [])
        for kind, (s, l) in runs:
            r[kind] = run_worker("detect", log, ckpt=ckpt, samples=s, seqlen=l, **common)
        if name not in args.skip_quantize.split(","):
            r["quantize"] = run_worker("quantize", log, ckpt=ckpt, out_dir=data / f"{name}-q", samples=gptq_budget[0],
                                       seqlen=gptq_budget[1], **common)
        experts = MODELS[name]["kw"].get("num_experts") or MODELS[name]["kw"].get("num_local_experts") or \
            MODELS[name]["kw"]["n_routed_experts"]
        if name not in args.skip_solve.split(","):
            r["solve"] = run_worker("solve", log, model=name, experts=min(experts, args.solve_experts or experts),
                                    device=str(device))
        for kind in ("quantize", "solve"):
            old = reused(name, kind)
            if kind not in r and old and "error" not in old and old["placement"]["device"] == str(device):
                r[kind] = old
                results["notes"].append(f"{name} {kind}: measured by an earlier run of this script on the same device "
                                        f"({args.reuse}), same code; not rerun here to save CPU time.")
        (out / "scale.json").write_text(json.dumps(summarize(results), indent=2))
    if args.big:
        t = time.time()
        one = write_checkpoint("qwen3-30b-a3b", 1, data / "qwen3-30b-a3b-1layers")
        ckpt = replicate_layers(one, args.big_layers, data / f"qwen3-30b-a3b-{args.big_layers}layers")
        size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 2**30
        print(f"[scale] big checkpoint ready: {size:.1f} GiB ({time.time() - t:.0f} s)", flush=True)
        big = results["big"] = {"layers": args.big_layers, "size_gb": size, "checkpoint": str(ckpt)}
        s, l = detect_budgets[0]
        if not args.no_big_detect:
            big["detect"] = run_worker("detect", log, ckpt=ckpt, samples=s, seqlen=l, **common)
        for method in [m for m in args.big_quantize.split(",") if m != "none"]:
            big[f"quantize_{method}"] = run_worker("quantize", log, ckpt=ckpt, out_dir=data / "qwen3-big-q",
                                                   samples=gptq_budget[0], seqlen=gptq_budget[1], method=method, **common)
            write_results(results, out)  # after each stage: a long GPTQ run stopped early keeps the rest
    if not cuda:
        results["notes"].append("CPU only (2 shared cores): calibration budgets are small and the full-model minutes are "
                                "for those budgets; the detect table above extrapolates to 128x2048 tokens linearly. "
                                "No GPU figure is quoted: none was measured.")
    results["notes"].append("Peak RSS includes the Python/torch process (~0.5 GiB). Full-model minutes = mean MoE-layer "
                            "time x real depth (embedding/lm_head small here).")
    write_results(results, out)


def write_results(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    summarize(results)
    (out / "scale.json").write_text(json.dumps(results, indent=2))
    (out / "scale.md").write_text(markdown(results))
    plot(results, out / "scale.png")
    print(markdown(results))


if __name__ == "__main__":
    main()
