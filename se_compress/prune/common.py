"""What pruning, merging and zeroing share: the target expert count and its checks, the SE set, the per-expert
statistics, the streamed write, and the compression report / model card written next to the weights."""
import json
from pathlib import Path

import numpy as np

from ..errors import SECompressError
from ..inputs import read_json_report
from ..export.writer import CheckpointWriter
from ..models.formats import rewritten_config
from ..models.runner import stream_layers

REPORT_NAME = "compression_report.json"


# ---- the target count ------------------------------------------------------------------------------------------

def expert_groups(config) -> int:
    """How many contiguous, equal blocks of experts the router's group-limited top-k relies on (1: no groups).

    DeepSeek-V3 always routes within `n_group` groups; DeepSeek-V2 only with topk_method=group_limited_greedy.
    Group g holds experts [g * E/n_group, (g + 1) * E/n_group).
    """
    n_group = int(getattr(config, "n_group", 1) or 1)
    if config.model_type == "deepseek_v3":
        return n_group
    if config.model_type == "deepseek_v2" and getattr(config, "topk_method", "greedy") == "group_limited_greedy":
        return n_group
    return 1


def target_count(config, num_experts: int, fraction: float | None, keep: int | None) -> int:
    """Routed experts to keep in every MoE layer, from --fraction (share removed) or --keep; refuses counts the
    router cannot work with, saying why."""
    if (fraction is None) == (keep is None):
        raise SECompressError("give exactly one of --fraction (share of the routed experts removed from each MoE layer, "
                              "e.g. 0.25) or --keep (routed experts kept per MoE layer)")
    if fraction is not None:
        if not 0 < fraction < 1:
            raise SECompressError(f"--fraction must be in (0, 1): it is the share of the routed experts removed from each "
                                  f"MoE layer (got {fraction}); e.g. --fraction 0.25")
        removed = round(fraction * num_experts)
        if removed == 0:
            raise SECompressError(f"--fraction {fraction} of {num_experts} experts rounds to none removed: use a larger "
                                  f"fraction or --keep {num_experts - 1}")
        keep, asked = num_experts - removed, f"--fraction {fraction} (keeps {num_experts - removed} of {num_experts})"
    else:
        asked = f"--keep {keep}"
    top_k = int(config.num_experts_per_tok)
    if keep >= num_experts:
        raise SECompressError(f"{asked} removes nothing: the model has {num_experts} routed experts per MoE layer; "
                              f"keep fewer")
    if keep < top_k:
        raise SECompressError(f"{asked} is below num_experts_per_tok={top_k}: every token is sent to {top_k} experts; "
                              f"keep at least {top_k}")
    groups = expert_groups(config)
    if groups > 1:
        if keep % groups:
            lower, upper = keep - keep % groups, keep - keep % groups + groups
            options = " or ".join(f"--keep {k}" for k in (lower, upper) if top_k <= k < num_experts and k >= groups)
            raise SECompressError(f"{asked}: {keep} is not divisible by n_group={groups}; the router picks experts inside "
                                  f"{groups} groups of equal size, so keep a multiple of {groups}"
                                  + (f" ({options})" if options else ""))
        per_group = keep // groups
        if config.model_type == "deepseek_v3" and per_group < 2:
            raise SECompressError(f"{asked} leaves {per_group} expert per group; DeepSeek-V3's router scores each group "
                                  f"by its 2 best experts, so keep at least {2 * groups}")
        topk_group = int(getattr(config, "topk_group", groups) or groups)
        if per_group * topk_group < top_k:
            raise SECompressError(f"{asked}: the router takes {top_k} experts from {topk_group} groups of {per_group}; "
                                  f"keep at least {-(-top_k // topk_group) * groups}")
    return keep


# ---- the SE report and per-expert statistics --------------------------------------------------------------------

def read_se_report(path) -> dict:
    """se_report.json as se-compress detect writes it; a file of another shape is one line, before any model work."""
    report = read_json_report(path, "se_report.json", "SE report", "se-compress detect")
    fix = "pass the se_report.json written by se-compress detect"
    if not isinstance(report, dict) or not isinstance(report.get("super_experts"), list):
        raise SECompressError(f"the SE report {path} has no 'super_experts' list: {fix}")
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    for what, entries, keys in (("super_experts", report["super_experts"], ("layer", "expert", "channel")),
                                ("experts", report.get("experts", []), ("layer", "expert"))):
        if not isinstance(entries, list):
            raise SECompressError(f"the SE report {path}: '{what}' is not a list: {fix}")
        for entry in entries:
            ok = isinstance(entry, dict) and all(k in entry for k in keys) and is_int(entry["layer"]) and (
                is_int(entry["expert"]) or entry["expert"] == "shared") and is_int(entry.get("channel", 0))
            if not ok:
                raise SECompressError(f"the SE report {path}: an entry of '{what}' is {json.dumps(entry)[:80]}, not "
                                      f"{{{', '.join(repr(k) + ': ...' for k in keys)}}}: {fix}")
    return report


