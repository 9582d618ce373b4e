"""The SE paper's ablation on any model: perplexity with the Super Experts' down_proj zeroed, against as many
random non-SE experts zeroed (seeded draws over all MoE layers, and draws matched layer by layer), plus the
attention mass on the first token before and after.
"""
import json
import random
from collections import defaultdict
from pathlib import Path

from ..detect import detect
from ..errors import SECompressError
from ..models.handle import open_model
from ..models.edit import zero_experts
from ..prune.common import check_se_report
from .intervals import MARK_NOTE, format_ratio, paired_bootstrap_ratio
from .perplexity import default_seqlen, eval_text, perplexity_streamed, text_windows
from .sink import d_sink, first_token_attention


def _hook(adapter, experts):
    by_layer = defaultdict(list)
    for layer, expert in experts:
        by_layer[layer].append(expert)
    return lambda i, layer: zero_experts(adapter, layer, by_layer[i]) if i in by_layer else None


def draw_random(candidates, count, rng):
    return sorted(rng.sample(candidates, count), key=lambda k: (k[0], str(k[1])))


def draw_layer_matched(ses, candidates, rng):
    chosen = []
    for layer, _ in ses:
        pool = [c for c in candidates if c[0] == layer and c not in chosen]
        chosen.append(rng.choice(pool))
    return chosen


