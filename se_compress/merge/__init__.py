"""Expert merging that keeps Super Experts alone, writing a checkpoint with really fewer experts.

One statistics pass (the detector's, real routing) also measures, per MoE layer, how alike the experts' outputs
are on the same calibration tokens. Each layer's experts are clustered by that similarity (average linkage, as in
HC-SMoE) down to the target count, with clusters kept to a balanced size: one giant cluster would average many
unrelated experts into one. Each cluster becomes one expert: its weights are the routing-frequency-weighted mean
of the members' weights, and its router row (and router biases) the same weighted mean of the members' rows.
Unlike HC-SMoE / M-SMoE, which tie weights and keep the expert count, the result is a plain smaller checkpoint.
bench/prune_merge.md measures each of these choices against its alternative (mean-output similarity as in
HC-SMoE, unbalanced clusters, the most used member's router row).
"""
import copy
from pathlib import Path

import numpy as np
import torch

from ..detect import detect
from ..errors import SECompressError
from ..export.writer import check_output_path
from ..models.placement import host_placement
from ..models.streaming import StreamedModel
from ..prune import _moe_layers, _open
from ..prune.common import (REPORT_NAME, check_se_report, dump_report, expert_groups, expert_statistics, model_card,
                            super_experts_by_layer, target_count, write_edited_checkpoint)
from ..prune.surgery import mix_experts
from .cluster import OutputGram, average_linkage

__all__ = ["merge_model", "plan_clusters", "SE_POLICIES", "ROUTER_ROWS", "SIMILARITIES"]

SE_POLICIES = ("singleton", "none")
ROUTER_ROWS = ("frequency", "dominant")
SIMILARITIES = ("outputs", "mean")


