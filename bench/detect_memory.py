"""Peak RSS of `se-compress detect` against model depth: streamed (default) vs --in-memory, side by side.

Random Qwen3-MoE checkpoints (hidden 256, 64 experts of intermediate 128, bf16 on disk: ~12.6 MB of experts
per layer) of growing depth are generated once under build/bench-depth/; each detect run is a fresh process
whose peak RSS is read from getrusage. Streamed memory must stay flat as depth grows.

    python bench/detect_memory.py            # writes bench/results/detect_memory.{md,json,png}
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WRAPPER = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
           "sys.stderr.write(r.stderr[-2000:] if r.returncode else ''); "
           "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def make_checkpoint(depth: int, out: Path, tokenizer) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from se_compress.synthetic import tiny_config

    if (out / "config.json").exists():
        return out
    torch.manual_seed(depth)
    config = tiny_config("qwen3_moe", len(tokenizer), layers=depth, experts=64, hidden=256)
    config.moe_intermediate_size, config.num_attention_heads, config.head_dim = 128, 8, 32
    config.bos_token_id = tokenizer.bos_token_id
    model = AutoModelForCausalLM.from_config(config)
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size="200MB")
    tokenizer.save_pretrained(out)
    del model
    return out


def peak_rss_mb(args: list[str]) -> tuple[float, float]:
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *args], capture_output=True, text=True)
    code, kb = proc.stdout.split()
    if code != "0":
        raise SystemExit(f"detect failed: {proc.stderr}")
    return int(kb) / 1024, time.time() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", default="4,16,64")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=128)
    args = p.parse_args()
    from transformers import AutoTokenizer

    from se_compress.default_model.train import train_tokenizer

    work = ROOT / "build" / "bench-depth"
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        train_tokenizer([ROOT / "se_compress/data/text/wikitext2-valid.txt"], 4096, tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    rows = []
    for depth in [int(d) for d in args.depths.split(",")]:
        ckpt = make_checkpoint(depth, work / f"qwen3moe-{depth}l", tokenizer)
        size_mb = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 2**20
        row = {"layers": depth, "checkpoint_mb": round(size_mb, 1)}
        for mode, extra in [("streamed", []), ("in_memory", ["--in-memory"])]:
            cmd = [sys.executable, "-m", "se_compress", "detect", str(ckpt), "--out", str(work / f"report-{depth}-{mode}"),
                   "--samples", str(args.samples), "--seqlen", str(args.seqlen), *extra]
            rss, seconds = peak_rss_mb(cmd)
            row[f"{mode}_peak_rss_mb"], row[f"{mode}_seconds"] = round(rss, 1), round(seconds, 1)
            print(json.dumps(row), flush=True)
        rows.append(row)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "detect_memory.json").write_text(json.dumps({"samples": args.samples, "seqlen": args.seqlen, "rows": rows}, indent=2))
    lines = ["# Peak RSS of `se-compress detect` vs depth", "",
             f"Random Qwen3-MoE checkpoints (hidden 256, 64 experts x intermediate 128, bf16), calibration "
             f"{args.samples} x {args.seqlen} tokens, fp32 compute, one process per run. Command: `python bench/detect_memory.py`.", "",
             "| layers | checkpoint (MB) | streamed peak RSS (MB) | in-memory peak RSS (MB) | in-memory / streamed | streamed s | in-memory s |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layers']} | {r['checkpoint_mb']} | {r['streamed_peak_rss_mb']} | {r['in_memory_peak_rss_mb']} | "
                     f"{r['in_memory_peak_rss_mb'] / r['streamed_peak_rss_mb']:.2f} | {r['streamed_seconds']} | {r['in_memory_seconds']} |")
    (out / "detect_memory.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    depths = [r["layers"] for r in rows]
    ax.plot(depths, [r["streamed_peak_rss_mb"] for r in rows], "o-", label="streamed (default)")
    ax.plot(depths, [r["in_memory_peak_rss_mb"] for r in rows], "s--", label="--in-memory")
    ax.plot(depths, [r["checkpoint_mb"] for r in rows], ":", color="gray", label="checkpoint size (bf16)")
    ax.set_xlabel("decoder layers")
    ax.set_ylabel("peak RSS (MB)")
    ax.set_title("se-compress detect: peak memory vs depth")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "detect_memory.png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
