"""se_report.json / se_report.md and the plots a person looks at."""
import json
from pathlib import Path

import numpy as np


def write_json(report: dict, path: Path) -> None:
    path.write_text(json.dumps(report, indent=2))


def _label(expert) -> str:
    return "shared" if expert == "shared" else str(expert)


def expert_name(layer, expert) -> str:
    """'L3 E17' (or 'L3 shared'): never a decimal-looking '3.17'."""
    return f"L{layer} " + ("shared" if expert == "shared" else f"E{expert}")


def write_markdown(report: dict, path: Path) -> None:
    path.write_text(markdown(report))


def markdown(report: dict) -> str:
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
    return "\n".join(lines) + "\n"


def write_plots(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches
    import matplotlib.pyplot as plt

    num_layers, num_experts = report["num_layers"], report["num_experts"]
    width = num_experts + (1 if report["has_shared_expert"] else 0)
    grid = np.full((num_layers, width), np.nan)
    for e in report["experts"]:
        col = num_experts if e["expert"] == "shared" else e["expert"]
        if e["count"] > 0:  # experts no token reached stay NaN: drawn grey, kept out of the colour scale
            grid[e["layer"], col] = max(e["max_output"], 1e-6)
    th, crit = report["thresholds"], report["criterion"]
    thresholds = [(th.get("quantile_value"), f"P{crit['quantile'] * 100:g}", "white"),
                  (th.get("fraction_value"), f"max/{1 / crit['max_fraction']:g}", "red")]
    fig, ax = plt.subplots(figsize=(min(18, 5 + width * 0.12), min(12, 2.6 + num_layers * 0.3)))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgray")
    im = ax.imshow(np.log10(grid), aspect="auto", cmap=cmap, interpolation="nearest")
    cbar = fig.colorbar(im, ax=ax, label="log10 max |down_proj output|")
    for value, name, color in thresholds:  # the rule's two thresholds, read against the colour scale
        if value:
            cbar.ax.axhline(np.log10(value), color=color, linewidth=2)
            cbar.ax.text(-0.2, np.log10(value), name, transform=cbar.ax.get_yaxis_transform(), fontsize=7,
                         va="center", ha="right", color="black", clip_on=False)
    above = [e for e in report["experts"] if th.get("fraction_value") and e["max_output"] > th["fraction_value"]
             and (th.get("quantile_value") is None or e["max_output"] > th["quantile_value"])]
    for e in above:  # above both thresholds: a box; Super Experts (also in a considered layer): a red circle
        col = num_experts if e["expert"] == "shared" else e["expert"]
        ax.add_patch(matplotlib.patches.Rectangle((col - 0.5, e["layer"] - 0.5), 1, 1, fill=False, edgecolor="white",
                                                  linewidth=1))
    for s in report["super_experts"]:
        col = num_experts if s["expert"] == "shared" else s["expert"]
        ax.scatter([col], [s["layer"]], s=120, facecolors="none", edgecolors="red", linewidths=2)
    considered = set(report["considered_layers"])
    for layer in range(num_layers):
        if layer not in considered:  # the rule does not look at these layers: hatched
            ax.add_patch(matplotlib.patches.Rectangle((-0.5, layer - 0.5), width, 1, fill=False, hatch="//",
                                                      edgecolor="white", linewidth=0, alpha=0.5))
    ax.set_xlabel("expert" + (" (last column: shared)" if report["has_shared_expert"] else "") + "; grey: no token routed")
    ax.set_ylabel("layer (hatched: not considered by the rule)")
    note = "; ".join(f"{name} = {value:.4g}" for value, name, _ in thresholds if value)
    ax.set_title(f"Max |down_proj output| per expert, {report['model']}\n(red circle: Super Expert; white box: above "
                 f"both thresholds: {note})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "se_heatmap.png", dpi=110)
    plt.close(fig)

    top = report["top_experts"]
    fig, ax = plt.subplots(figsize=(9, 4))
    se_keys = {(s["layer"], s["expert"]) for s in report["super_experts"]}
    colors = ["tab:red" if (e["layer"], e["expert"]) in se_keys else "tab:blue" for e in top]
    ax.bar(range(len(top)), [e["max_output"] for e in top], color=colors)
    ax.set_xticks(range(len(top)), [expert_name(e["layer"], e["expert"]) for e in top], rotation=60, fontsize=8)
    ax.set_yscale("log")
    for (value, name, _), color in zip(thresholds, ["tab:green", "tab:orange"]):
        if value:
            ax.axhline(value, linestyle="--", linewidth=1.2, color=color, label=f"{name} = {value:.4g}")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_ylabel("max |down_proj output| (log)")
    ax.set_title("Top experts (red: Super Experts: above both thresholds, in a considered layer)")
    fig.tight_layout()
    fig.savefig(out / "se_top_experts.png", dpi=110)
    plt.close(fig)

    hs = report["hidden_states"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    layers = [h["layer"] for h in hs]
    # max |h| and the first-token max are often the same numbers (the massive activation sits on token 0): drawn
    # as a wide pale line with open markers under a thin line with small filled ones, both stay visible.
    ax.plot(layers, [h["max"] for h in hs], "o-", color="tab:blue", linewidth=5, alpha=0.35, markersize=11,
            markerfacecolor="none", label="max |h| (all tokens)")
    ax.plot(layers, [h["first_token_max"] for h in hs], "s--", color="tab:red", linewidth=1.2, markersize=4,
            label="max |h| at the first token")
    ax.plot(layers, [h["other_token_max"] for h in hs], "v:", color="tab:purple", linewidth=1, markersize=5,
            label="max |h| at other tokens")
    ax.plot(layers, [h["median"] for h in hs], "^-", color="tab:green", label="median |h|")
    ratio = crit["massive_ratio"]
    ax.plot(layers, [ratio * h["median"] for h in hs], color="tab:orange", linestyle="-.", linewidth=1,
            label=f"{ratio:g} x median |h| (massive above)")
    for l in report["massive_activation_layers"]:
        ax.axvspan(l - 0.4, l + 0.4, color="orange", alpha=0.15)
    ax.set_yscale("log")
    ax.set_xlabel("layer (output of)")
    ax.set_title("Residual stream: massive activations (shaded: layers considered massive)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "massive_activations.png", dpi=110)
    plt.close(fig)
    return ["se_heatmap.png", "se_top_experts.png", "massive_activations.png"]
