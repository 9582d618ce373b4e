"""The model card (README.md) `se-compress push` writes into a checkpoint before uploading it.

Metadata (YAML front matter) the Hub validates: `base_model` (a Hub id only: a local path or the shipped default
model is named in the body instead), `base_model_relation: quantized` for quantized checkpoints only (the Hub has
no value for pruned or merged experts; "merge" means merging whole models, so it is left out and the body says
so), `library_name: transformers`, `pipeline_tag`, `tags`, and `license` copied from the base model's card.

The body is built from what lies in the checkpoint folder: compression_report.json (what was done),
se_report.json or the report embedded in compression_report.json (the Super Experts), recipe.json (the driver's
recipe) and evaluation results (eval.json of this checkpoint, or compare.json of a `se-compress compare` run with
the base model and the naive twin).
"""
import json
import re
from pathlib import Path

import yaml

from ..models.checkpoint import DEFAULT_MODEL_DIR

QUANT_METHODS = {"rtn", "gptq"}
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_hub_id(name: str | None) -> bool:
    return bool(name) and bool(HUB_ID.match(name)) and not Path(name).expanduser().exists()


# ---- what the folder holds -------------------------------------------------------------------------------------

def find_evaluation(folder: Path, explicit: Path | None = None) -> tuple[dict | None, Path | None]:
    """(eval.json or compare.json dict, where it was found). --eval wins. Otherwise a compare.json that has a row
    for this checkpoint (next to it, or `se-compress compare`'s checkpoints/compare-*/), then its own eval.json."""
    if explicit is not None:
        path = explicit
        if path.is_dir():
            path = path / "eval.json" if (path / "eval.json").exists() else path / "compare.json"
        return _read_json(path), path
    compares = [folder / "compare.json", folder / "eval" / "compare.json", folder.parent / "compare.json",
                *sorted(folder.parent.glob("compare-*/compare.json"))]
    for path in compares:
        data = _read_json(path) if path.exists() else None
        if data and _this_row([dict(r, label=r.get("recipe") or r.get("label")) for r in data.get("rows", [])], folder):
            return data, path
    for path in (folder / "eval" / "eval.json", folder / "eval.json", folder.parent / f"{folder.name}-eval" / "eval.json"):
        data = _read_json(path) if path.exists() else None
        if data is not None:
            return data, path
    return None, None


def base_model_card_license(base: str | None) -> str | None:
    """The `license` of the base model's card: a local folder's README.md, the shipped default model, or (for a
    Hub id) the card in the local HF cache, else downloaded. None when there is no card or no license in it."""
    if not base:
        return None
    if base == "default":
        readme = DEFAULT_MODEL_DIR / "README.md"
    elif Path(base).expanduser().exists():
        readme = Path(base).expanduser() / "README.md"
    elif is_hub_id(base):
        readme = _hub_readme(base)
    else:
        return None
    if readme is None or not Path(readme).exists():
        return None
    meta = front_matter(Path(readme).read_text(encoding="utf-8", errors="replace"))
    value = meta.get("license")
    return str(value) if value else None


def _hub_readme(repo_id: str) -> Path | None:
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    from ..eval.tasks import hub_reachable

    cached = try_to_load_from_cache(repo_id, "README.md")
    if isinstance(cached, str):
        return Path(cached)
    if not hub_reachable():  # one 3 s check instead of the client's retries
        return None
    try:
        return Path(hf_hub_download(repo_id, "README.md", etag_timeout=10))
    except Exception:  # noqa: BLE001: no card, no network, gated: the license is then left out and said so
        return None


def front_matter(text: str) -> dict:
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        data = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


# ---- the pieces of the card ------------------------------------------------------------------------------------

