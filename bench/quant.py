"""Quantization benchmark: perplexity (--text, default the held-out books), size on disk and time for bf16 and W4/W3/W2 (g128) with RTN and
GPTQ under each SE policy (none, noclip, calib, layer, keep), and GPTQModel 7.6.0 side by side on the same model,
calibration tokens and perplexity windows. Writes bench/results/quant.json, quant.md and quant.png.

    python bench/quant.py                      # the default model
    python bench/quant.py --model path/to/moe --bits 4 --eval-windows 64

GPTQModel runs through the peers' runner in its own virtual environment (se_compress/peers: `make peers` or
`python bench/quant.py --setup-gptqmodel` creates build/gptqmodel-venv with gptqmodel==7.6.0,
GPTQMODEL_CPU_WORKERS=2), on the same calibration ids; its dense dequantized copy is measured by our evaluator on
the same windows. If it cannot install or run, the exact error goes into the results instead of its numbers.
"""
import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
POLICIES = ["none", "noclip", "calib", "layer", "keep", "noclip,calib"]  # the last: the CLI's default


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq"])
    ap.add_argument("--policies", nargs="+", default=POLICIES)
    ap.add_argument("--group-size", type=int, default=32, help="32: the default model's experts are 32 wide")
    ap.add_argument("--samples", type=int, default=64, help="calibration sequences (GPTQ, detection, GPTQModel)")
    ap.add_argument("--seqlen", type=int, default=256, help="calibration sequence length")
    ap.add_argument("--eval-windows", type=int, default=256, help="perplexity windows (0: all)")
    ap.add_argument("--text", default="books", help="perplexity text: books (the default model's held-out books, "
                                                     "in domain), wikitext2 or a text file")
    ap.add_argument("--out", default=str(RESULTS), help="results folder")
    ap.add_argument("--work", default=str(REPO / "build" / "bench-quant"), help="scratch folder for checkpoints")
    ap.add_argument("--skip-gptqmodel", action="store_true")
    ap.add_argument("--setup-gptqmodel", action="store_true", help="create the GPTQModel peer venv and exit")
    ap.add_argument("--resume", action="store_true", help="keep the rows of an interrupted (quant.json.tmp) or finished run")
    ap.add_argument("--redo", nargs="*", default=[], help="with --resume: run these SE policies again")
    return ap.parse_args(argv)


def size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def run_gptqmodel(args, model_path, calibration, windows, bits, work: Path) -> dict:
    """GPTQModel through the peers' runner (se_compress/peers: its own venv, our calibration ids, GPTQModel's own
    dequantization into a dense copy), then our evaluator on the same windows as our rows."""
    from se_compress.errors import SECompressError
    from se_compress.eval.perplexity import perplexity_streamed
    from se_compress.models.checkpoint import Checkpoint
    from se_compress.peers import run_peer, setup_peer

    row = {"tool": "GPTQModel 7.6.0", "method": "gptqmodel", "bits": bits, "policy": "n/a"}
    out = work / f"gptqmodel-w{bits}"
    shutil.rmtree(out, ignore_errors=True)
    start = time.time()
    try:
        setup_peer("gptqmodel")
        peer = run_peer("gptqmodel", model_path, calibration, bits, args.group_size, out)
    except SECompressError as exc:  # not installable here, or the run failed: its exact error goes in the row
        return {**row, "ok": False, "error": str(exc)}
    wall = round(time.time() - start, 1)
    ppl = perplexity_streamed(Checkpoint(out / peer["checkpoint"]), windows, progress=False)["ppl"]
    shutil.rmtree(out, ignore_errors=True)
    return {**row, "ok": True, "ppl": ppl, "seconds": peer["runner"].get("quantize_seconds"),
            "size_bytes": peer["runner"].get("gptq_size_bytes"), "peak_rss_mib": peer["peak_rss_mib"],
            "wall_seconds": wall}


