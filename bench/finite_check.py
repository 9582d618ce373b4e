"""What the NaN/Inf checks cost (models/finite.py): the weight check against reading the weights, the activation check
against running a layer.

    python bench/finite_check.py --threads 1      # ~1 minute; results in bench/results/finite_check.md/.json

1. Weights: every tensor of the shipped default model read through Checkpoint.get (safetensors, page cache warm),
   once with the check and once without it (the check switched off in this process only), best of --repeats.
2. Real shapes: the check (finite.all_finite: torch.aminmax, one pass) on one Qwen3-30B-A3B MoE layer's routed experts in bf16 (128 experts x
   (2 x 768 x 2048 + 2048 x 768) = 604 M values, 1.13 GiB) against copying the same tensor once (what reading it from
   the page cache costs at least): the check is one more pass over memory.
3. Activations: the check on one layer's output (--tokens x hidden 2048, fp32) against the default model's decoder
   layer time for as many tokens, from the detect pass on the shipped model.
"""
import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def best(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=2048, help="calibration tokens for the activation check")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "finite_check")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from se_compress.models import checkpoint as checkpoint_module
    from se_compress.models.checkpoint import DEFAULT_MODEL_DIR, Checkpoint
    from se_compress.models.finite import check_activations, check_weight

    ckpt = Checkpoint(DEFAULT_MODEL_DIR)
    names = sorted(ckpt.weight_map)
    values = sum(ckpt.get(n).numel() for n in names)  # also warms the page cache

    def read_all():
        ckpt.release()
        for n in names:
            ckpt.get(n)

    with_check = best(read_all, args.repeats)
    checkpoint_module.check_weight = lambda tensor, name, shard: tensor  # this process only: the reader unchecked
    without_check = best(read_all, args.repeats)
    checkpoint_module.check_weight = check_weight

    experts = torch.randn(128 * 3 * 2048 * 768, dtype=torch.bfloat16)
    check_big = best(lambda: check_weight(experts, "experts", "bench"), args.repeats)
    isfinite_big = best(lambda: bool(torch.isfinite(experts).all()), 2)  # the obvious way, for comparison
    copy_big = best(lambda: experts.clone(), args.repeats)
    del experts

    hidden = torch.randn(args.tokens, 2048)
    check_act = best(lambda: check_activations(hidden, 0), args.repeats)

    result = {
        "command": f"python bench/finite_check.py --threads {args.threads} --repeats {args.repeats} --tokens {args.tokens}",
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)",
        "default_model": {"tensors": len(names), "values": values, "read_s_with_check": round(with_check, 4),
                          "read_s_without_check": round(without_check, 4),
                          "overhead": round(with_check / without_check - 1, 3)},
        "qwen3_30b_a3b_layer_experts_bf16": {"values": 128 * 3 * 2048 * 768, "check_s": round(check_big, 3),
                                             "clone_s": round(copy_big, 3), "isfinite_all_s": round(isfinite_big, 3), "check_over_clone": round(check_big / copy_big, 2)},
        "activations_fp32": {"tokens": args.tokens, "hidden": 2048, "check_s": round(check_act, 5)},
    }
    d, q, a = result["default_model"], result["qwen3_30b_a3b_layer_experts_bf16"], result["activations_fp32"]
    lines = ["# Cost of the NaN/Inf checks (models/finite.py)", "", f"Command: `{result['command']}`", "",
             f"Machine: {result['machine']}; best of {args.repeats}.", "",
             "| measure | with the check | without | note |", "|---|---:|---:|---|",
             f"| read every tensor of the default model ({d['tensors']} tensors, {d['values'] / 1e6:.1f} M values) "
             f"| {d['read_s_with_check']:.3f} s | {d['read_s_without_check']:.3f} s | {d['overhead']:+.0%} |",
             f"| the check on one Qwen3-30B-A3B layer's experts, bf16 ({q['values'] / 1e6:.0f} M values) | "
             f"{q['check_s']:.2f} s | clone {q['clone_s']:.2f} s | {q['check_over_clone']:.2f}x one copy; "
             f"`isfinite(t).all()` took {q['isfinite_all_s']:.2f} s |",
             f"| the check on one layer's output, {a['tokens']} tokens x 2048 fp32 | {a['check_s'] * 1e3:.1f} ms | | |",
             "",
             "- safetensors hands out memory-mapped tensors: in the first row the check is the first touch of their "
             "pages, so part of its time is reading from the page cache, which the layer's forward does anyway. "
             f"Per tensor it is {(d['read_s_with_check'] - d['read_s_without_check']) / d['tensors'] * 1e6:.0f} us; the "
             f"default model's {d['tensors']:,} small tensors make it visible, against a detect pass of tens of seconds.",
             "- Real shapes: the check reads the 1.13 GiB of a Qwen3-30B-A3B layer's experts once, in less time than "
             "one copy of them, against ~28 s per layer for detection on this CPU (bench/results/scale.md).",
             ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