def describe_compression(report: dict | None) -> dict:
    """kind ('quantized', 'pruned', 'merged', 'zeroed', 'none'), a one-line summary, tags, and where it loads."""
    if not report:
        return {"kind": "none", "summary": "No compression_report.json: published as is.", "tags": [],
                "transformers": "yes", "vllm": "yes, if vLLM supports the architecture", "deployable": True}
    method = report.get("method")
    if method in QUANT_METHODS:
        return _describe_quant(report)
    if method in ("prune", "merge"):
        verb = "pruned" if method == "prune" else "merged"
        summary = (f"Expert {'pruning' if method == 'prune' else 'merging'}: {report.get('experts_before')} -> "
                   f"{report.get('experts_after')} routed experts per MoE layer"
                   + (f", criterion `{report['criterion']}`" if report.get("criterion") else "")
                   + f", SE policy `{report.get('se_policy')}`.")
        lost = report.get("super_experts_removed" if method == "prune" else "super_experts_merged") or []
        if lost:
            summary += f" Super Experts {verb}: " + ", ".join(f"({x['layer']},{x['expert']})" for x in lost) + "."
        return {"kind": verb, "summary": summary, "tags": ["expert-pruning" if method == "prune" else "expert-merging"],
                "transformers": "yes: a standard checkpoint of the same architecture with fewer experts",
                "vllm": "yes: same architecture, fewer experts (not run here)", "deployable": True}
    if method == "zero":
        zeroed = report.get("zeroed") or []
        return {"kind": "zeroed", "tags": ["ablation"],
                "summary": f"Ablation: down_proj of {len(zeroed)} experts set to zero ({report.get('zero')}); shapes "
                           f"unchanged. For measuring what these experts do, not for saving memory.",
                "transformers": "yes", "vllm": "yes (same shapes as the base)", "deployable": True}
    return {"kind": "unknown", "summary": f"Compression method `{method}` (see compression_report.json).", "tags": [],
            "transformers": "see compression_report.json", "vllm": "see compression_report.json", "deployable": True}


def describe_foreign_quantization(folder: Path) -> dict:
    """A checkpoint another tool quantized (llm-compressor, GPTQModel...): what its config.json says, no report."""
    config = _read_json(Path(folder) / "config.json") or {}
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != "compressed-tensors":
        return describe_compression(None)
    groups = []
    for name, group in (qc.get("config_groups") or {}).items():
        w, a = group.get("weights") or {}, group.get("input_activations") or {}
        label = f"W{w.get('num_bits', 16)}" + ("fp" if w.get("type") == "float" else "")
        label += f"A{a['num_bits']}" if a else "A16"
        label += f" g{w['group_size']}" if w.get("group_size") else ""
        groups.append(f"{label} on {', '.join(f'`{t}`' for t in group.get('targets', []))}")
    summary = (f"compressed-tensors `{qc.get('format')}` written by another tool (no compression_report.json): "
               + "; ".join(groups) + f"; {len(qc.get('ignore') or [])} ignore entries.")
    return {"kind": "quantized", "summary": summary, "tags": ["quantized", "compressed-tensors"], "deployable": True,
            "transformers": "yes: compressed-tensors (`pip install compressed-tensors`)",
            "vllm": "yes, expected: compressed-tensors (not run here)",
            "note": "se_compress evaluates it through compressed-tensors' own matching (models/ct_checkpoint.py)."}


def _describe_quant(report: dict) -> dict:
    bits, method = report.get("bits"), str(report.get("method", "")).upper()
    group = f"g{report['group_size']}" if report.get("group_size") else "per-channel"
    policy = report.get("se_policy") or ["none"]
    policy = policy if isinstance(policy, list) else [policy]
    load = report.get("loading") or {}
    fmt = load.get("format") or report.get("output_format")
    summary = (f"{method} W{bits} {group}, {'symmetric' if report.get('symmetric', True) else 'asymmetric'}, SE policy "
               f"`{'+'.join(policy)}`, format `{fmt}`.")
    tags = ["quantized", f"int{bits}", str(report.get("method"))]
    if report.get("never_quantized"):
        summary += " Never quantized: " + ", ".join(report["never_quantized"]) + "."
    for w in report.get("super_weights") or []:
        if {"module", "row", "col", "value", "quantized"} <= set(w):
            summary += f" Super weight {w['module']}[{w['row']}, {w['col']}]: {w['value']:.5g} -> {w['quantized']:.5g}."
    if fmt == "fake-quant":
        keep = "keep" in policy
        return {"kind": "quantized", "summary": summary, "tags": tags + ["fake-quant"], "deployable": not keep,
                "transformers": "yes, as a dense model: the weights are dequantized (the quantization error is in "
                                "them, the memory saving is not)",
                "vllm": "yes, as a dense model (no memory saving)",
                "note": ("`keep` policy: Super Experts stay in bf16 inside quantized layers. One quantization scheme "
                         "per MoE layer is all vLLM (and llama.cpp, GPTQModel) can run, so this checkpoint is NOT "
                         "deployable as a quantized model: it is for evaluating the policy.") if keep else
                        "Fake-quant: stored dequantized, for evaluation."}
    uniform = load.get("transformers") is True
    return {"kind": "quantized", "summary": summary, "tags": tags + ["compressed-tensors"], "deployable": True,
            "transformers": ("yes: compressed-tensors, one scheme for every expert (`pip install compressed-tensors`)"
                             if uniform else "no: " + str(load.get("why") or "mixed schemes across layers")),
            "vllm": ("yes, expected: compressed-tensors WNA16, one scheme per MoE layer (not run here)"
                     if load.get("deployable_quantized", True) else "no"),
            "note": None if uniform else "se_compress loads it: `se_compress.quant.compressed_tensors.PackedCheckpoint`."}


