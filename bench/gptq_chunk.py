"""How many same-shaped GPTQ problems to solve at once: batched vs one at a time, by matrix size.

    python bench/gptq_chunk.py --device cpu --threads 1

For W [rows, cols] with its own Hessian (an expert's down_proj), solves `count` problems with
gptq_quantize_batched in chunks of B (B = 1: one at a time) and reports seconds per matrix. The batched
solver does each column step on [B, rows] at once: that saves Python and kernel-launch overhead per column
(small rows; a GPU) but makes the block [B, rows, 128] of the in-block updates B times larger, which on a CPU
falls out of the cache once B x rows x 128 x 4 bytes passes the cache size. quant/gptq.py's solve_chunk picks
B from this. Results: bench/results/gptq_chunk.md/.json.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def measure(rows: int, cols: int, count: int, chunk: int, device) -> float:
    from se_compress.quant.gptq import gptq_quantize_batched, prepare_hessians
    from se_compress.quant.rtn import QuantSpec

    g = torch.Generator(device=device).manual_seed(0)
    W = torch.randn(count, rows, cols, generator=g, device=device) * 0.02
    X = torch.randn(count, 2 * cols, cols, generator=g, device=device)
    H = X.transpose(1, 2) @ X / X.shape[1]
    spec = QuantSpec(4, 128, True)
    prepared = [prepare_hessians(H[c: c + chunk]) for c in range(0, count, chunk)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    for k, c in enumerate(range(0, count, chunk)):
        gptq_quantize_batched(W[c: c + chunk], prepared[k], spec)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t) / count


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--rows", default="32,256,2048", help="matrix rows (outputs) to try")
    p.add_argument("--cols", type=int, default=512)
    p.add_argument("--chunks", default="1,4,16")
    p.add_argument("--count", type=int, default=16, help="problems per measure")
    p.add_argument("--out", default=str(REPO / "bench/results"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    chunks = [int(c) for c in args.chunks.split(",")]
    rows_list = [int(r) for r in args.rows.split(",")]
    table = []
    for rows in rows_list:
        per = {}
        for _ in range(2):  # alternated twice, best of each: the machine is shared
            for chunk in chunks:
                s = measure(rows, args.cols, args.count, chunk, device)
                per[chunk] = min(per.get(chunk, s), s)
        table.append({"rows": rows, "cols": args.cols, "seconds_per_matrix": per})
        print(rows, per, flush=True)
    results = {"command": "python " + " ".join(sys.argv), "device": str(device), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": table}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if device.type == "cpu" else "_cuda"
    (out / f"gptq_chunk{suffix}.json").write_text(json.dumps(results, indent=2))
    lines = [f"# GPTQ: batched vs one at a time ({device}, {torch.get_num_threads()} thread(s), {results['when']})", "",
             f"Command: `{results['command']}`", "",
             f"Seconds per matrix [rows x {args.cols}] (own Hessian, W4 g128), {args.count} matrices solved in chunks "
             "of B (B = 1: one at a time); best of two alternated runs.", "",
             "| rows | " + " | ".join(f"B = {c}" for c in chunks) + " | fastest |",
             "|---|" + "---|" * (len(chunks) + 1)]
    for r in table:
        per = r["seconds_per_matrix"]
        best = min(per, key=per.get)
        lines.append(f"| {r['rows']} | " + " | ".join(f"{per[c]:.4f}" for c in chunks) + f" | B = {best} |")
    (out / f"gptq_chunk{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
