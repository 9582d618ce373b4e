"""Ours beside the tools people use: at W4/W3/W2 g32 on the default model, our GPTQ naive and SE-aware, llm-compressor,
llm-compressor with our SE export (SE experts at 8 bits), GPTQModel; books and WikiText-2 perplexity with paired
bootstrap intervals against the base, size, wall time (and its ratio to our SE-aware run), peak RSS.

    python bench/peers_table.py --bits 4,3,2          # make bench-peers (after make peers)

Each recipe is run by `se-compress compress --recipe R --no-eval` in a child process, one after the other in this
run, and its wall time and peak RSS taken from os.wait4. Peer runs are cached (checkpoints/.peers, see
se_compress/peers): a cached peer keeps the seconds and peak RSS measured when it ran (peer.json), and the table
says when that was. Then `compare` evaluates every checkpoint with the same windows (perplexity only here) and the
table is built from compare.json and the timing file this script writes. Rows that were not run say so.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
KINDS = [("qwen3-int{b}-naive", "ours, naive"), ("qwen3-int{b}-se-protect", "ours, SE-aware (noclip+calib)"),
         ("peer-llmcompressor-int{b}", "llm-compressor"), ("peer-llmcompressor-int{b}-se-int8", "llm-compressor + our SE export"),
         ("peer-gptqmodel-int{b}", "GPTQModel")]
RUN_ORDER = [0, 1, 2, 4, 3]  # the table's order, but the SE-export run last

def run_child(cmd: list[str], log: Path) -> dict:
    start = time.time()
    with open(log, "w") as f:
        child = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(child.pid, 0)
    return {"seconds": round(time.time() - start, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "exit": os.waitstatus_to_exitcode(status), "log": str(log),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--model", default="default")
    ap.add_argument("--skip", default="", help="comma list of recipes not to run now (marked 'not run')")
    ap.add_argument("--max-windows", type=int, default=128)
    ap.add_argument("--table-only", action="store_true", help="no compression runs: evaluate what peers_timing.json "
                    "recorded as run (exit 0) and write the table")
    ap.add_argument("--no-table", action="store_true", help="compression runs only (timings recorded); build the "
                    "table later with --table-only")
    args = ap.parse_args()
    bits = [int(b) for b in args.bits.split(",")]
    skip = {s for s in args.skip.split(",") if s}
    timing_file = RESULTS / "peers_timing.json"
    timing = json.loads(timing_file.read_text()) if timing_file.exists() else {}
    logs = REPO / "logs"
    logs.mkdir(exist_ok=True)
    ran = [r for r, t in timing.items() if t.get("exit") == 0 and r not in skip] if args.table_only else []
    order = [KINDS[i] for i in RUN_ORDER]
    for b in ([] if args.table_only else bits):
        for template, _ in order:
            recipe = template.format(b=b)
            if recipe in skip:
                continue
            print(f"[bench] {recipe}", flush=True)
            result = run_child([sys.executable, "-m", "se_compress", "compress", "--recipe", recipe, "--model", args.model,
                                "--no-eval", "--force"], logs / f"bench-{recipe}.log")
            peer_json = REPO / "checkpoints" / f"{args.model}-{recipe}" / "peer.json"
            if peer_json.exists():  # the peer's own process, measured when it ran (maybe cached from an earlier run)
                peer = json.loads(peer_json.read_text())
                result.update(peer_seconds=peer["seconds"], peer_peak_rss_mib=peer["peak_rss_mib"], peer_run=peer["run"])
            timing[recipe] = result
            timing_file.write_text(json.dumps(timing, indent=2))
            if result["exit"] == 0:
                ran.append(recipe)
            print(f"  {result}", flush=True)
    if args.no_table:
        return
    sys.path.insert(0, str(REPO))
    from se_compress.driver import compare

    table = compare(ran, model=args.model, out=REPO / "checkpoints" / f"compare-{args.model}-peers",
                    tasks=["wikitext2", "books"], max_windows=args.max_windows)
    write(table, timing, bits, skip)


def _interval(row, text):
    iv = (row.get("vs_base") or {}).get(text)
    if not iv:
        return "-"
    return f"x{iv['ratio']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}]{' *' if iv['excludes_one'] else ''}"


def write(table: dict, timing: dict, bits: list[int], skip: set) -> None:
    rows = {r["recipe"]: r for r in table["rows"]}
    base = rows["base"]
    head = ["bits", "method", "books ppl", "books vs base", "WikiText-2 ppl", "WikiText-2 vs base", "size (MiB)",
            "time (s)", "time / ours SE-aware", "peak RSS (MiB)"]
    lines = ["# Ours beside llm-compressor and GPTQModel on the default model", "",
             f"base: books {base['metrics']['books_ppl']:.2f}, WikiText-2 {base['metrics']['wikitext2_ppl']:.2f}; "
             f"first {table['evaluate']['max_windows']} windows of 512 of each text; x ratio [95% paired bootstrap "
             f"interval over windows], * the interval excludes 1.", "",
             "| " + " | ".join(head) + " |", "|---:|---|" + "---:|" * (len(head) - 2)]
    out_rows = []
    for b in bits:
        ours = timing.get(f"qwen3-int{b}-se-protect") or {}
        for template, label in KINDS:
            recipe = template.format(b=b)
            row, t = rows.get(recipe), timing.get(recipe) or {}
            if row is None:
                why = "not run (skipped in this session)" if recipe in skip else f"not run ({t.get('log', 'no run')})"
                lines.append(f"| W{b} | {label} | {why} |" + " |" * (len(head) - 3))
                out_rows.append({"recipe": recipe, "bits": b, "method": label, "run": False})
                continue
            seconds = t.get("peer_seconds", t.get("seconds"))
            rss = t.get("peer_peak_rss_mib", t.get("peak_rss_mib"))
            ratio = seconds / ours["seconds"] if seconds and ours.get("seconds") else None
            lines.append(f"| W{b} | {label} | {row['metrics']['books_ppl']:.2f} | {_interval(row, 'books')} | "
                         f"{row['metrics']['wikitext2_ppl']:.2f} | {_interval(row, 'wikitext2')} | {row['size_mb']:.1f} | "
                         f"{seconds:.0f} | {'-' if ratio is None else f'{ratio:.1f}x'} | {rss:.0f} |")
            out_rows.append({"recipe": recipe, "bits": b, "method": label, "run": True, "books_ppl": row["metrics"]["books_ppl"],
                             "wikitext2_ppl": row["metrics"]["wikitext2_ppl"], "vs_base": row.get("vs_base"),
                             "size_mb": row["size_mb"], "seconds": seconds, "time_ratio_to_ours": ratio,
                             "peak_rss_mib": rss, "timing": t})
    lines += ["", "time: wall seconds of `se-compress compress --no-eval` for ours (detection is cached per model); for a "
              "peer, its own process's wall time and peak RSS (peer.json, measured when the peer ran; cached runs are "
              "reused: see `timing` in peers_default.json for when each was measured). GPTQModel's output is "
              "dequantized by GPTQModel itself into a dense copy for our evaluator; its size column is that dense copy "
              "(the GPTQ size is in peer.json).", ""]

    RESULTS.joinpath("peers_default.md").write_text("\n".join(lines) + "\n")
    RESULTS.joinpath("peers_default.json").write_text(json.dumps({"rows": out_rows, "base": base["metrics"],
                                                                   "evaluate": table["evaluate"]}, indent=2))
    plot(out_rows, base, RESULTS / "peers_default.png")
    print("\n".join(lines))


def plot(rows, base, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = [label for _, label in KINDS]
    for i, label in enumerate(labels):
        pts = [(r["bits"], r) for r in rows if r["method"] == label and r["run"]]
        if not pts:
            continue
        x = [b + (i - 2) * 0.08 for b, _ in pts]
        y = [r["vs_base"]["books"]["ratio"] for _, r in pts]
        lo = [r["vs_base"]["books"]["ratio"] - r["vs_base"]["books"]["low"] for _, r in pts]
        hi = [r["vs_base"]["books"]["high"] - r["vs_base"]["books"]["ratio"] for _, r in pts]
        ax.errorbar(x, y, yerr=[lo, hi], fmt="o", capsize=3, label=label)
    ax.axhline(1, color="black", linestyle=":", linewidth=1)
    ax.set_xlabel("weight bits (g32)")
    ax.set_ylabel("books perplexity / base (95% paired bootstrap)")
    ax.set_xticks(sorted({r["bits"] for r in rows}))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