def main(argv=None):
    args = parse_args(argv)
    from se_compress.data.calibration import build_calibration
    from se_compress.detect import detect, load_tokenizer
    from se_compress.eval.perplexity import default_seqlen, eval_text, perplexity_streamed, text_windows
    from se_compress.models.checkpoint import Checkpoint, resolve_model
    from se_compress.quant import quantize_model
    from se_compress.quant.compressed_tensors import PackedCheckpoint

    if args.setup_gptqmodel:
        from se_compress.peers import setup_peer

        print(f"GPTQModel ready: {setup_peer('gptqmodel')}")
        return 0
    out_dir, work = Path(args.out), Path(args.work)
    out_dir.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    path = resolve_model(args.model)
    ckpt = Checkpoint(path)
    tokenizer = load_tokenizer(path)
    seqlen = default_seqlen(ckpt.config)
    text = eval_text(args.text)
    windows = text_windows(tokenizer, text, seqlen, args.eval_windows or None)
    calibration = build_calibration(tokenizer, "wikitext2", args.samples, args.seqlen, 0)
    tmp = out_dir / "quant.json.tmp"
    results = None
    if args.resume:
        previous = tmp if tmp.exists() else out_dir / "quant.json"
        results = json.loads(previous.read_text()) if previous.exists() else None
    if results is not None:
        if args.redo:
            results["rows"] = [r for r in results["rows"] if r.get("policy") not in args.redo]
        results.setdefault("reruns", []).append("python bench/quant.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    if results is None:
        env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS",) if k in os.environ)
        command = "python bench/quant.py " + " ".join(argv if argv is not None else sys.argv[1:])
        results = {"command": f"{env} {command}".strip(),
                   "model": args.model, "model_path": str(path), "architecture": ckpt.config.model_type,
                   "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                               "torch": torch.__version__},
                   "eval": {"text": text.key, "text_label": text.label, "seqlen": seqlen,
                            "windows": int(windows.shape[0]), "tokens": int(windows.shape[0] * (seqlen - 1))},
                   "calibration": calibration.describe(), "group_size": args.group_size, "rows": []}
    done = {(r["method"], r["bits"], r["policy"]) for r in results["rows"] if r.get("ok", True)}

    def save():
        tmp.write_text(json.dumps(results, indent=2))

    if ("bf16", 16, "n/a") not in done:
        start = time.time()
        ppl = perplexity_streamed(ckpt, windows, progress=False)["ppl"]
        results["rows"].append({"method": "bf16", "bits": 16, "policy": "n/a", "ppl": ppl, "size_bytes": ckpt.size_bytes(),
                                "eval_seconds": round(time.time() - start, 1), "ok": True})
        print(f"bf16: ppl {ppl:.3f}", flush=True)
        save()
    if "se_report" not in results:
        start = time.time()
        report = detect(str(path), samples=args.samples, seqlen=args.seqlen, progress=False)
        results["se_report"] = {"seconds": round(time.time() - start, 1), "criterion": report["criterion"],
                                "super_experts": report["super_experts"]}
        save()
    se_report = {"architecture": results["architecture"], "super_experts": results["se_report"]["super_experts"]}
    print("Super Experts:", [(s["layer"], s["expert"], s["channel"], s["token"]) for s in se_report["super_experts"]], flush=True)

    for bits in args.bits:
        for method in args.methods:
            for policy in args.policies:
                if (method, bits, policy) in done:
                    continue
                out = work / f"{method}-w{bits}-{policy}"
                start = time.time()
                quantize_model(str(path), out, method=method, bits=bits, group_size=args.group_size, se_policy=policy,
                               se_report=se_report, samples=args.samples, seqlen=args.seqlen, force=True,
                               progress=False)
                seconds = time.time() - start
                report = json.loads((out / "compression_report.json").read_text())
                reader = PackedCheckpoint(out) if report["output_format"] == "pack-quantized" else Checkpoint(out)
                start = time.time()
                ppl = perplexity_streamed(reader, windows, progress=False)["ppl"]
                sw = report["super_weights"]
                results["rows"].append({
                    "method": method, "bits": bits, "policy": policy, "ppl": ppl, "ok": True,
                    "seconds": round(seconds, 1), "eval_seconds": round(time.time() - start, 1),
                    "size_bytes": report["size_bytes"], "format": report["output_format"],
                    "transformers": report["loading"]["transformers"], "vllm": report["loading"]["vllm"],
                    "deployable_quantized": report["loading"]["deployable_quantized"],
                    "average_bits": report["average_bits"], "effective_bits": report.get("effective_bits"),
                    "super_weight_max_rel_error": max((w["rel_error"] for w in sw), default=None),
                    "super_weights": [{k: w[k] for k in ("module", "row", "col", "value", "quantized")} for w in sw],
                    "experts_mean_output_error": _mean([l.get("experts_mean_output_error") for l in report["layers"]]),
                })
                print(f"{method} w{bits} {policy}: ppl {ppl:.3f}, {seconds:.0f} s", flush=True)
                shutil.rmtree(out, ignore_errors=True)
                save()
    if not args.skip_gptqmodel:
        for bits in args.bits:
            if ("gptqmodel", bits, "n/a") in done:
                continue
            row = run_gptqmodel(args, path, calibration.input_ids, windows, bits, work / "gptqmodel")
            results["rows"].append(row)
            print(f"GPTQModel w{bits}: " + (f"ppl {row['ppl']:.3f}, {row['seconds']} s" if row["ok"] else row["error"][:300]),
                  flush=True)
            save()
    write_outputs(results, out_dir)
    tmp.unlink(missing_ok=True)
    return 0


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _mib(n):
    return f"{n / 2**20:.2f}" if n else "-"


def write_outputs(results: dict, out_dir: Path) -> None:
    (out_dir / "quant.json").write_text(json.dumps(results, indent=2))
    rows = results["rows"]
    base = next(r for r in rows if r["method"] == "bf16")
    ev = results["eval"]
    lines = [f"# Quantization: {results['model']} ({results['architecture']})", "",
             f"Command: `{results['command']}`" + "".join(f", then `{c}`" for c in results.get("reruns", [])), "",
             f"Perplexity on {ev.get('text_label', 'WikiText-2 raw test')} (GPTQ convention, {ev['windows']} windows of {ev['seqlen']} tokens). "
             f"Calibration: {results['calibration']['samples']} x {results['calibration']['seqlen']} tokens of the "
             f"shipped WikiText-2 valid split, seed {results['calibration']['seed']} (same token ids for GPTQModel). "
             f"Group size {results['group_size']}, symmetric. Machine: {results['machine']['cpus']} CPUs, "
             f"torch {results['machine']['torch']} with {results['machine']['torch_threads']} threads.", "",
             "Super Experts (detector, same calibration): " + ", ".join(
                 f"({s['layer']},{s['expert']}) ch {s['channel']} at {s['token']!r} pos {s['position']}"
                 for s in results["se_report"]["super_experts"]) + ".", "",
             "| bits | method | SE policy | ppl | vs bf16 | bits/weight | size MiB | time s | format | transformers | super weight err |",
             "|---|---|---|---|---|---|---|---|---|---|---|",
             f"| 16 | bf16 | - | {base['ppl']:.3f} | - | 16 | {_mib(base['size_bytes'])} | - | safetensors | yes | - |"]
    for r in rows:
        if r["method"] == "bf16":
            continue
        if not r.get("ok"):
            lines.append(f"| {r['bits']} | {r['method']} | - | failed | | | | | | | |")
            continue
        sw = r.get("super_weight_max_rel_error")
        lines.append(
            f"| {r['bits']} | {r['method']} | {r['policy']} | {r['ppl']:.3f} | {r['ppl'] / base['ppl']:.3f}x | "
            f"{_bits(r)} | {_mib(r.get('size_bytes'))} | {r.get('seconds', '-')} | {r.get('format', 'gptq (GPTQModel)')} | "
            f"{_yes(r.get('transformers'))} | {'-' if sw is None else f'{sw:.2%}'} |")
    failures = [r for r in rows if not r.get("ok")]
    lines += ["", "Notes:",
              "- `calib` changes GPTQ's Hessians only; with RTN it is the same checkpoint as `none`.",
              "- `layer`: experts of the layers holding SEs at 8 bits: loads in vLLM (one scheme per MoE layer), not in "
              "transformers 5.23; `keep`: SE experts in bf16, written as fake-quant (not deployable quantized). "
              "Sizes of `keep` rows are those of the dequantized bf16 checkpoint.",
              "- bits/weight: over the quantizable matrices (attention, experts), counting what a policy keeps in "
              "16 bit; scales not included (size MiB includes them, and embeddings and lm_head).",
              "- super weight err: largest relative error of the SE super weights (top |w| of the SE's channel row in "
              "down_proj) after quantization; `noclip` keeps them on the grid, `keep` leaves them untouched.",
              "- time: our quantize_model wall time (load, calibration, GPTQ, writing); GPTQModel: load + quantize "
              "(GPTQMODEL_CPU_WORKERS=2, same torch threads). Both ran on the same shared machine in the same run."]
    for r in failures:
        lines.append(f"- GPTQModel w{r['bits']} failed at {r.get('stage', '?')}: `{(r.get('error') or '')[:400]}`")
    (out_dir / "quant.md").write_text("\n".join(lines) + "\n")
    plot(results, out_dir / "quant.png")


def _bits(r):
    b = r.get("effective_bits") or r.get("average_bits")
    return f"{b:.2f}" if b else str(r["bits"])


def _yes(v):
    return "yes" if v is True else ("no" if v is False else "dense only")


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r.get("ok")]
    base = next(r for r in rows if r["method"] == "bf16")["ppl"]
    methods = [m for m in ("rtn", "gptq") if any(r["method"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(methods), figsize=(6 * len(methods), 4.5), sharey=True, squeeze=False)
    for ax, method in zip(axes[0], methods):
        for policy in POLICIES:
            pts = sorted((r["bits"], r["ppl"]) for r in rows if r["method"] == method and r["policy"] == policy)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)
        if method == "gptq":
            pts = sorted((r["bits"], r["ppl"]) for r in rows if r["method"] == "gptqmodel")
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="s", color="black", linestyle="--",
                        label="GPTQModel 7.6.0")
        ax.axhline(base, color="gray", linestyle=":", label=f"bf16 {base:.2f}")
        ax.set_yscale("log")
        ax.set_xlabel("weight bits (g%d)" % results["group_size"])
        ax.set_title(f"{method.upper()}: {results['eval'].get('text', 'wikitext2')} perplexity by SE policy")
        ax.invert_xaxis()
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("perplexity (log)")
    fig.suptitle(f"{results['model']}: {results['command']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
