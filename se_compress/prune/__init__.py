"""Expert pruning that protects Super Experts, writing a smaller standard checkpoint; and the paper's ablation
(zeroing experts' down_proj, shapes kept).

prune_model: one statistics pass with real routing (the detector's pass: routing count, REAP, EAN per expert and
the SE set come from the same tokens), then per MoE layer the same number of experts is removed by the chosen
criterion, an SE is never removed under `protect`, and the checkpoint is rewritten one decoder layer at a time.
"""
import copy
import random
from collections import defaultdict
from pathlib import Path

from ..detect import detect
from ..errors import SECompressError
from ..export.writer import check_output_path
from ..models.adapters import adapter_for
from ..models.handle import open_model
from ..models.placement import host_placement
from ..models.streaming import StreamedModel
from .common import (REPORT_NAME, check_se_report, dump_report, expert_groups, expert_statistics, model_card,
                     super_experts_by_layer, target_count, write_edited_checkpoint)
from .select import CRITERIA, SE_POLICIES, choose_kept, saliency
from .stored import write_pruned_stored
from .surgery import keep_experts

__all__ = ["prune_model", "zero_experts_model", "CRITERIA", "SE_POLICIES"]


def _open(model, allow_pickle: bool, trust_remote_code: bool):
    """(handle, its name, path, checkpoint reader, config, adapter): the caller's handle, or the model opened here once."""
    handle = open_model(model, allow_pickle, trust_remote_code)
    return handle, handle.name, handle.path, handle.checkpoint, handle.config, handle.adapter


def _moe_layers(config, adapter) -> list[int]:
    return [i for i in range(config.num_hidden_layers) if adapter.is_moe_layer(config, i)]


def _se_report(se_report, handle, config, adapter, detect_kwargs) -> tuple[dict, str]:
    if se_report is not None:
        return check_se_report(se_report, config, adapter), "given (--se-report)"
    return detect(handle, **detect_kwargs), "detection run by this command on its calibration set"


def _calib_flags(se_source: str, calib: str, samples: int, seqlen: int, seed: int) -> str:
    if se_source.startswith("given"):
        return " --se-report se_report.json"
    return f" --calib {calib} --samples {samples} --seqlen {seqlen} --seed {seed}"


