"""Paired bootstrap intervals for perplexity ratios: is model B really worse (or better) than model A on this text,
or is the difference noise of which windows were measured?

Both models are evaluated on the same W windows of T predicted tokens each; n_a[w], n_b[w] are their summed NLLs
on window w. The ratio of perplexities over any set S of windows is

    r(S) = ppl_B(S) / ppl_A(S) = exp( sum_{w in S} (n_b[w] - n_a[w]) / (|S| T) )

The bootstrap draws S* = W windows with replacement, the SAME indices for both models (paired: what varies between
windows, how hard the text is there, cancels in the difference), `draws` times from a seeded generator; the 95%
interval is the 2.5th and 97.5th percentiles of r(S*) (percentile bootstrap). The point estimate is r over all
windows. A difference is marked when the interval excludes 1.

Known cases (tests): a constant per-token shift c on every window gives [e^c, e^c]; two windows with per-token
differences d1 < d2 give [e^d1, e^d2] (each extreme has probability 1/4 per draw).
"""
import math

import torch

DRAWS = 2000
SEED = 0
LEVEL = 0.95


def paired_bootstrap_ratio(nll_a, nll_b, tokens_per_window: int, draws: int = DRAWS, seed: int = SEED,
                           level: float = LEVEL) -> dict:
    """ppl_B / ppl_A with its paired percentile-bootstrap interval over windows."""
    a = torch.as_tensor(nll_a, dtype=torch.float64)
    b = torch.as_tensor(nll_b, dtype=torch.float64)
    if a.shape != b.shape or a.ndim != 1 or a.numel() == 0:
        raise ValueError(f"paired windows needed: got {tuple(a.shape)} and {tuple(b.shape)} window NLLs")
    per_token = (b - a) / tokens_per_window                       # [W] log ratio contributed by each window
    windows = per_token.numel()
    picks = torch.randint(windows, (draws, windows), generator=torch.Generator().manual_seed(seed))
    resampled = per_token[picks].mean(dim=1)                       # [draws] mean log ratio of each resample
    tail = (1 - level) / 2
    low, high = torch.quantile(resampled, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    ratio = math.exp(per_token.mean().item())
    low, high = math.exp(low), math.exp(high)
    return {"ratio": ratio, "low": low, "high": high, "excludes_one": low > 1 or high < 1, "level": level,
            "draws": draws, "seed": seed, "windows": windows}


def ratio_between(result_a: dict, result_b: dict, text: str) -> dict | None:
    """The interval of ppl_B / ppl_A on `text` from two eval.json dicts; None when either lacks per-window NLLs or
    they measured different windows."""
    pa = (result_a.get("perplexity") or {}).get(text) or {}
    pb = (result_b.get("perplexity") or {}).get(text) or {}
    if not pa.get("window_nll") or not pb.get("window_nll") or len(pa["window_nll"]) != len(pb["window_nll"]) \
            or pa.get("seqlen") != pb.get("seqlen") or pa.get("window_ids_sha1") != pb.get("window_ids_sha1"):
        return None
    return paired_bootstrap_ratio(pa["window_nll"], pb["window_nll"], pa["tokens"] // len(pa["window_nll"]))


def format_ratio(interval: dict | None, ratio: float | None = None) -> str:
    """'x1.007 [0.998, 1.016]', with ' *' when the interval excludes 1; the bare ratio when there is no interval."""
    if interval is None:
        return f"x{ratio:.3f}" if ratio else "-"
    mark = " *" if interval["excludes_one"] else ""
    return f"x{interval['ratio']:.3f} [{interval['low']:.3f}, {interval['high']:.3f}]{mark}"


MARK_NOTE = ("x ratio [95% paired bootstrap interval over windows]; * the interval excludes 1: a difference, not "
             "noise of which windows were measured")


def intervals_between(result_a: dict, result_b: dict) -> dict:
    """{text: interval of ppl_B / ppl_A} for every text both eval.json dicts measured on the same windows."""
    texts = set(result_a.get("perplexity") or {}) & set(result_b.get("perplexity") or {})
    return {t: iv for t in sorted(texts) if (iv := ratio_between(result_a, result_b, t)) is not None}


def pair_lines(rows: list[dict], texts: list[str]) -> list[str]:
    """Markdown lines comparing each row with the rows it names in `baselines` (a recipe and its naive twin),
    paired on the same windows."""
    by_name = {r["recipe"]: r for r in rows}
    lines = []
    for row in rows:
        for other in row.get("baselines") or []:
            if other not in by_name:
                continue
            cells = []
            for text in texts:
                iv = ratio_between(by_name[other], row, text)
                cells.append(f"{text} {format_ratio(iv)}" if iv else f"{text} - (no per-window NLLs)")
            lines.append(f"- {row['recipe']} / {other}: " + "; ".join(cells))
    if lines:
        lines = ["Each recipe against its naive twin (perplexity ratio, " + MARK_NOTE + "):", ""] + lines + [""]
    return lines
