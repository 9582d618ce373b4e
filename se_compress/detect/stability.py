"""Does the SE set depend on the calibration? Repeat detection over seeds, both shipped calibration sets and
shrinking token budgets; report whether the set changes and the smallest budget that already gives it.
(The paper's code spends 256 x 2048 tokens.)"""
import json
from pathlib import Path


def _se_set(report) -> list:
    return sorted([s["layer"], s["expert"] if isinstance(s["expert"], int) else -1] for s in report["super_experts"])


def run_stability(model: str, out: Path, base_calib: str, samples: int, seqlen: int, criterion, seeds=(0, 1, 2),
                  calibs=("wikitext2", "c4"), fractions=(1, 2, 4, 8, 16), **kwargs) -> dict:
    from . import detect

    runs = []
    reference = None
    for calib in calibs:
        for seed in seeds:
            report = detect(model, calib=calib, samples=samples, seqlen=seqlen, seed=seed, criterion=criterion,
                            progress=False, **kwargs)
            runs.append({"calib": calib, "seed": seed, "samples": samples, "seqlen": seqlen,
                         "tokens": samples * seqlen, "se": _se_set(report)})
            if calib == base_calib and seed == seeds[0]:
                reference = runs[-1]["se"]
    if reference is None:
        reference = runs[0]["se"]
    budget_runs = []
    for divisor in fractions:
        n = max(1, samples // divisor)
        if divisor > 1 and n == samples:
            continue
        report = detect(model, calib=base_calib, samples=n, seqlen=seqlen, seed=seeds[0], criterion=criterion,
                        progress=False, **kwargs)
        budget_runs.append({"calib": base_calib, "seed": seeds[0], "samples": n, "seqlen": seqlen, "tokens": n * seqlen,
                            "se": _se_set(report)})
        if n == 1:
            break
    stable = all(r["se"] == reference for r in runs)
    smallest = None
    for r in sorted(budget_runs, key=lambda r: -r["tokens"]):
        if r["se"] != reference:
            break
        smallest = r["tokens"]
    result = {"reference_se": reference, "stable": stable, "smallest_full_budget": smallest,
              "runs": runs, "budget_runs": budget_runs}
    lines = ["# SE stability", "", f"Reference set (calibration {base_calib}, seed {seeds[0]}, {samples} x {seqlen}): "
             f"{reference} (expert -1 = shared).", "",
             f"Across seeds {list(seeds)} and calibration sets {list(calibs)}: **{'stable' if stable else 'changes'}**.",
             f"Smallest budget that still gives the reference set: **{smallest} tokens**.", "",
             "| calibration | seed | samples x seqlen | tokens | SEs (layer, expert) | same |", "|---|---:|---|---:|---|---|"]
    for r in runs + budget_runs:
        lines.append(f"| {r['calib']} | {r['seed']} | {r['samples']} x {r['seqlen']} | {r['tokens']} | {r['se']} | "
                     f"{'yes' if r['se'] == reference else 'NO'} |")
    from ..output import write_files_into

    write_files_into(Path(out), {"stability.json": json.dumps(result, indent=2), "stability.md": "\n".join(lines) + "\n"})
    return result