def prune_model(model: str, out, *, fraction: float | None = None, keep: int | None = None, criterion: str = "reap",
                se_policy: str = "protect", se_report: dict | None = None, calib: str = "wikitext2", samples: int = 64,
                seqlen: int = 256, seed: int = 0, force: bool = False, progress: bool = True, batch_size: int = 8,
                allow_pickle: bool = False, trust_remote_code: bool = False) -> Path:
    """Remove the same number of routed experts from every MoE layer; write the smaller checkpoint to `out`.

    With `se_report` given, its SE set and its per-expert statistics (count, REAP, EAN from the detector's pass)
    are used and no calibration pass runs; otherwise detection runs here once and provides both.
    """
    if criterion not in CRITERIA:
        raise SECompressError(f"unknown --criterion '{criterion}': use one of {', '.join(CRITERIA)}")
    if se_policy not in SE_POLICIES:
        raise SECompressError(f"unknown --se-policy '{se_policy}' for pruning: use protect (never remove a Super "
                              f"Expert) or none (the naive baseline)")
    handle, model, path, ckpt, config, adapter = _open(model, allow_pickle, trust_remote_code)
    num_experts = adapter.num_experts(config)
    keep = target_count(config, num_experts, fraction, keep)
    check_output_path(path, out, force)  # fail before the statistics pass, not after it
    report, se_source = _se_report(se_report, handle, config, adapter, dict(
        calib=calib, samples=samples, seqlen=seqlen, seed=seed, batch_size=batch_size, progress=progress,
        allow_pickle=allow_pickle, trust_remote_code=trust_remote_code))
    ses = super_experts_by_layer(report)
    groups = expert_groups(config)
    where = "group" if groups > 1 else "layer"

    kept_by_layer, layers, removed_ses = {}, [], []
    for i in _moe_layers(config, adapter):
        stats = expert_statistics(report, i, num_experts)
        score = saliency(criterion, stats, i, seed)
        routed_ses = {e for e in ses.get(i, set()) if e != "shared"}
        kept, saved = choose_kept(score, routed_ses, keep, groups, se_policy == "protect", i)
        kept_by_layer[i] = kept
        removed = []
        for e in sorted(set(range(num_experts)) - set(kept)):
            why = f"{criterion} score {score[e]:.4g}: among the {(num_experts - keep) // groups} lowest of its {where}"
            if e in routed_ses:
                why += " (a Super Expert: removed because --se-policy none)"
                removed_ses.append({"layer": i, "expert": e})
            removed.append({"expert": e, "score": float(score[e]), "count": int(stats["count"][e]),
                            "super_expert": e in routed_ses, "why": why})
        layers.append({"layer": i, "kept": kept, "removed": removed,
                       "protected_super_experts": [{"expert": e, "score": float(score[e]),
                                                    "why": "a Super Expert: its score would have removed it"}
                                                   for e in saved]})

    new_config = copy.deepcopy(config)
    adapter.set_num_experts(new_config, keep)
    from ..models.formats import drop_mtp

    stored = ckpt.format is not None  # FP8-block / MXFP4: written in the stored format (prune/stored.py)
    mtp = drop_mtp(new_config, ckpt.stored_map) if stored else None
    ses_list = [(s["layer"], s["expert"]) for s in report["super_experts"]]
    compression = {
        "method": "prune", "model": model, "architecture": config.model_type, "criterion": criterion,
        "se_policy": se_policy, "experts_before": num_experts, "experts_after": keep, "fraction": fraction,
        "keep": keep, "groups": groups, "num_experts_per_tok": int(config.num_experts_per_tok),
        "statistics": "routing count, REAP and EAN with real routing, from the detector's pass",
        "calibration": report.get("calibration"), "se_report_source": se_source,
        "super_experts": [{"layer": l, "expert": e} for l, e in ses_list],
        "super_experts_removed": removed_ses, "layers": layers, "se_report": report,
    }
    if stored:
        compression["stored_format"] = (f"{ckpt.format.describe()} (quant_method {ckpt.format.quant_method}), kept: "
                                         f"every retained tensor copied as stored, quantization_config unchanged")
    if mtp:
        compression["multi_token_prediction"] = mtp
    command = (f"se-compress prune {model} --out {out} --keep {keep} --criterion {criterion} --se-policy {se_policy}"
               + _calib_flags(se_source, calib, samples, seqlen, seed))
    summary = [
        f"Expert pruning of `{model}` ({config.model_type}): {num_experts} -> {keep} routed experts in each of "
        f"{len(layers)} MoE layers, criterion `{criterion}`, SE policy `{se_policy}`"
        + (f", {groups} router groups kept equal" if groups > 1 else "") + ".",
        f"Super Experts: {', '.join(f'({l},{e})' for l, e in ses_list) or 'none found'}; removed: "
        f"{', '.join('({layer},{expert})'.format(**r) for r in removed_ses) or 'none'}.",
        f"Experts are renumbered 0..{keep - 1} in each layer; `{REPORT_NAME}` maps them to the original ones.",
    ]
    if stored:  # FP8 / MXFP4: copied as stored, never through the dequantized model
        summary += [f"Stored format kept: {ckpt.format.describe()}; retained tensors are the input's bytes."] + (
            [mtp[0].upper() + mtp[1:] + "."] if mtp else [])
        card = model_card(model, f"{Path(out).name}: {model} with {keep} of {num_experts} experts", summary, command,
                          ["expert-pruning"])
        return write_pruned_stored(ckpt, out, new_config, kept_by_layer, num_experts,
                                   {REPORT_NAME: dump_report(compression), "README.md": card}, force, progress)

    card = model_card(model, f"{Path(out).name}: {model} with {keep} of {num_experts} experts", summary, command,
                      ["expert-pruning"])
    sm = StreamedModel(ckpt, placement=host_placement())  # surgery only: weights are edited and written, never run
    edit = lambda i, layer: keep_experts(adapter, layer, kept_by_layer[i]) if i in kept_by_layer else None  # noqa: E731
    return write_edited_checkpoint(sm, ckpt, out, new_config, edit, {REPORT_NAME: dump_report(compression),
                                                                     "README.md": card}, force, progress)


