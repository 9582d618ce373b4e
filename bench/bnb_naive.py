"""bitsandbytes as the naive baseline that looks quantized but is not, on an MoE in transformers 5.

bitsandbytes replaces nn.Linear modules with its 4-bit Linear. transformers 5 keeps the routed experts as fused
3-D parameters (no per-expert nn.Linear), so `load_in_4bit=True` quantizes attention and leaves every expert, the
bulk of an MoE, in bf16. This script loads the model both ways and measures where the bytes are, and WikiText-2
perplexity beside se_compress's own 4-bit checkpoint (RTN W4 g128, which does quantize the experts).

    python bench/bnb_naive.py --setup     # pip install bitsandbytes into build/bnb (never a dependency)
    python bench/bnb_naive.py             # writes bench/results/bnb_naive.md and .json
"""
import argparse
import collections
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
BNB = REPO / "build" / "bnb"
RESULTS = REPO / "bench" / "results"


def bytes_by_kind(model) -> dict:
    """{(module kind, dtype): bytes} over parameters; kind: routed experts, attention or other."""
    out = collections.Counter()
    for name, p in model.named_parameters():
        kind = "routed experts" if ".experts." in name else ("attention" if "self_attn" in name else "other")
        out[f"{kind} | {str(p.dtype).split('.')[-1]}"] += p.numel() * p.element_size()
    return dict(sorted(out.items()))


def expert_levels(model, group: int = 128) -> int:
    """Most distinct values in one row group of the experts' down_proj: <= 2^bits when they were quantized."""
    down = model.model.layers[0].mlp.experts.down_proj.detach().float()
    rows = down.reshape(-1, down.shape[-1])
    return max(len(torch.unique(chunk)) for row in rows[:256] for chunk in row.split(group))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", action="store_true")
    ap.add_argument("--model", default="default")
    ap.add_argument("--windows", type=int, default=64)
    args = ap.parse_args(argv)
    if args.setup:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(BNB), "bitsandbytes"], check=True)
        return
    sys.path.insert(0, str(BNB))
    import bitsandbytes
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from se_compress.detect import load_tokenizer
    from se_compress.eval.perplexity import eval_windows, perplexity_in_memory, wikitext2_test_text
    from se_compress.models.checkpoint import resolve_model
    from se_compress.quant import quantize_model

    path = resolve_model(args.model)
    windows = eval_windows(load_tokenizer(path), wikitext2_test_text(), 256, args.windows)
    rows = []
    bf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    rows.append({"how": "bf16 (original)", "bytes": bytes_by_kind(bf16), "levels": expert_levels(bf16),
                 "ppl": perplexity_in_memory(bf16.float(), windows)["ppl"]})
    del bf16
    bnb = AutoModelForCausalLM.from_pretrained(
        path, device_map="cpu", quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)).eval()
    rows.append({"how": f"bitsandbytes {bitsandbytes.__version__} load_in_4bit (nf4)", "bytes": bytes_by_kind(bnb),
                 "levels": expert_levels(bnb),
                 "ppl": perplexity_in_memory(bnb, windows)["ppl"]})
    del bnb
    with tempfile.TemporaryDirectory() as tmp:
        out = quantize_model(args.model, Path(tmp) / "w4", method="rtn", bits=4, group_size=128, se_policy="noclip",
                             progress=False)
        in_memory = bytes_by_kind(AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16))
        ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        rows.append({"how": "se_compress RTN W4 g128 noclip (compressed-tensors, loaded by transformers)",
                     "bytes": in_memory, "ppl": perplexity_in_memory(ours, windows)["ppl"], "levels": expert_levels(ours),
                     "note": "transformers dequantizes compressed-tensors experts to bf16 at load: in memory 16 bit, "
                             "on disk 4 bit; vLLM keeps them packed"})
        ours_disk = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    result = {"model": args.model, "windows": int(windows.shape[0]), "rows": rows, "se_compress_w4_disk_bytes": ours_disk,
              "command": "python bench/bnb_naive.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bnb_naive.json").write_text(json.dumps(result, indent=2))
    lines = [f"# bitsandbytes 4-bit on an MoE: what it leaves in 16 bit ({args.model})", "",
             f"Command: `{result['command']}`. WikiText-2 test, {result['windows']} windows of 256 tokens.", "",
             "| loaded as | routed experts in memory | attention in memory | distinct values per group of an expert row | perplexity |",
             "|---|---|---|---:|---:|"]
    for r in rows:
        b = r["bytes"]
        experts = {k.split(" | ")[1]: v for k, v in b.items() if k.startswith("routed experts")}
        attn = {k.split(" | ")[1]: v for k, v in b.items() if k.startswith("attention")}
        lines.append(f"| {r['how']} | " + ", ".join(f"{v / 2**20:.2f} MiB {k}" for k, v in experts.items()) + " | "
                     + ", ".join(f"{v / 2**20:.2f} MiB {k}" for k, v in attn.items())
                     + f" | {r['levels']} | {r['ppl']:.2f} |")
    lines += ["", "bitsandbytes quantizes `nn.Linear` only: attention becomes packed 4-bit (`uint8` storage), the fused "
              "routed experts (transformers 5 has no per-expert Linear) stay bf16, so the model looks quantized and "
              "its perplexity barely moves because the experts, most of its weights, were never touched (their rows keep "
              "every distinct value; a 4-bit expert has at most 16 per group). "
              f"se_compress's W4 checkpoint stores the experts in 4 bit on disk ({ours_disk / 2**20:.1f} MiB in all); "
              "transformers dequantizes them to bf16 at load, vLLM runs them packed.", ""]
    (RESULTS / "bnb_naive.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
