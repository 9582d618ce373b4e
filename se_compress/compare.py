"""`se-compress compare --recipes a,b,c`: run (or reuse) each recipe on one model, evaluate each result beside
the base model, and write compare.md (one table), compare.json and compare.png (quality against size)."""
import json
from pathlib import Path

from .driver import compress, default_output, model_label
from .models.checkpoint import resolve_model
from .recipe import load_recipe


def size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) / 2**20


def evaluation(checkpoint: str, tasks: list[str], limit: int | None, out: Path) -> dict:
    """eval.json of a checkpoint, computed once and reused."""
    cached = out / "eval.json"
    if cached.exists():
        return json.loads(cached.read_text())
    from .eval.run import evaluate_checkpoint

    return evaluate_checkpoint(checkpoint, tasks, limit, out)


def describe(recipe) -> tuple[str, str]:
    """(method, SE policy) of a recipe, for the table."""
    parts, policies = [], []
    for stage in recipe.stages:
        o = stage.options
        if stage.kind == "quantize":
            parts.append(f"{o.method.upper()} W{o.bits} g{o.group_size}")
            policies.append("+".join(o.se_policy))
        elif stage.kind in ("prune", "merge"):
            size = f"-{o.fraction:.0%}" if o.fraction else f"keep {o.keep}"
            parts.append(f"{stage.kind} {size}" + (f" {o.criterion}" if stage.kind == "prune" else ""))
            policies.append(o.se_policy)
        else:
            parts.append(stage.kind)
    return ", ".join(parts), ", ".join(policies) or "-"


def compare(recipes: list[str], model: str = "default", out: Path | None = None, tasks: list[str] | None = None,
            limit: int | None = None) -> dict:
    src = resolve_model(model)
    out = Path(out or f"checkpoints/compare-{model_label(model)}")
    out.mkdir(parents=True, exist_ok=True)
    first = load_recipe(recipes[0])
    tasks = tasks if tasks is not None else first.evaluate.tasks
    base = evaluation(model, tasks, limit, Path(f"checkpoints/{model_label(model)}-base-eval"))
    rows = [{"recipe": "base", "method": "bf16 (original)", "se_policy": "-", "size_mb": size_mb(src), **base}]
    for name in recipes:
        recipe = load_recipe(name)
        ckpt = default_output(model, recipe)
        if not (ckpt / "recipe.json").exists():
            compress(name, model=model, out=str(ckpt))
        meta = json.loads((ckpt / "recipe.json").read_text())
        method, policy = describe(recipe)
        result = evaluation(str(ckpt), tasks, limit, ckpt / "eval")
        rows.append({"recipe": name, "method": method, "se_policy": policy, "size_mb": size_mb(ckpt),
                     "compress_seconds": meta.get("seconds"), **result})
    table = {"model": model, "tasks": tasks, "rows": rows}
    (out / "compare.json").write_text(json.dumps(table, indent=2, default=str))
    (out / "compare.md").write_text(markdown(table))
    plot(table, out / "compare.png")
    return table


def _metric(row: dict, key: str):
    return row.get("metrics", row).get(key)


def markdown(table: dict) -> str:
    tasks = [t for t in table["tasks"] if t != "wikitext2"]
    head = ["recipe", "method", "SE policy", "size (MB)", "WikiText-2 ppl"] + tasks + ["D_sink", "repetition", "time (s)"]
    lines = [f"# Comparison on {table['model']}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table["rows"]:
        cells = [r["recipe"], r["method"], r["se_policy"], f"{r['size_mb']:.1f}", _fmt(_metric(r, "wikitext2_ppl"))]
        cells += [_fmt(_metric(r, t)) for t in tasks]
        cells += [_fmt(_metric(r, "d_sink")), _fmt(_metric(r, "repetition")), _fmt(r.get("compress_seconds"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in table["rows"]:
        ppl = _metric(r, "wikitext2_ppl")
        if ppl is None:
            continue
        naive = "naive" in r["recipe"]
        color = "gray" if r["recipe"] == "base" else ("tab:orange" if naive else "tab:green")
        ax.scatter(r["size_mb"], ppl, color=color, s=40)
        ax.annotate(r["recipe"], (r["size_mb"], ppl), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("WikiText-2 perplexity (lower is better)")
    ax.set_yscale("log")
    ax.set_title(f"Quality against size on {table['model']} (green: SE-aware, orange: naive)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
