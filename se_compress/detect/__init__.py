"""Super Expert detection: calibration -> one statistics pass -> the paper's rule -> report and plots."""
import time
from pathlib import Path

import numpy as np

from .. import distributed as dist
from ..data.calibration import build_calibration
from ..errors import SECompressError
from ..models.adapters import adapter_for
from ..models.handle import load_tokenizer, model_name, open_model  # noqa: F401 (load_tokenizer: moved, still here)
from .collect import Statistics, collect_in_memory, collect_streamed
from .rule import Criterion, considered_layers, massive_activation_layers, select_super_experts


def build_report(model_name: str, config, stats: Statistics, calibration, criterion: Criterion, tokenizer) -> dict:
    adapter = adapter_for(config)
    seq_len = stats.seq_len
    ids = calibration.input_ids.reshape(-1)

    def where(global_token: int) -> dict:
        if global_token < 0:
            return {"sample": None, "position": None, "token": None, "token_id": None}
        token_id = int(ids[global_token])
        return {"sample": global_token // seq_len, "position": global_token % seq_len, "token_id": token_id,
                "token": tokenizer.decode([token_id])}

    experts, values = [], {}
    has_shared = False
    for layer, rec in sorted(stats.experts.items()):
        for slot in range(len(rec.count)):
            expert = slot if slot < rec.num_experts else "shared"
            has_shared |= expert == "shared"
            count = int(rec.count[slot])
            value = float(rec.max_output[slot])  # experts no token reaches count as 0, as in the paper's code
            values[(layer, expert)] = value
            experts.append({"layer": layer, "expert": expert, "max_output": value, "count": count,
                            "reap": float(rec.reap_sum[slot] / count) if count else 0.0,
                            "ean": float(rec.ean_sum[slot]), "channel": int(rec.max_channel[slot]),
                            **where(int(rec.max_token[slot]))})

    hidden = []
    for l, h in enumerate(stats.hidden):
        order = np.argsort(-h.max_abs.numpy())[:3]
        median = h.median()
        hidden.append({"layer": l, "max": float(h.max_abs.max()), "median": median,
                       "ratio": float(h.max_abs.max()) / max(median, 1e-12),
                       "first_token_max": h.first_token_max, "other_token_max": h.other_token_max,
                       "top_channels": [{"channel": int(c), "value": float(h.max_abs[c]), **where(int(h.max_token[c]))}
                                        for c in order]})
    massive = massive_activation_layers([h["max"] for h in hidden], [h["median"] for h in hidden], criterion.massive_ratio)
    moe_layers = sorted(stats.experts)
    layers, layers_rule = considered_layers(criterion, moe_layers, massive, stats.num_layers)
    sel = select_super_experts(values, layers, criterion)
    median_expert = float(np.median([v for k, v in values.items() if k[0] in set(layers)] or [0.0]))
    by_key = {(e["layer"], e["expert"]): e for e in experts}

    def se_entry(key):
        e = by_key[key]
        return {"layer": e["layer"], "expert": e["expert"], "max_output": e["max_output"], "channel": e["channel"],
                "position": e["position"], "token": e["token"], "token_id": e["token_id"], "sample": e["sample"],
                "count": e["count"], "times_median": e["max_output"] / max(median_expert, 1e-12)}

    notes = []
    if sel.get("quantile_limited"):
        extra = [f"({l},{e})" for l, e in sel["by_max_fraction_only"]]
        notes.append(f"Too few experts for the quantile to decide: P{criterion.quantile * 100:g} over {sel['n']} experts "
                     f"can select at most {sel['max_selectable_by_quantile']}; the max/{1 / criterion.max_fraction:g} "
                     f"rule alone selects {len(extra)}: {', '.join(extra)}.")
    dead = sum(1 for e in experts if e["count"] == 0)
    if dead:
        notes.append(f"{dead} experts saw no calibration token; their a(l,e) counts as 0.")
    top = sorted(experts, key=lambda e: -e["max_output"])[:20]
    return {
        "model": model_name,
        "architecture": config.model_type,
        "num_layers": stats.num_layers,
        "num_experts": stats.num_experts,
        "has_shared_expert": has_shared,
        "moe_layers": moe_layers,
        "router": adapter.router_scoring(config),
        "calibration": calibration.describe(),
        "criterion": {"quantile": criterion.quantile, "max_fraction": criterion.max_fraction, "layers": criterion.layers,
                      "layers_rule": layers_rule, "massive_ratio": criterion.massive_ratio},
        "thresholds": {k: sel.get(k) for k in ("quantile_value", "fraction_value", "max_value", "n",
                                               "max_selectable_by_quantile", "quantile_limited")},
        "considered_layers": layers,
        "massive_activation_layers": massive,
        "super_experts": [se_entry(k) for k in sel["super_experts"]],
        "by_max_fraction_only": [{"layer": l, "expert": e} for l, e in sel.get("by_max_fraction_only", [])],
        "median_expert_max": median_expert,
        "experts": experts,
        "top_experts": [{k: e[k] for k in ("layer", "expert", "max_output", "count", "reap", "channel", "token")} for e in top],
        "hidden_states": hidden,
        "notes": notes,
    }


def detect(model: str, calib: str = "wikitext2", samples: int = 64, seqlen: int = 256, seed: int = 0,
           criterion: Criterion | None = None, batch_size: int = 8, streamed: bool = True, allow_pickle: bool = False,
           trust_remote_code: bool = False, progress: bool = True, stats_out: list | None = None,
           layer_hook=None) -> dict:
    criterion = criterion or Criterion()
    if not streamed and dist.active():
        raise SECompressError("in-memory detection runs in one process: launch it without torchrun")
    handle = open_model(model, allow_pickle, trust_remote_code)  # the caller's handle, or opened here once
    ckpt = handle.checkpoint
    handle.adapter  # unknown architecture: fail before any work
    tokenizer = handle.tokenizer
    calibration = build_calibration(tokenizer, calib, samples, seqlen, seed)
    start = time.time()
    stats = (collect_streamed(ckpt, calibration.input_ids, batch_size, progress, layer_hook=layer_hook) if streamed
             else collect_in_memory(ckpt, calibration.input_ids, batch_size))
    if stats_out is not None:
        stats_out.append(stats)
    report = build_report(model_name(model), ckpt.config, stats, calibration, criterion, tokenizer)
    report["seconds"] = round(time.time() - start, 2)
    report["streamed"] = streamed
    return report


def write_report(report: dict, out: Path, plots: bool = True) -> Path:
    """Write se_report.json/.md and plots into `out`, each file renamed over the old one only when complete (never a
    half-written report; a folder se_compress did not write is refused: se_compress/output.py)."""
    import json

    from ..output import write_files_into
    from .report import markdown, write_plots

    return write_files_into(out, {"se_report.json": json.dumps(report, indent=2), "se_report.md": markdown(report)},
                            writers=[lambda folder: write_plots(report, folder)] if plots else [])