def _se_handling(compression: dict | None) -> dict:
    """(layer, expert) -> what the compression did to that Super Expert, in a few words."""
    if not compression:
        return {}
    method, out = compression.get("method"), {}
    key = lambda x: (int(x["layer"]), str(x["expert"]))  # noqa: E731
    if method in QUANT_METHODS:
        for s in compression.get("super_experts") or []:
            bits = "bf16" if s.get("bits", 0) >= 16 else f"int{s.get('bits')}"
            flags = [f for f in ("noclip", "calib") if s.get(f)]
            out[key(s)] = bits + (f" ({', '.join(flags)})" if flags else "")
    elif method == "prune":
        removed = {key(x) for x in compression.get("super_experts_removed") or []}
        for s in compression.get("super_experts") or []:
            out[key(s)] = "removed" if key(s) in removed else "kept"
    elif method == "merge":
        merged = {key(x): x.get("merged_with") for x in compression.get("super_experts_merged") or []}
        for s in compression.get("super_experts") or []:
            out[key(s)] = f"merged with {merged[key(s)]}" if key(s) in merged else "kept alone"
    elif method == "zero":
        for z in compression.get("zeroed") or []:
            if z.get("super_expert"):
                out[key(z)] = "zeroed"
    return out


def super_expert_lines(se_report: dict | None, compression: dict | None) -> list[str]:
    ses = (se_report or {}).get("super_experts")
    if ses is None:
        ses = (compression or {}).get("super_experts")
    if ses is None:
        return ["No SE report in the checkpoint folder (run `se-compress detect` on the base model)."]
    if not ses:
        return ["The detector found no Super Experts in the base model."]
    criterion = (se_report or {}).get("criterion") or {}
    handling = _se_handling(compression)
    lines = [f"{len(ses)} Super Expert{'s' if len(ses) != 1 else ''} in the base model (paper rule: max |down_proj "
             f"output| above the P{100 * criterion.get('quantile', 0.995):g} of all experts and above "
             f"max/{1 / criterion.get('max_fraction', 0.1):g}):", "",
             "| layer | expert | max output | channel | token | in this model |", "|---:|---|---:|---:|---|---|"]
    for s in ses:
        value = s.get("max_output")
        token = s.get("token")
        lines.append(f"| {s.get('layer')} | {s.get('expert')} | {'' if value is None else f'{value:.4g}'} | "
                     f"{s.get('channel', '')} | {'' if token is None else json.dumps(token)} | "
                     f"{handling.get((int(s.get('layer')), str(s.get('expert'))), '')} |")
    return lines


def evaluation_lines(evaluation: dict | None, folder: Path) -> list[str]:
    from ..eval.run import comparison_markdown

    if not evaluation:
        return ["Not evaluated yet: `se-compress eval CHECKPOINT` (or `se-compress compare`) writes the results that "
                "`se-compress push` puts here."]
    if evaluation.get("kind") == "se_compress.eval":  # this checkpoint alone
        rows = [evaluation]
        caption = "This checkpoint only (no compare.json with the base model and the naive twin was found)."
    else:  # compare.json: {"rows": [{"recipe": ..., **eval.json}, ...]}
        rows = [dict(r, label=r.get("recipe") or r.get("label") or r.get("model")) for r in evaluation.get("rows", [])]
        caption = "Base model, this checkpoint and its naive twin(s), evaluated in the same run."
        this = _this_row(rows, folder)
        if this is not None:
            rows = [r for r in rows if r is this or r["label"] == "base" or "naive" in str(r["label"])] or rows
            this["label"] = f"**{this['label']}** (this model)"
    if not rows:
        return ["The evaluation file has no results."]
    settings = rows[0].get("settings") or {}
    return [caption, "", comparison_markdown(rows), "",
            f"WikiText-2 perplexity in the GPTQ convention (raw test, non-overlapping {settings.get('seqlen', '')}-token "
            f"windows); tasks with lm-eval {settings.get('lm_eval', '')}, no chat template"
            + (f", at most {settings['limit']} examples per task" if settings.get("limit") else "")
            + "; sink = mean attention on the first token; rep4 = share of repeated 4-grams in greedy generations."]