def plan_clusters(distance: np.ndarray, super_experts: set[int], keep: int, groups: int, singleton: bool,
                  layer: int, max_size: int | None = None) -> list[list[int]]:
    """Partition the layer's experts into `keep` clusters, ordered by first member.

    Each router group (contiguous block; 1 group without group-limited routing) is clustered on its own into
    keep/groups clusters, so merged experts never cross groups. With `singleton` every SE is a cluster of its own
    and only the other experts are clustered. `max_size`: largest cluster; None = balanced, the smallest size that
    reaches the target (ceil(experts / clusters)); 0 = no limit (plain average linkage, as HC-SMoE).
    """
    num_experts = distance.shape[0]
    size, per_group = num_experts // groups, keep // groups
    clusters = []
    for g in range(groups):
        members = list(range(g * size, (g + 1) * size))
        alone = [e for e in members if singleton and e in super_experts]
        rest = [e for e in members if e not in alone]
        wanted = per_group - len(alone)
        if rest and wanted < 1:
            where = f"group {g} of layer {layer}" if groups > 1 else f"layer {layer}"
            raise SECompressError(f"{where} has {len(alone)} Super Experts and keeps {per_group} experts: keeping each SE "
                                  f"alone leaves no cluster for the other {len(rest)}; keep more experts, or use "
                                  f"--se-policy none")
        cap = -(-len(rest) // wanted) if max_size is None and rest else (max_size or None)
        found = average_linkage(distance[np.ix_(rest, rest)], wanted, cap) if rest else []
        clusters += [[e] for e in alone] + [[rest[j] for j in c] for c in found]
    return sorted(clusters)


def mixing_matrices(clusters: list[list[int]], counts: np.ndarray, router_rows: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[E', E] weights for the merged experts and for their router rows.

    Expert weights: each member weighted by its share of the cluster's routed tokens (uniform if none was routed).
    Router rows: the same weighted mean ("frequency"), or the row of the most used member ("dominant").
    """
    expert_mix = torch.zeros(len(clusters), len(counts), dtype=torch.float64)
    router_mix = torch.zeros_like(expert_mix)
    for j, members in enumerate(clusters):
        share = np.array([counts[e] for e in members], dtype=np.float64)
        share = share / share.sum() if share.sum() > 0 else np.full(len(members), 1.0 / len(members))
        expert_mix[j, members] = torch.tensor(share)
        if router_rows == "frequency":
            router_mix[j, members] = torch.tensor(share)
        else:
            router_mix[j, members[int(np.argmax(share))]] = 1.0
    return expert_mix, router_mix


def similarity_gram(handle, samples: int, seed: int, batch_size: int = 8, similarity_tokens: int = 512) -> OutputGram:
    """The accumulator of the output similarity, to hang on a detection pass over `samples` calibration samples
    (the defaults are merge_model's)."""
    batches = -(-samples // batch_size)
    return OutputGram(handle.adapter, handle.config, tokens_per_batch=max(1, -(-similarity_tokens // batches)), seed=seed)


def merge_model(model: str, out, *, fraction: float | None = None, keep: int | None = None,
                se_policy: str = "singleton", se_report: dict | None = None, calib: str = "wikitext2",
                samples: int = 64, seqlen: int = 256, seed: int = 0, force: bool = False, progress: bool = True,
                router_rows: str = "frequency", similarity: str = "outputs", max_cluster_size: int | None = None,
                similarity_tokens: int = 512, batch_size: int = 8,
                allow_pickle: bool = False, trust_remote_code: bool = False,
                statistics_pass: tuple | None = None) -> Path:
    """Merge each MoE layer's routed experts into `keep` experts; write the smaller checkpoint to `out`.

    The statistics pass always runs (the output similarity needs the experts' inputs); a given `se_report` only
    replaces the SE set it finds. About `similarity_tokens` tokens per layer are used for the similarity.
    `statistics_pass`: (detection report, similarity_gram) of a pass already run with this calibration (the driver
    runs its one detection pass with the gram attached), so that no second pass runs.
    """
    if se_policy not in SE_POLICIES:
        raise SECompressError(f"unknown --se-policy '{se_policy}' for merging: use singleton (each Super Expert stays "
                              f"alone) or none (the naive baseline)")
    if similarity not in SIMILARITIES:
        raise SECompressError(f"unknown --similarity '{similarity}': use {' or '.join(SIMILARITIES)}")
    if router_rows not in ROUTER_ROWS:
        raise SECompressError(f"unknown --router-rows '{router_rows}': use {' or '.join(ROUTER_ROWS)}")
    handle, model, path, ckpt, config, adapter = _open(model, allow_pickle, trust_remote_code)
    num_experts = adapter.num_experts(config)
    keep = target_count(config, num_experts, fraction, keep)
    check_output_path(path, out, force)
    if se_report is not None:
        check_se_report(se_report, config, adapter)
    if statistics_pass is not None:  # the driver's detection pass carried the similarity (same calibration)
        pass_report, gram = statistics_pass
    else:
        gram = similarity_gram(handle, samples, seed, batch_size, similarity_tokens)
        try:
            pass_report = detect(handle, calib=calib, samples=samples, seqlen=seqlen, seed=seed, batch_size=batch_size,
                                 progress=progress, layer_hook=gram)
        finally:
            gram.close()
    report = se_report if se_report is not None else pass_report
    se_source = "given (--se-report)" if se_report is not None else "detection run by this command (same pass)"
    ses = super_experts_by_layer(report)
    groups = expert_groups(config)

    mixes, layers, merged_ses = {}, [], []
    for i in _moe_layers(config, adapter):
        counts = expert_statistics(pass_report, i, num_experts)["count"]
        distance = gram.cosine_distance(i, similarity)
        routed_ses = {e for e in ses.get(i, set()) if e != "shared"}
        clusters = plan_clusters(distance, routed_ses, keep, groups, se_policy == "singleton", i, max_cluster_size)
        expert_mix, router_mix = mixing_matrices(clusters, counts, router_rows)
        mixes[i] = (expert_mix, router_mix)
        entries = []
        for j, members in enumerate(clusters):
            pair_d = [distance[a, b] for a in members for b in members if a < b]
            if len(members) == 1:
                why = "a Super Expert, kept alone (--se-policy singleton)" if members[0] in routed_ses else "alone"
            else:
                why = f"outputs alike: mean cosine distance {np.mean(pair_d):.3g} between members"
                for e in set(members) & routed_ses:
                    merged_ses.append({"layer": i, "expert": e, "merged_with": [m for m in members if m != e]})
                    why += f"; holds Super Expert {e} (--se-policy none)"
            entries.append({"expert": j, "members": members, "weights": expert_mix[j, members].tolist(),
                            "counts": [int(counts[e]) for e in members],
                            "mean_distance": float(np.mean(pair_d)) if pair_d else 0.0, "why": why})
        layers.append({"layer": i, "clusters": entries, "similarity_tokens": gram.tokens.get(i, 0)})

    new_config = copy.deepcopy(config)
    adapter.set_num_experts(new_config, keep)
    ses_list = [(s["layer"], s["expert"]) for s in report["super_experts"]]
    compression = {
        "method": "merge", "model": model, "architecture": config.model_type, "se_policy": se_policy,
        "experts_before": num_experts, "experts_after": keep, "fraction": fraction, "keep": keep, "groups": groups,
        "num_experts_per_tok": int(config.num_experts_per_tok),
        "similarity": {"mean": "cosine of the experts' mean outputs (HC-SMoE's feature)",
                       "outputs": "cosine of the experts' flattened outputs on the same tokens"}[similarity]
                      + " (before the routing weight; every expert run on the same sampled calibration tokens)",
        "clustering": "average linkage (UPGMA) within router groups, largest cluster "
                      + ("balanced: ceil(experts / clusters)" if max_cluster_size is None else
                         "unlimited" if max_cluster_size == 0 else str(max_cluster_size)),
        "expert_weights": "routing-frequency-weighted mean of the members' weights and biases",
        "router_rows": {"frequency": "routing-frequency-weighted mean of the members' router rows (and biases)",
                        "dominant": "router row (and biases) of the most used member"}[router_rows],
        "calibration": pass_report.get("calibration"), "se_report_source": se_source,
        "super_experts": [{"layer": l, "expert": e} for l, e in ses_list], "super_experts_merged": merged_ses,
        "layers": layers, "se_report": report,
    }
    command = (f"se-compress merge {model} --out {out} --keep {keep} --se-policy {se_policy}"
               + (f" --router-rows {router_rows}" if router_rows != "frequency" else "")
               + (f" --similarity {similarity}" if similarity != "outputs" else "")
               + (f" --max-cluster-size {max_cluster_size}" if max_cluster_size is not None else "")
               + f" --calib {calib} --samples {samples} --seqlen {seqlen} --seed {seed}"
               + (" --se-report se_report.json" if se_report is not None else ""))
    summary = [
        f"Expert merging of `{model}` ({config.model_type}): {num_experts} -> {keep} routed experts in each of "
        f"{len(layers)} MoE layers by output similarity (average linkage), weights averaged by routing frequency, "
        f"SE policy `{se_policy}`" + (f", merges kept inside each of {groups} router groups" if groups > 1 else "") + ".",
        f"Super Experts: {', '.join(f'({l},{e})' for l, e in ses_list) or 'none found'}; merged with others: "
        f"{', '.join('({layer},{expert})'.format(**m) for m in merged_ses) or 'none'}.",
        f"Merged experts are numbered 0..{keep - 1}; `{REPORT_NAME}` lists each one's original members.",
    ]
    card = model_card(model, f"{Path(out).name}: {model} merged to {keep} of {num_experts} experts", summary, command,
                      ["expert-merging"])
    sm = StreamedModel(ckpt, placement=host_placement())  # surgery only: weights are edited and written, never run
    edit = lambda i, layer: mix_experts(adapter, layer, *mixes[i]) if i in mixes else None  # noqa: E731
    return write_edited_checkpoint(sm, ckpt, out, new_config, edit, {REPORT_NAME: dump_report(compression),
                                                                     "README.md": card}, force, progress)
