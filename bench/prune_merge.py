"""Perplexity (--text, default the held-out books) after removing 25% and 50% of the routed experts: pruning with each criterion x SE
policy, and merging to the same counts (SE policy x router-row choice).

One detection pass gives the SE set and the per-expert statistics (real routing) that every pruning run reuses;
each merge runs its own pass (it needs the experts' outputs). Every compressed checkpoint is written to a
temporary folder, evaluated streamed on the WikiText-2 test windows (GPTQ convention, see eval/perplexity.py)
and deleted.

    python bench/prune_merge.py                      # the default model -> bench/results/prune_merge.{md,json,png}
    python bench/prune_merge.py --model PATH --max-windows 64 --out /tmp/r   # a quick run on another model
"""
import argparse
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Merge variants: the default (similarity of the experts' outputs on the same tokens, balanced clusters,
# frequency-weighted router rows) and one change at a time, to measure each choice.
MERGE_OPTIONS = {
    "default": {},
    "router rows: dominant": {"router_rows": "dominant"},
    "clusters unbalanced": {"max_cluster_size": 0},
    "similarity: mean output (HC-SMoE)": {"similarity": "mean"},
}
MERGE_VARIANTS = [("singleton", "default"), ("none", "default"), ("singleton", "router rows: dominant"),
                  ("singleton", "clusters unbalanced"), ("singleton", "similarity: mean output (HC-SMoE)")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--text", default="books", help="perplexity text: books (the default model's held-out books, in "
                                                    "domain), wikitext2 or a text file")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--calib", default="wikitext2")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--eval-seqlen", type=int, default=None, help="default: the model's context, at most 2048")
    p.add_argument("--max-windows", type=int, default=64,
                   help="evaluate the first N test windows (default 64: 27 evaluations fit in ~30 min on 2 CPU cores; 0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-merge", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from se_compress.detect import detect, load_tokenizer
    from se_compress.eval.perplexity import default_seqlen, eval_text, perplexity_streamed, text_windows
    from se_compress.merge import merge_model
    from se_compress.models.adapters import adapter_for
    from se_compress.models.checkpoint import Checkpoint, resolve_model
    from se_compress.models.streaming import StreamedModel
    from se_compress.prune import CRITERIA, prune_model

    start = time.time()
    path = resolve_model(args.model)
    ckpt = Checkpoint(path)
    config = ckpt.config
    num_experts = adapter_for(config).num_experts(config)
    tokenizer = load_tokenizer(path)
    calib = dict(calib=args.calib, samples=args.samples, seqlen=args.seqlen, seed=args.seed)
    report = detect(args.model, progress=False, **calib)
    ses = [(s["layer"], s["expert"]) for s in report["super_experts"]]
    print(f"Super Experts: {ses}", flush=True)
    eval_seqlen = args.eval_seqlen or default_seqlen(config)
    text = eval_text(args.text)
    windows = text_windows(tokenizer, text, eval_seqlen, args.max_windows or None)

    def ppl(folder):
        # batched_mm runs the same expert maths as the eager loop (same ppl to 1e-7 here), about 1.6x faster on CPU
        sm = StreamedModel(Checkpoint(folder), experts_implementation="batched_mm")
        return perplexity_streamed(sm.ckpt, windows, progress=False, model=sm)["ppl"]

    def size_mib(folder):
        return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")) / 2**20

    base = {"method": "base", "experts": num_experts, "ppl": ppl(path), "size_mib": size_mib(path)}
    print(f"base: ppl {base['ppl']:.3f}", flush=True)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="prune_merge-", dir=ROOT / "build" if (ROOT / "build").exists() else None))
    try:
        for fraction in args.fractions:
            for criterion in CRITERIA:
                plans = {}
                for policy in ("protect", "none"):
                    out = prune_model(args.model, work / f"p-{criterion}-{policy}", fraction=fraction, criterion=criterion,
                                      se_policy=policy, se_report=report, progress=False, **calib)
                    result = json.loads((out / "compression_report.json").read_text())
                    plan = [l["kept"] for l in result["layers"]]
                    same = next((p for p, other in plans.items() if other["plan"] == plan), None)
                    plans[policy] = {"plan": plan}
                    value = next(r["ppl"] for r in rows if r.get("_key") == (fraction, criterion, same)) if same else ppl(out)
                    rows.append({"method": "prune", "fraction": fraction, "experts": result["experts_after"],
                                 "criterion": criterion, "se_policy": policy, "ppl": value, "size_mib": size_mib(out),
                                 "se_lost": [(r["layer"], r["expert"]) for r in result["super_experts_removed"]],
                                 "same_experts_as": same, "_key": (fraction, criterion, policy)})
                    print(f"prune {fraction:g} {criterion:9s} {policy:8s}: ppl {value:.3f} SEs removed "
                          f"{rows[-1]['se_lost']}{' (same experts as ' + same + ')' if same else ''}", flush=True)
                    shutil.rmtree(out)
            if args.no_merge:
                continue
            for policy, variant in MERGE_VARIANTS:
                options = MERGE_OPTIONS[variant]
                out = merge_model(args.model, work / f"m-{policy}-{variant}", fraction=fraction, se_policy=policy,
                                  se_report=report, progress=False, **options, **calib)
                result = json.loads((out / "compression_report.json").read_text())
                value = ppl(out)
                rows.append({"method": "merge", "fraction": fraction, "experts": result["experts_after"],
                             "criterion": variant, "se_policy": policy, "options": options,
                             "ppl": value, "size_mib": size_mib(out),
                             "se_lost": [(m["layer"], m["expert"]) for m in result["super_experts_merged"]],
                             "largest_cluster": max(len(c["members"]) for l in result["layers"] for c in l["clusters"]),
                             "same_experts_as": None})
                print(f"merge {fraction:g} {policy:9s} {variant}: ppl {value:.3f} SEs merged {rows[-1]['se_lost']}, "
                      f"largest cluster {rows[-1]['largest_cluster']}", flush=True)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for r in rows:
        r.pop("_key", None)

    command = "python bench/prune_merge.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    result = {"model": args.model, "architecture": config.model_type, "num_experts": num_experts,
              "num_experts_per_tok": config.num_experts_per_tok, "super_experts": ses,
              "calibration": report["calibration"], "eval": {"text": text.key, "text_label": text.label, "windows": int(windows.shape[0]),
                                                              "seqlen": eval_seqlen},
              "base": base, "rows": rows, "command": command.strip(), "seconds": round(time.time() - start)}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "prune_merge.json").write_text(json.dumps(result, indent=2))
    (out_dir / "prune_merge.md").write_text(markdown(result))
    plot(result, out_dir / "prune_merge.png")
    print(markdown(result))