def _this_row(rows: list[dict], folder: Path) -> dict | None:
    target = folder.resolve()
    for r in rows:
        if r.get("path") and Path(r["path"]).resolve() == target:
            return r
    recipe = (_read_json(folder / "recipe.json") or {}).get("recipe", {}).get("name")
    name = folder.resolve().name  # the driver names checkpoints <model>-<recipe>
    return (next((r for r in rows if recipe and r.get("label") == recipe), None)
            or next((r for r in rows if r.get("label") in (name,) or name.endswith(f"-{r.get('label')}")), None))


def loading_lines(info: dict, repo_id: str) -> list[str]:
    lines = ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", dtype="auto")',
             f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")', "```", "",
             f"- transformers: {info['transformers']}", f"- vLLM: {info['vllm']}"]
    if info.get("note"):
        lines.append(f"- {info['note']}")
    if not info.get("deployable", True):
        lines += ["", "**Not deployable as a quantized model.**"]
    return lines


# ---- the card --------------------------------------------------------------------------------------------------

def build_model_card(folder: Path, repo_id: str, *, evaluation: dict | None = None, base_model: str | None = None,
                     license: str | None = None) -> tuple[str, dict]:
    """(README.md text, the metadata dict). `base_model` / `license` override what the folder's reports say."""
    folder = Path(folder)
    compression = _read_json(folder / "compression_report.json")
    se_report = _read_json(folder / "se_report.json") or (compression or {}).get("se_report")
    recipe = _read_json(folder / "recipe.json")
    made_from = (compression or {}).get("model") or (recipe or {}).get("model")  # as the compressor was given it
    source = base_model or made_from
    info = describe_compression(compression) if compression else describe_foreign_quantization(folder)
    # the base model's card: the folder (or shipped model) it was made from, else the Hub card of --base-model
    license = license or base_model_card_license(made_from) or (base_model_card_license(base_model) if base_model else None)

    meta = {}
    if is_hub_id(source):
        meta["base_model"] = source
        if info["kind"] == "quantized":
            meta["base_model_relation"] = "quantized"
    if license:
        meta["license"] = license
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation"
    arch = (compression or {}).get("architecture") or (se_report or {}).get("architecture")
    meta["tags"] = list(dict.fromkeys(["moe", "se_compress", "super-experts", *info["tags"], *([arch] if arch else [])]))

    name = repo_id.split("/")[-1]
    body = [f"# {name}", "", f"{info['summary']}", ""]
    if source:
        body.append(f"Base model: `{source}`" + (" (the se_compress shipped default model, not on the Hub)"
                                                 if source == "default" else "") + ".")
        if info["kind"] in ("pruned", "merged"):
            body.append(f"The Hub has no `base_model_relation` for {info['kind']} experts, so none is set in the "
                        f"metadata: this model is `{source}` with experts {info['kind']}, not a fine-tune or an adapter.")
        body.append("")
    if not license:
        body += ["License: not found in the base model's card; check the base model's terms before use.", ""]
    body += ["Made with se_compress, which finds the Super Experts of MoE models (experts whose rare huge outputs "
             "create the massive activations behind attention sinks; Su et al., arXiv 2507.23279) and compresses "
             "around them.", ""]
    if recipe and recipe.get("recipe"):
        r = recipe["recipe"]
        body += ["## Recipe", "", f"`{r.get('name')}`: {r.get('description') or ''}".rstrip(), "", "```yaml",
                 yaml.safe_dump({k: v for k, v in r.items() if k not in ("description",) and v not in (None, [], {})},
                                sort_keys=False).rstrip(), "```", ""]
    body += ["## Super Experts", "", *super_expert_lines(se_report, compression), "",
             "## Evaluation", "", *evaluation_lines(evaluation, folder), "",
             "## How to load", "", *loading_lines(info, repo_id), "",
             "## Files", "", "Weights and config as written by se_compress"
             + (", `compression_report.json` (every decision, per layer and expert)" if compression else "")
             + (", `se_report.json` (the detector's statistics)" if (folder / "se_report.json").exists() else "") + "."]
    text = "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n" + "\n".join(body) + "\n"
    return text, meta