def parse_zero_spec(spec: str, config, adapter) -> tuple[str, object]:
    """'L:E,L:E' (E an index or 'shared') -> ("list", [(L, E)]); 'se' -> ("se", None); 'random:K' -> ("random", K)."""
    spec = spec.strip()
    usage = "use L:E pairs like 2:5,3:shared, 'se' (the detected Super Experts) or 'random:K' (K random non-SE experts)"
    if spec == "se":
        return "se", None
    if spec.startswith("random:"):
        count = spec.split(":", 1)[1]
        if not count.isdigit() or int(count) < 1:
            raise SECompressError(f"bad --zero '{spec}': random needs a positive count, e.g. random:3")
        return "random", int(count)
    num_experts, pairs = adapter.num_experts(config), []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        layer, _, expert = part.partition(":")
        if not layer.strip().isdigit() or not (expert.strip().isdigit() or expert.strip() == "shared"):
            raise SECompressError(f"bad --zero item '{part}': {usage}")
        layer, expert = int(layer), (expert.strip() if expert.strip() == "shared" else int(expert))
        if not (layer < config.num_hidden_layers and adapter.is_moe_layer(config, layer)):
            raise SECompressError(f"--zero {part}: layer {layer} is not an MoE layer of this model (MoE layers: "
                                  f"{_moe_layers(config, adapter)})")
        if expert == "shared" and adapter.shared_attr is None:
            raise SECompressError(f"--zero {part}: {config.model_type} has no shared expert")
        if expert != "shared" and expert >= num_experts:
            raise SECompressError(f"--zero {part}: layers have {num_experts} routed experts (0..{num_experts - 1})")
        pairs.append((layer, expert))
    if not pairs:
        raise SECompressError(f"empty --zero: {usage}")
    return "list", sorted(set(pairs), key=lambda p: (p[0], str(p[1])))


def zero_experts_model(model: str, out, zero: str, *, se_report: dict | None = None, seed: int = 0, force: bool = False,
                       calib: str = "wikitext2", samples: int = 64, seqlen: int = 256, batch_size: int = 8,
                       progress: bool = True, allow_pickle: bool = False, trust_remote_code: bool = False) -> Path:
    """The SE paper's ablation as a checkpoint: zero the down_proj (and gpt-oss's down_proj bias) of the given
    experts; shapes, routing and config stay as they are. `zero`: "L:E,..." | "se" | "random:K" (K random routed
    experts that are not SEs, seeded). 'se' and 'random' need the SE set: given, or detected here."""
    from ..models.edit import zero_experts

    handle, model, path, ckpt, config, adapter = _open(model, allow_pickle, trust_remote_code)
    kind, value = parse_zero_spec(zero, config, adapter)
    check_output_path(path, out, force)
    report, se_source = se_report, "given (--se-report)"
    if report is not None:
        check_se_report(report, config, adapter)
    elif kind != "list":
        report, se_source = _se_report(None, handle, config, adapter, dict(
            calib=calib, samples=samples, seqlen=seqlen, seed=seed, batch_size=batch_size, progress=progress,
            allow_pickle=allow_pickle, trust_remote_code=trust_remote_code))
    ses = {(s["layer"], s["expert"]) for s in report["super_experts"]} if report else set()
    if kind == "se":
        targets = sorted(ses, key=lambda p: (p[0], str(p[1])))
        if not targets:
            raise SECompressError(f"the detector found no Super Experts in {model}: nothing to zero (see its se_report)")
    elif kind == "random":
        pool = [(i, e) for i in _moe_layers(config, adapter) for e in range(adapter.num_experts(config))
                if (i, e) not in ses]
        if value > len(pool):
            raise SECompressError(f"--zero random:{value}: only {len(pool)} routed non-SE experts exist")
        targets = sorted(random.Random(seed).sample(pool, value))
    else:
        targets = value
    by_layer = defaultdict(list)
    for layer, expert in targets:
        by_layer[layer].append(expert)

    compression = {
        "method": "zero", "model": model, "architecture": config.model_type, "zero": zero, "seed": seed,
        "note": "down_proj (and its bias) of these experts set to 0; shapes, router and config unchanged",
        "zeroed": [{"layer": l, "expert": e, "super_expert": (l, e) in ses if report else None} for l, e in targets],
        "se_report_source": se_source if report else None, "se_report": report,
    }
    summary = [f"Ablation of `{model}`: down_proj zeroed for {len(targets)} experts ({zero}): "
               f"{', '.join(f'({l},{e})' for l, e in targets[:20])}{' ...' if len(targets) > 20 else ''}.",
               "Shapes are unchanged: this checkpoint is for measuring what these experts do, not for saving memory."]
    command = f"se-compress prune {model} --out {out} --zero {zero}" + (f" --seed {seed}" if kind == "random" else "")
    card = model_card(model, f"{Path(out).name}: {model} with {len(targets)} experts zeroed", summary, command,
                      ["ablation"])
    sm = StreamedModel(ckpt, placement=host_placement())  # surgery only: weights are edited and written, never run
    edit = lambda i, layer: zero_experts(adapter, layer, by_layer[i]) if i in by_layer else None  # noqa: E731
    return write_edited_checkpoint(sm, ckpt, out, copy.deepcopy(config), edit,
                                   {REPORT_NAME: dump_report(compression), "README.md": card}, force, progress)
