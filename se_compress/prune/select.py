"""Which experts a layer keeps: the pruning decision, one small function per step."""
import numpy as np

from ..errors import SECompressError

CRITERIA = ("frequency", "reap", "ean", "random")
SE_POLICIES = ("protect", "none")


def saliency(criterion: str, stats: dict[str, np.ndarray], layer: int, seed: int) -> np.ndarray:
    """Score per routed expert [E]; higher = more worth keeping. All but `random` come from the real-routing pass.

    frequency: tokens routed to the expert; reap: mean over its tokens of routing weight x ||output|| (REAP);
    ean: summed ||output|| over its tokens; random: a seeded uniform draw per (seed, layer).
    """
    if criterion == "frequency":
        return stats["count"].astype(float)
    if criterion == "reap":
        return stats["reap"].astype(float)
    if criterion == "ean":
        return stats["ean"].astype(float)
    if criterion == "random":
        return np.random.default_rng([seed, layer]).random(len(stats["count"]))
    raise SECompressError(f"unknown criterion '{criterion}': use one of {', '.join(CRITERIA)}")


def choose_kept(score: np.ndarray, super_experts: set[int], keep: int, groups: int, protect: bool,
                layer: int) -> tuple[list[int], list[int]]:
    """Experts to keep (ascending original index) and the SEs that only `protect` saved.

    Groups are contiguous equal blocks (DeepSeek group-limited routing; 1 group otherwise): each keeps
    keep/groups experts, so the group structure survives. Inside a group the highest scores stay; ties go to the
    lower index. With `protect` an SE is never removed: it is kept first and the cut moves to the next candidate.
    """
    num_experts = len(score)
    size, per_group = num_experts // groups, keep // groups
    kept, saved = [], []
    for g in range(groups):
        ranked = sorted(range(g * size, (g + 1) * size), key=lambda e: (-score[e], e))
        if protect:
            ses = [e for e in ranked if e in super_experts]
            if len(ses) > per_group:
                where = f"group {g} of layer {layer}" if groups > 1 else f"layer {layer}"
                raise SECompressError(f"{where} has {len(ses)} Super Experts but keeps only {per_group} experts: keep "
                                      f"more experts, or use --se-policy none to allow removing Super Experts")
            saved += [e for e in ses if e not in ranked[:per_group]]
            ranked = ses + [e for e in ranked if e not in super_experts]
        kept += ranked[:per_group]
    return sorted(kept), sorted(saved)
