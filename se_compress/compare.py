"""The comparison table: compressed checkpoints evaluated beside their base model and naive twins.

The driver (driver.py) makes the checkpoints (a recipe's result, its naive twins, any set of recipes for
`se-compress compare`) and asks this module for the evaluations and the table; this module never makes a checkpoint.

Every evaluation is cached next to what it measured (`<checkpoint>/eval/`, the base model's under
checkpoints/.eval/) with a fingerprint of the weights and the evaluation settings, so a re-run or a second table
reuses it, and a changed model or setting is measured again.
"""
import hashlib
import json
from pathlib import Path

from .errors import SECompressError
from .ownership import mark
from .models.handle import fingerprint, open_model  # noqa: F401 (fingerprint: moved to models/handle.py, still here)
from .recipe import EvaluateOptions, Recipe, load_recipe

CHECKPOINTS = Path("checkpoints")


def model_label(model: str) -> str:
    return "default" if model == "default" else Path(str(model).rstrip("/")).name.replace("/", "--")


def default_output(model: str, recipe: Recipe) -> Path:
    return CHECKPOINTS / f"{model_label(model)}-{recipe.name}"


def size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) / 2**20


def evaluate_cached(model: str, options: EvaluateOptions, out: Path, label: str, progress: bool = True) -> dict:
    """eval.json of `model` under `options`; reused from `out` when weights and settings are the same."""
    from .eval.run import evaluate_checkpoint

    out = Path(out)
    # The device decides the dtype of the evaluation (bf16 on a GPU, fp32 on CPU): part of what was measured.
    from .models.placement import current

    device = current().device.type
    model = open_model(model)  # the caller's handle, or opened here once (and handed on to the evaluation)
    request = {"fingerprint": model.fingerprint, "options": options.model_dump(), "device": device,
               "per_window_nll": True}  # eval.json from before paired intervals is measured again
    stamp = out / "request.json"
    if (out / "eval.json").exists() and stamp.exists() and json.loads(stamp.read_text()) == request:
        if progress:
            print(f"[eval] {label}: reusing {out}/eval.json", flush=True)
        return json.loads((out / "eval.json").read_text())
    stamp.unlink(missing_ok=True)
    result = evaluate_checkpoint(model, options.tasks, options.limit, out, seqlen=options.seqlen,
                                 max_windows=options.max_windows, label=label, progress=progress)
    stamp.write_text(json.dumps(request, indent=2))  # written last: an interrupted evaluation is not reused
    mark(out, [stamp.name])  # ours (ownership.py)
    return result


def base_eval_dir(model) -> Path:
    model = open_model(model)
    return CHECKPOINTS / ".eval" / f"{model_label(model.name)}-{model.fingerprint}"


def describe(recipe: Recipe | None) -> tuple[str, str]:
    """(method, SE policy) of a recipe, for the table: from each stage's describe() (recipe.py)."""
    if recipe is None:
        return "original (bf16)", "-"
    described = [stage.options.describe() for stage in recipe.stages]  # each stage's own words (recipe.py)
    parts, policies = [method for method, _ in described], [policy for _, policy in described if policy is not None]
    return ", ".join(parts), ", ".join(policies) or "-"


def table_row(name: str, recipe: Recipe | None, checkpoint: Path, result: dict, base: dict) -> dict:
    """One row: the recipe, what it did, size, and the eval.json with D_sink taken against the base model."""
    from .eval.run import d_sink_between

    d_sink = d_sink_between(base, result) if recipe is not None else None
    metrics = dict(result.get("metrics") or {}, d_sink=sum(d_sink) / len(d_sink) if d_sink else None)
    meta_path = Path(checkpoint) / "recipe.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    method, policy = describe(recipe)
    peer = json.loads((Path(checkpoint) / "peer.json").read_text()) if (Path(checkpoint) / "peer.json").exists() else {}
    from .eval.intervals import intervals_between

    return {**result, "recipe": name, "method": method, "se_policy": policy, "size_mb": size_mb(checkpoint),
            "compress_seconds": peer.get("seconds", meta.get("seconds")), "peak_rss_mib": peer.get("peak_rss_mib"),
            "metrics": metrics, "path": str(checkpoint),
            "vs_base": intervals_between(base, result) if recipe is not None else {},
            "baselines": [load_recipe(b).name for b in recipe.baselines] if recipe is not None else []}


def refuse_foreign(out: Path, recipe: Recipe, model: str) -> dict | None:
    """recipe.json of the driver's checkpoint at `out` (None when there is none); a folder the driver did not
    write, or one it wrote for another model, is not ours to replace."""
    meta_path = out / "recipe.json"
    if not meta_path.exists():
        if out.exists():
            raise SECompressError(f"{out} (for recipe '{recipe.name}') exists and was not written by se-compress "
                                  "compress: move it away")
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("model") != model:
        raise SECompressError(f"{out} holds '{recipe.name}' of another model ({meta.get('model')}): move it away "
                              f"to compress {model}")
    return meta