def markdown(result: dict) -> str:
    base = result["base"]
    lines = [
        f"# Pruning and merging experts of `{result['model']}` ({result['architecture']}, {result['num_experts']} "
        f"experts per MoE layer, top-{result['num_experts_per_tok']})", "",
        f"Perplexity on {result['eval'].get('text_label', 'WikiText-2 test')}, {result['eval']['windows']} windows of {result['eval']['seqlen']} tokens (GPTQ "
        f"convention). Statistics and SEs from one detection pass on {result['calibration']['samples']} x "
        f"{result['calibration']['seqlen']} tokens of {result['calibration']['source']}. Super Experts: "
        f"{', '.join(f'({l},{e})' for l, e in result['super_experts']) or 'none'}.", "",
        f"Made by: `{result['command']}` ({result['seconds']} s).", "",
        f"Base model: ppl **{base['ppl']:.3f}**, {base['size_mib']:.1f} MiB.", "",
        "| removed | experts kept | method | criterion | SE policy | ppl | size MiB | SEs lost |",
        "|---:|---:|---|---|---|---:|---:|---|",
    ]
    for r in result["rows"]:
        lost = ", ".join(f"({l},{e})" for l, e in r["se_lost"]) or "-"
        same = f" (= {r['same_experts_as']})" if r.get("same_experts_as") else ""
        lines.append(f"| {r['fraction']:.0%} | {r['experts']} | {r['method']} | {r['criterion']} | {r['se_policy']} | "
                     f"{r['ppl']:.3f}{same} | {r['size_mib']:.1f} | {lost} |")
    lines += ["", "SEs lost: Super Experts removed (pruning) or averaged with other experts (merging). "
              "`(= protect)`: the naive policy chose the same experts, so the number is the same run.",
              "Merge `default`: clusters by cosine of the experts' outputs on the same calibration tokens, average "
              "linkage with clusters kept to a balanced size (ceil(experts / clusters)), weights and router rows "
              "averaged by routing frequency; each other merge row changes one of these choices.", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = sorted({r["fraction"] for r in result["rows"]})
    labels = []
    for r in result["rows"]:
        label = (f"prune {r['criterion']} / {r['se_policy']}" if r["method"] == "prune"
                 else f"merge {r['criterion']} / {r['se_policy']}")
        if label not in labels:
            labels.append(label)
    fig, ax = plt.subplots(figsize=(11, 4.8))
    width = 0.8 / len(fractions)
    for k, fraction in enumerate(fractions):
        values, lost = [], []
        for label in labels:
            match = [r for r in result["rows"] if r["fraction"] == fraction and
                     (f"prune {r['criterion']} / {r['se_policy']}" if r["method"] == "prune"
                      else f"merge {r['criterion']} / {r['se_policy']}") == label]
            values.append(match[0]["ppl"] if match else float("nan"))
            lost.append(bool(match and match[0]["se_lost"]))
        xs = [i + k * width for i in range(len(labels))]
        bars = ax.bar(xs, values, width, label=f"{fraction:.0%} of experts removed")
        for bar, se_lost in zip(bars, lost):
            if se_lost:  # a Super Expert was removed or merged away
                bar.set_hatch("//")
                bar.set_edgecolor("red")
    ax.axhline(result["base"]["ppl"], color="k", ls="--", lw=1, label=f"base {result['base']['ppl']:.2f}")
    ax.set_yscale("log")
    ax.set_xticks([i + width * (len(fractions) - 1) / 2 for i in range(len(labels))])
    ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(f"{result['eval'].get('text', 'wikitext2')} perplexity (log)")
    ax.set_title(f"Expert pruning / merging of {result['model']}: SE-aware vs naive (hatched red: a Super Expert lost)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
