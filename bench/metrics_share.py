"""The quantization report's output errors against the GPTQ solve, on Qwen3-30B-A3B's expert matrix shapes.

For each matrix shape (one expert's gate_up [2 x 768, 2048] with the layer's shared input Hessian, its down_proj
[2048, 768] with its own), one process, one thread: the time of prepare + GPTQ, and the time of the report's
metrics as the engine computes them (quant/engine.py LayerQuantizer._finish: output error of GPTQ and of RTN on the
rows rtn.metric_rows picks), and, for comparison, the same metrics on every row (what main computed). Random
weights and a Hessian from random correlated inputs; W4 g128 symmetric, no clip search (clip search only makes the
RTN comparison dearer, on the sampled rows as on all of them).

    python bench/metrics_share.py --out bench/results/metrics_share.json
"""
import argparse
import json
import time
from pathlib import Path

import torch

from se_compress.quant.gptq import gptq_quantize, prepare_hessian
from se_compress.quant.rtn import QuantSpec, metric_rows, output_error, rtn_quantize

SHAPES = {"qwen3-30b-a3b expert gate_up": (1536, 2048), "qwen3-30b-a3b expert down_proj": (2048, 768)}


def metrics(W, W_hat, H, spec, rows):
    rtn = rtn_quantize(W[rows], spec, torch.float32).dequantize().float()
    return output_error(W[rows], W_hat[rows], H), output_error(W[rows], rtn, H)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    spec, rows_out = QuantSpec(4, 128, True), []
    for name, (O, I) in SHAPES.items():
        W = torch.randn(O, I) * 0.02
        X = torch.randn(args.tokens, I) @ (torch.eye(I) + 0.1 * torch.randn(I, I))
        H = (X.T @ X) / args.tokens
        best = {"gptq": 1e9, "sampled": 1e9, "all_rows": 1e9}
        for _ in range(args.repeats):
            t = time.perf_counter()
            qt = gptq_quantize(W.clone(), prepare_hessian(H), spec, torch.float32)
            best["gptq"] = min(best["gptq"], time.perf_counter() - t)
            W_hat = qt.dequantize().float()
            t = time.perf_counter()
            sampled = metrics(W, W_hat, H, spec, metric_rows(O))
            best["sampled"] = min(best["sampled"], time.perf_counter() - t)
            t = time.perf_counter()
            full = metrics(W, W_hat, H, spec, slice(None))
            best["all_rows"] = min(best["all_rows"], time.perf_counter() - t)
        rows_out.append({"matrix": name, "shape": [O, I], "gptq_s": best["gptq"], "metrics_sampled_s": best["sampled"],
                         "metrics_all_rows_s": best["all_rows"], "share_sampled": best["sampled"] / best["gptq"],
                         "share_all_rows": best["all_rows"] / best["gptq"],
                         "output_error_sampled": sampled[0], "output_error_all_rows": full[0],
                         "rtn_output_error_sampled": sampled[1], "rtn_output_error_all_rows": full[1]})
        print(json.dumps(rows_out[-1]), flush=True)
    Path(args.out).write_text(json.dumps({"threads": 1, "tokens": args.tokens, "rows": rows_out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