def ablate(model: str, se_report: dict | None = None, draws: int = 5, seed: int = 0, seqlen: int | None = None,
           max_windows: int | None = None, sink_windows: int = 16, progress: bool = True, text: str = "wikitext2",
           **detect_kwargs) -> dict:
    """`text`: what perplexity is measured on (wikitext2, books or a text file; see eval/perplexity.py)."""
    eval_on = eval_text(text)  # a bad --text fails before the detection pass
    handle = open_model(model)  # the caller's handle, or opened here once
    model, ckpt, adapter = handle.name, handle.checkpoint, handle.adapter
    if se_report is not None:  # given: it must describe this model
        check_se_report(se_report, ckpt.config, adapter)
    report = se_report if se_report is not None else detect(handle, progress=progress, **detect_kwargs)
    ses = [(s["layer"], s["expert"]) for s in report["super_experts"]]
    if not ses:
        found = "the SE report lists" if se_report is not None else "the detector found"
        raise SECompressError(f"{found} no Super Experts in {model}: nothing to ablate (see its se_report.md)")
    # every routed expert of the MoE layers but the SEs, layer by layer (the order of detect's "experts" list, which a
    # slimmed report such as the shipped model's leaves out)
    config = ckpt.config
    moe_layers = [i for i in range(config.num_hidden_layers) if adapter.is_moe_layer(config, i)]
    se_set = set(ses)
    candidates = [(layer, e) for layer in moe_layers for e in range(adapter.num_experts(config))
                  if (layer, e) not in se_set]
    rng = random.Random(seed)
    random_sets = [draw_random(candidates, len(ses), rng) for _ in range(draws)]
    matched_sets = [draw_layer_matched(ses, candidates, rng) for _ in range(draws)]

    tokenizer = handle.tokenizer
    seqlen = seqlen or default_seqlen(ckpt.config)
    windows = text_windows(tokenizer, eval_on, seqlen, max_windows)

    def ppl(experts):
        hook = _hook(adapter, experts) if experts else None
        return perplexity_streamed(ckpt, windows, layer_hook=hook, progress=False)

    conditions = [("base", [])] + [("se", ses)] + [(f"random {i}", s) for i, s in enumerate(random_sets)] + \
                 [(f"layer-matched {i}", s) for i, s in enumerate(matched_sets)]
    results = {}
    from tqdm.auto import tqdm

    for name, experts in tqdm(conditions, desc="ablation", disable=not progress):
        results[name] = ppl(experts)

    sink_in = windows[:sink_windows]
    attention = {
        "base": first_token_attention(ckpt, sink_in),
        "se_zeroed": first_token_attention(ckpt, sink_in, _hook(adapter, ses)),
        "random_zeroed": first_token_attention(ckpt, sink_in, _hook(adapter, random_sets[0])),
    }
    mean = lambda per_layer: [sum(h) / len(h) for h in per_layer]
    base = results["base"]
    vs_base = lambda name: paired_bootstrap_ratio(base["window_nll"], results[name]["window_nll"],
                                                  base["tokens"] // base["windows"])
    return {
        "model": model,
        "super_experts": [list(k) for k in ses],
        "base_ppl": base["ppl"],
        "se_ppl": results["se"]["ppl"],
        "random_ppl": [results[f"random {i}"]["ppl"] for i in range(draws)],
        "random_experts": [[list(k) for k in s] for s in random_sets],
        "layer_matched_ppl": [results[f"layer-matched {i}"]["ppl"] for i in range(draws)],
        "intervals_vs_base": {name: vs_base(name) for name, _ in conditions if name != "base"},
        "window_nll": {name: r["window_nll"] for name, r in results.items()},
        "layer_matched_experts": [[list(k) for k in s] for s in matched_sets],
        "sink_attention": {
            "definition": "per layer: mean over heads and query positions t>=1 of attention on position 0",
            "base": mean(attention["base"]),
            "se_zeroed": mean(attention["se_zeroed"]),
            "random_zeroed": mean(attention["random_zeroed"]),
            "d_sink_se": d_sink(attention["base"], attention["se_zeroed"]),
            "d_sink_random": d_sink(attention["base"], attention["random_zeroed"]),
            "windows": int(sink_in.shape[0]),
        },
        "eval": {"text": eval_on.key, "text_label": eval_on.label, "windows": int(windows.shape[0]), "seqlen": seqlen,
                 "bos_per_window": bool(windows[0, 0] == tokenizer.bos_token_id and tokenizer.bos_token_id is not None)},
        "draws": draws,
        "seed": seed,
    }


def ablation_markdown(result: dict) -> str:
    base = result["base_ppl"]
    intervals = result.get("intervals_vs_base") or {}  # ablation.json written before intervals has none
    vs = lambda name, p: format_ratio(intervals.get(name), p / base)
    mean = lambda xs: sum(xs) / len(xs)
    ev = result["eval"]
    lines = [
        f"# SE ablation: {result['model']}",
        "",
        f"{ev.get('text_label', 'WikiText-2 raw test')}, {ev['windows']} windows of {ev['seqlen']} tokens"
        f"{' (BOS + text)' if ev['bos_per_window'] else ''}; experts zeroed = their down_proj set to 0.",
        "",
        "| condition | experts zeroed | perplexity | x base |",
        "|---|---|---:|---:|",
        f"| base | none | {base:.2f} | 1.00 |",
        f"| Super Experts | {result['super_experts']} | {result['se_ppl']:.2f} | {vs('se', result['se_ppl'])} |",
    ]
    for i, (p, s) in enumerate(zip(result["random_ppl"], result["random_experts"])):
        lines.append(f"| random draw {i} | {s} | {p:.2f} | {vs(f'random {i}', p)} |")
    lines.append(f"| random, mean of {len(result['random_ppl'])} | | {mean(result['random_ppl']):.2f} | "
                 f"{mean(result['random_ppl']) / base:.3f} |")
    for i, (p, s) in enumerate(zip(result["layer_matched_ppl"], result["layer_matched_experts"])):
        lines.append(f"| layer-matched draw {i} | {s} | {p:.2f} | {vs(f'layer-matched {i}', p)} |")
    if intervals:
        lines += ["", MARK_NOTE + " (the same windows for every condition)."]
    sink = result["sink_attention"]
    lines += ["", f"Attention on the first token ({sink['definition']}; {sink['windows']} windows):", "",
              "| layer | base | SEs zeroed | random zeroed | D_sink (SEs) | D_sink (random) |", "|---:|---:|---:|---:|---:|---:|"]
    for l, (b, s, r, ds, dr) in enumerate(zip(sink["base"], sink["se_zeroed"], sink["random_zeroed"], sink["d_sink_se"],
                                              sink["d_sink_random"])):
        lines.append(f"| {l} | {b:.3f} | {s:.3f} | {r:.3f} | {ds:.2f} | {dr:.2f} |")
    return "\n".join(lines) + "\n"


def write_ablation(result: dict, out: Path) -> Path:
    """ablation.json, ablation.md and ablation.png into `out`, never half-written (se_compress/output.py)."""
    from ..output import write_files_into

    return write_files_into(out, {"ablation.json": json.dumps(result, indent=2), "ablation.md": ablation_markdown(result)},
                            writers=[lambda folder: plot_ablation(result, folder / "ablation.png")])


def plot_ablation(result: dict, path: Path) -> None:
    """Perplexity per condition (linear axis, each bar labelled with its ratio to the base, the base drawn as a
    line) and attention on the first token per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = ["base", "SEs"] + [f"rand{i}" for i in range(len(result["random_ppl"]))] + \
            [f"match{i}" for i in range(len(result["layer_matched_ppl"]))]
    values = [result["base_ppl"], result["se_ppl"]] + result["random_ppl"] + result["layer_matched_ppl"]
    colors = ["gray", "tab:red"] + ["tab:blue"] * len(result["random_ppl"]) + ["tab:cyan"] * len(result["layer_matched_ppl"])
    bars = ax1.bar(names, values, color=colors)
    base = result["base_ppl"]
    for bar, value in zip(bars, values):
        ax1.annotate(f"x{value / base:.3f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom",
                     fontsize=7, rotation=90, xytext=(0, 2), textcoords="offset points")
    ax1.axhline(base, color="gray", linestyle="--", linewidth=1, label=f"base {base:.2f}")
    ax1.set_ylim(0, max(values) * 1.15)
    ax1.set_ylabel(f"perplexity ({result['eval'].get('text', 'wikitext2')}; labels: x base)")
    ax1.set_title("Zeroing Super Experts vs as many random experts")
    ax1.tick_params(axis="x", rotation=60)
    ax1.legend(fontsize=8, loc="lower right")
    sink = result["sink_attention"]
    for key, style, size in [("base", "o-", 8), ("se_zeroed", "s--", 6), ("random_zeroed", "^:", 4)]:
        ax2.plot(range(len(sink[key])), sink[key], style, markersize=size, label=key, alpha=0.85)
    ax2.set_xlabel("layer")
    ax2.set_ylabel("attention on the first token")
    ax2.set_title("Attention sink")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
