"""se_report.json / se_report.md and the plots a person looks at."""
import json
from pathlib import Path

import numpy as np


def write_json(report: dict, path: Path) -> None:
    path.write_text(json.dumps(report, indent=2))


def _label(expert) -> str:
    return "shared" if expert == "shared" else str(expert)


def write_markdown(report: dict, path: Path) -> None:
    c, th = report["criterion"], report["thresholds"]
    cal = report["calibration"]
    lines = [
        f"# Super Expert report: {report['model']}",
        "",
        f"- Architecture: `{report['architecture']}`, {report['num_layers']} layers, {report['num_experts']} routed "
        f"experts per MoE layer{', plus a shared expert' if report['has_shared_expert'] else ''}; router: {report['router']}.",
        f"- Calibration: {cal['samples']} samples x {cal['seqlen']} tokens from {cal['source']} (seed {cal['seed']}; "
        f"{'each starts with BOS' if cal['starts_with_bos'] else 'each starts at a line start, no BOS'}).",
        f"- Rule: a(l,e) > P{c['quantile'] * 100:g} = {th['quantile_value']:.4g} and > max/{1 / c['max_fraction']:g} = "
        f"{th['fraction_value']:.4g} (max {th['max_value']:.4g}) over {th['n']} experts in the considered layers.",
        f"- Considered layers ({c['layers']}): {report['considered_layers']} -- {c['layers_rule']}.",
        f"- Massive activations (max|h| >= {c['massive_ratio']:g} x median): layers {report['massive_activation_layers']}.",
        "",
        f"## Super Experts: {len(report['super_experts'])}",
        "",
        "| layer | expert | max abs output | x median expert | channel | sample | position | token |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in report["super_experts"]:
        lines.append(f"| {s['layer']} | {_label(s['expert'])} | {s['max_output']:.4g} | {s['times_median']:.1f} | "
                     f"{s['channel']} | {s['sample']} | {s['position']} | `{s['token']!r}` |")
    if not report["super_experts"]:
        lines.append("| - | - | - | - | - | - | - | none found |")
    for note in report["notes"]:
        lines += ["", f"> {note}"]
    lines += ["", "## Top experts by max |down_proj output|", "",
              "| rank | layer | expert | max abs output | tokens routed | REAP | channel | token |", "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for rank, e in enumerate(report["top_experts"], 1):
        lines.append(f"| {rank} | {e['layer']} | {_label(e['expert'])} | {e['max_output']:.4g} | {e['count']} | "
                     f"{e['reap']:.4g} | {e['channel']} | `{e['token']!r}` |")
    lines += ["", "## Residual stream per layer", "",
              "| layer | max abs h | median abs h | ratio | first-token max | other-token max | top channel | at token |",
              "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for h in report["hidden_states"]:
        top = h["top_channels"][0]
        lines.append(f"| {h['layer']} | {h['max']:.4g} | {h['median']:.3g} | {h['ratio']:.0f} | {h['first_token_max']:.4g} | "
                     f"{h['other_token_max']:.4g} | {top['channel']} | `{top['token']!r}` (pos {top['position']}) |")
    lines += ["", "Plots: `se_heatmap.png` (a(l,e), log scale, SEs circled), `se_top_experts.png`, `massive_activations.png`."]
    path.write_text("\n".join(lines) + "\n")


def write_plots(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_layers, num_experts = report["num_layers"], report["num_experts"]
    width = num_experts + (1 if report["has_shared_expert"] else 0)
    grid = np.full((num_layers, width), np.nan)
    for e in report["experts"]:
        col = num_experts if e["expert"] == "shared" else e["expert"]
        if e["count"] > 0:  # experts no token reached stay NaN: drawn grey, kept out of the colour scale
            grid[e["layer"], col] = max(e["max_output"], 1e-6)
    fig, ax = plt.subplots(figsize=(min(18, 4 + width * 0.12), min(12, 2 + num_layers * 0.3)))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgray")
    im = ax.imshow(np.log10(grid), aspect="auto", cmap=cmap, interpolation="nearest")
    fig.colorbar(im, ax=ax, label="log10 max |down_proj output|")
    for s in report["super_experts"]:
        col = num_experts if s["expert"] == "shared" else s["expert"]
        ax.scatter([col], [s["layer"]], s=120, facecolors="none", edgecolors="red", linewidths=2)
    ax.set_xlabel("expert" + (" (last column: shared)" if report["has_shared_expert"] else "") + "; grey: no token routed")
    ax.set_ylabel("layer")
    ax.set_title(f"Max |down_proj output| per expert, {report['model']} (red: Super Experts)")
    fig.tight_layout()
    fig.savefig(out / "se_heatmap.png", dpi=110)
    plt.close(fig)

    top = report["top_experts"]
    fig, ax = plt.subplots(figsize=(9, 4))
    se_keys = {(s["layer"], s["expert"]) for s in report["super_experts"]}
    colors = ["tab:red" if (e["layer"], e["expert"]) in se_keys else "tab:blue" for e in top]
    ax.bar(range(len(top)), [e["max_output"] for e in top], color=colors)
    ax.set_xticks(range(len(top)), [f"{e['layer']}.{_label(e['expert'])}" for e in top], rotation=60, fontsize=8)
    ax.set_yscale("log")
    th = report["thresholds"]
    for value, name in [(th["quantile_value"], f"P{report['criterion']['quantile'] * 100:g}"), (th["fraction_value"], "max/10")]:
        if value:
            ax.axhline(value, linestyle="--", linewidth=1, color="gray")
            ax.text(len(top) - 0.5, value, name, ha="right", va="bottom", fontsize=8)
    ax.set_ylabel("max |down_proj output|")
    ax.set_title("Top experts (layer.expert; red: Super Experts)")
    fig.tight_layout()
    fig.savefig(out / "se_top_experts.png", dpi=110)
    plt.close(fig)

    hs = report["hidden_states"]
    fig, ax = plt.subplots(figsize=(8, 4))
    layers = [h["layer"] for h in hs]
    ax.plot(layers, [h["max"] for h in hs], "o-", label="max |h|")
    ax.plot(layers, [h["first_token_max"] for h in hs], "s--", label="max |h| at the first token")
    ax.plot(layers, [h["median"] for h in hs], "^-", label="median |h|")
    for l in report["massive_activation_layers"]:
        ax.axvspan(l - 0.4, l + 0.4, color="orange", alpha=0.15)
    ax.set_yscale("log")
    ax.set_xlabel("layer (output of)")
    ax.set_title("Residual stream: massive activations (shaded: layers considered massive)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "massive_activations.png", dpi=110)
    plt.close(fig)
    return ["se_heatmap.png", "se_top_experts.png", "massive_activations.png"]