def check_se_report(report: dict, config, adapter, source: str = "the SE report") -> dict:
    """The report must describe this model: same architecture and expert count, SEs in its MoE layers."""
    num_experts = adapter.num_experts(config)
    if "super_experts" not in report:
        raise SECompressError(f"{source} has no 'super_experts': pass the se_report.json written by se-compress detect")
    arch, count = report.get("architecture"), report.get("num_experts")
    if arch not in (None, config.model_type) or count not in (None, num_experts):
        raise SECompressError(f"{source} was made for a {arch} model with {count} experts, this model is a "
                              f"{config.model_type} with {num_experts}: run se-compress detect on this model, or leave "
                              f"out the SE report")
    for s in report["super_experts"]:
        layer, expert = s["layer"], s["expert"]
        bad_layer = not (0 <= layer < config.num_hidden_layers and adapter.is_moe_layer(config, layer))
        if bad_layer or (expert != "shared" and not 0 <= int(expert) < num_experts):
            raise SECompressError(f"{source} names Super Expert ({layer},{expert}), which this model does not have: "
                                  f"run se-compress detect on this model")
    return report


def super_experts_by_layer(report: dict) -> dict[int, set]:
    """MoE layer -> its Super Experts (routed experts as ints, the shared expert as "shared")."""
    by_layer: dict[int, set] = {}
    for s in report["super_experts"]:
        by_layer.setdefault(int(s["layer"]), set()).add(s["expert"] if s["expert"] == "shared" else int(s["expert"]))
    return by_layer


def expert_statistics(report: dict, layer: int, num_experts: int) -> dict[str, np.ndarray]:
    """count / reap / ean of the routed experts of one layer, as measured by the detector's pass (real routing)."""
    stats = {key: np.zeros(num_experts) for key in ("count", "reap", "ean")}
    seen = 0
    for e in report.get("experts", []):
        if e["layer"] == layer and e["expert"] != "shared" and int(e["expert"]) < num_experts:
            for key in stats:
                stats[key][int(e["expert"])] = e[key]
            seen += 1
    if seen < num_experts:
        raise SECompressError(f"the SE report has statistics for {seen} of the {num_experts} experts of layer {layer}: "
                              f"pass a complete se_report.json from se-compress detect, or leave out the SE report")
    return stats


# ---- writing ----------------------------------------------------------------------------------------------------

def write_edited_checkpoint(sm, ckpt, out, new_config, edit_layer, extra_files: dict, force: bool,
                            progress: bool = True) -> Path:
    """Stream the model layer by layer through the runner (models/runner.py, no batches): load, `edit_layer(i, layer)`
    in memory, write, free. One layer in memory."""
    # Written from the in-memory (dequantized) model: not in an FP8/MXFP4 input's stored format, and without its MTP
    # layer; the config, report and card say so.
    new_config, notes = rewritten_config(new_config, ckpt)
    if notes:
        extra_files = dict(extra_files)
        if REPORT_NAME in extra_files:
            report = json.loads(extra_files[REPORT_NAME])
            report["format_notes"] = notes
            extra_files[REPORT_NAME] = dump_report(report)
        if "README.md" in extra_files:
            extra_files["README.md"] += "\n## Stored format\n\n" + "".join(f"- {n}.\n" for n in notes)
    with CheckpointWriter(ckpt, out, new_config, force=force) as writer:
        writer.add_outside_layers(sm.model)

        def edit_and_write(i, layer):  # no round to run: the runner frees the layer once it is written
            edit_layer(i, layer)
            writer.add_module(f"model.layers.{i}", layer)
            return ()

        stream_layers(sm, None, 0, rounds_for=edit_and_write, progress=progress, desc="write layers")
        return writer.finish(extra_files=extra_files)


def _is_hub_id(model: str) -> bool:
    return model != "default" and model.count("/") == 1 and not Path(model).exists() and not model.startswith((".", "/", "~"))


def model_card(model: str, title: str, summary: list[str], command: str, tags: list[str]) -> str:
    """README.md stub. The Hub has no `base_model_relation` for pruned or merged models, so none is set."""
    front = ["---"] + ([f"base_model: {model}"] if _is_hub_id(model) else []) + [
        "library_name: transformers", "tags:"] + [f"  - {t}" for t in ["moe", "se-compress", "super-experts", *tags]] + ["---"]
    body = [
        "", f"# {title}", "", *[f"- {line}" for line in summary], "",
        "Made with se_compress:", "", "```", command, "```", "",
        f"What was removed or merged in each layer, and why, is in `{REPORT_NAME}` (with the Super Expert report used).",
        "It loads with plain `transformers.AutoModelForCausalLM.from_pretrained`.", "",
        "## Evaluation", "", "Not measured yet: run `se-compress` perplexity or task evaluation and fill this in.", "",
    ]
    return "\n".join(front + body)


def dump_report(report: dict) -> str:
    return json.dumps(report, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o))
