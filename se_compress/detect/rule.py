"""The Super Expert rule (paper Eq. 6) and the choice of layers it applies to.

a(l, e) = max |down_proj output| of expert e in layer l over every calibration token routed to it.
A = {a(l, e)} over the considered layers.  (l, e) is an SE iff a > quantile_q(A) and a > max(A) * max_fraction.

Considered layers ("where massive activations form"): the paper gives no numeric test, and its code keeps the
first 75% of layers (`layers="paper"`). Ours (`layers="auto"`) reads the residual stream: layer l is kept when
its output carries a massive activation, max |h| >= massive_ratio x median |h| (Sun et al. 2024 report
~1,000x; we default to 100x). An expert in a layer before any massive activation cannot be the source of one.
"""
from dataclasses import dataclass

import numpy as np


@dataclass
class Criterion:
    quantile: float = 0.995
    max_fraction: float = 0.1
    layers: str = "auto"          # auto | paper | all | comma-separated indices
    massive_ratio: float = 100.0


def massive_activation_layers(hidden_max: list[float], hidden_median: list[float], ratio: float) -> list[int]:
    return [l for l, (mx, md) in enumerate(zip(hidden_max, hidden_median)) if mx >= ratio * max(md, 1e-12)]


def considered_layers(criterion: Criterion, moe_layers: list[int], massive_layers: list[int], num_layers: int):
    """(layers, note). Falls back to every MoE layer, and says so, when no massive activation is seen."""
    if criterion.layers == "all":
        return moe_layers, "all MoE layers"
    if criterion.layers == "paper":
        cut = round(0.75 * num_layers)
        return [l for l in moe_layers if l < cut], f"paper code's rule: layers < round(0.75 x {num_layers}) = {cut}"
    if criterion.layers == "auto":
        chosen = [l for l in moe_layers if l in set(massive_layers)]
        if chosen:
            return chosen, f"layers whose output has max|h| >= {criterion.massive_ratio:g} x median|h|"
        return moe_layers, (f"no layer output reaches max|h| >= {criterion.massive_ratio:g} x median|h|: "
                            f"no massive activation seen, so every MoE layer is considered")
    chosen = sorted(int(x) for x in criterion.layers.split(","))
    return [l for l in chosen if l in moe_layers], "layers given by the user"


def select_super_experts(values: dict[tuple[int, object], float], layers: list[int], criterion: Criterion) -> dict:
    """values: (layer, expert) -> a(l, e), expert an int or 'shared'. Returns the selection and its thresholds."""
    keys = [k for k in values if k[0] in set(layers)]
    a = np.array([values[k] for k in keys], dtype=np.float64)
    if a.size == 0:
        return {"super_experts": [], "quantile_value": None, "max_value": None, "n": 0, "quantile_limited": False,
                "by_max_fraction_only": []}
    q_value = float(np.quantile(a, criterion.quantile))
    max_value = float(a.max())
    fraction_value = max_value * criterion.max_fraction
    chosen = [k for k, v in zip(keys, a) if v > q_value and v > fraction_value]
    by_fraction = [k for k, v in zip(keys, a) if v > fraction_value]
    # With N values, at most about (1 - q) * N of them can exceed the q-quantile (Mixtral's 256 experts: 1).
    max_selectable = int(np.floor((1 - criterion.quantile) * (a.size - 1))) + 1
    return {
        "super_experts": sorted(chosen, key=lambda k: -values[k]),
        "quantile_value": q_value,
        "max_value": max_value,
        "fraction_value": fraction_value,
        "n": int(a.size),
        "max_selectable_by_quantile": max_selectable,
        "quantile_limited": len(by_fraction) > len(chosen) and len(chosen) >= max_selectable,
        "by_max_fraction_only": sorted(by_fraction, key=lambda k: -values[k]),
    }