def write_table(table: dict, out: Path) -> Path:
    """compare.json/.md/.png into `out`, never half-written (se_compress/output.py)."""
    from .output import write_files_into

    return write_files_into(out, {"compare.json": json.dumps(table, indent=2, default=str), "compare.md": markdown(table)},
                            writers=[lambda folder: plot(table, folder / "compare.png")])


def _metric(row: dict, key: str):
    return (row.get("metrics") or {}).get(key)


PPL_LABELS = {"wikitext2": "WikiText-2 ppl", "books": "books ppl"}


def perplexity_texts(table: dict) -> list[str]:
    """The perplexity texts a table measured, in the recipe's order (wikitext2, books)."""
    return [t for t in table["tasks"] if t in PPL_LABELS]


def markdown(table: dict) -> str:
    from .eval.intervals import MARK_NOTE, format_ratio, pair_lines

    texts = perplexity_texts(table)
    tasks = [t for t in table["tasks"] if t not in PPL_LABELS and t not in ("sink", "repetition")]
    head = ["recipe", "method", "SE policy", "size (MiB)"]
    for text in texts:
        head += [PPL_LABELS[text], "vs base"]
    head += tasks + ["sink", "D_sink", "rep4", "time (s)"]
    lines = [f"# Comparison on {table['model']}", "", "| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3)]
    for r in table["rows"]:
        cells = [r["recipe"], r["method"], r["se_policy"], f"{r['size_mb']:.1f}"]
        for text in texts:
            ppl, base_ppl = _metric(r, f"{text}_ppl"), _metric(table["rows"][0], f"{text}_ppl")
            vs_base = (r.get("vs_base") or {}).get(text) if r["recipe"] != "base" else None
            cells += [_fmt(ppl), format_ratio(vs_base, ppl / base_ppl if ppl and base_ppl else None)]
        cells += [_fmt(_metric(r, t)) for t in tasks]
        cells += [_fmt(_metric(r, "sink_first_token")), _fmt(_metric(r, "d_sink")), _fmt(_metric(r, "repetition")),
                  "-" if r.get("compress_seconds") is None else f"{r['compress_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    ev = table.get("evaluate") or {}
    windows = f", first {ev['max_windows']} windows of each" if ev.get("max_windows") else ""
    lines += ["", "Perplexity in the GPTQ convention (WikiText-2: raw test; books: the default model's two held-out books"
              + windows + "); sink: mean attention on "
              "the first token over layers; D_sink: change of the per-head first-token attention against the base "
              "(mean over layers); rep4: repeated 4-grams in greedy generations; time: compression wall time (the detection "
              "pass is cached per model and shared by its recipes). vs base: " + MARK_NOTE + ".", ""]
    lines += pair_lines(table["rows"], texts)
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 10 else f"{value:.4f}"
    return str(value)


def _pair_name(recipe: str) -> str:
    """qwen3-int4-se-protect and qwen3-int4-naive -> int4: the label a recipe and its twin share."""
    name = recipe.removeprefix("qwen3-")
    for suffix in ("-se-protect", "-se-singleton", "-naive"):
        name = name.removesuffix(suffix)
    return name


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = perplexity_texts(table)
    text = "books" if "books" in texts else "wikitext2"
    fig, ax = plt.subplots(figsize=(8, 5))
    labelled = set()
    for r in table["rows"]:
        ppl = _metric(r, f"{text}_ppl")
        if ppl is None:
            continue
        if r["recipe"] == "base":
            ax.scatter(r["size_mb"], ppl, color="black", marker="s", s=50, label="base", zorder=3)
            continue
        naive = "naive" in r["recipe"]
        kind = "quantize" if "W" in r["method"] else ("merge" if "merge" in r["method"] else "prune")
        marker = {"quantize": "o", "prune": "^", "merge": "D"}[kind]
        ax.scatter(r["size_mb"], ppl, color="tab:orange" if naive else "tab:green", marker=marker, s=45, zorder=3,
                   label=("naive twin" if naive else "SE-aware") if ("naive" if naive else "se") not in labelled else None)
        labelled.add("naive" if naive else "se")
        pair = _pair_name(r["recipe"])
        if pair not in labelled:
            labelled.add(pair)
            ax.annotate(pair, (r["size_mb"], ppl), fontsize=8, xytext=(6, -3), textcoords="offset points")
    base = next((_metric(r, f"{text}_ppl") for r in table["rows"] if r["recipe"] == "base"), None)
    if base:
        ax.axhline(base, color="black", linestyle=":", linewidth=1)
        # The results often differ by fractions of a percent: a linear axis fitted to them shows it (a log axis
        # over a 0.2% range is a flat line), and the right axis reads the same points as a change against the base.
        right = ax.secondary_yaxis("right", functions=(lambda p: (p / base - 1) * 100, lambda d: base * (1 + d / 100)))
        right.set_ylabel("vs base (%)")
    ax.set_xlabel("size on disk (MiB)")
    ax.set_ylabel(f"{PPL_LABELS[text]} (lower is better)")
    ax.ticklabel_format(axis="y", style="plain", useOffset=False)
    ax.set_title(f"Quality against size on {table['model']} (o quantize, ^ prune, D merge)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
