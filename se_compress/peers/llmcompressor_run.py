"""llm-compressor's GPTQ on our calibration tokens, run by the peer's own virtual environment's python (never
imported by se_compress: llm-compressor 0.14.0.1 pins transformers 5.17 and compressed-tensors 0.19).

    build/llmcompressor-venv/bin/python se_compress/peers/llmcompressor_run.py --model M --calib-ids ids.pt \
        --bits 4 --group-size 32 --out DIR --result result.json [--recipe se_export.yaml]

What llm-compressor is asked to do is what a user of it would write: GPTQModifier(targets="Linear", scheme
W{bits}A16 with our group size, ignore lm_head and the routers), oneshot() on the model loaded with plain
from_pretrained (it linearizes the fused experts itself, every expert calibrated: moe_calibrate_all_experts), saved
compressed. With --recipe, the recipe file (se-compress detect --export llmcompressor) replaces that modifier. The
calibration is exactly our token ids ([N, L] int64), one sample per row, no shuffling or truncation.
Writes result.json: versions, wall seconds, peak RSS, or the stage that failed and its error.
"""
import json
import os
import time
import traceback

from runner_args import parse_args, peak_rss_mib  # beside this script (never se_compress)

ROUTERS = ["lm_head", "re:.*mlp\\.gate$", "re:.*shared_expert_gate$"]


def main():
    args = parse_args("an llm-compressor recipe file instead of the plain GPTQModifier")
    result = {"tool": "llm-compressor", "bits": args.bits, "group_size": args.group_size, "recipe": args.recipe,
              "threads": os.environ.get("OMP_NUM_THREADS")}
    stage, start = "import", time.time()
    try:
        import llmcompressor
        import torch
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import GPTQModifier
        from transformers import AutoModelForCausalLM, AutoTokenizer

        result["version"] = llmcompressor.__version__
        stage = "load"
        ids = torch.load(args.calib_ids)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
        if args.recipe:
            recipe = args.recipe
        else:
            recipe = GPTQModifier(ignore=ROUTERS, config_groups={"group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": args.bits, "type": "int", "symmetric": True, "strategy": "group",
                            "group_size": args.group_size}}})
        stage = "quantize"
        t0 = time.time()
        oneshot(model=model, tokenizer=tokenizer, dataset=data, recipe=recipe, num_calibration_samples=ids.shape[0],
                max_seq_length=ids.shape[1], shuffle_calibration_samples=False, moe_calibrate_all_experts=True)
        result["quantize_seconds"] = round(time.time() - t0, 1)
        stage = "save"
        model.save_pretrained(args.out, save_compressed=True)
        tokenizer.save_pretrained(args.out)
        result.update(ok=True)
    except BaseException as exc:  # noqa: BLE001: the caller reports exactly what failed, and where
        result.update(ok=False, stage=stage, error=f"{type(exc).__name__}: {exc}"[:2000],
                      traceback=traceback.format_exc()[-4000:])
    result["wall_seconds"] = round(time.time() - start, 1)
    result["peak_rss_mib"] = peak_rss_mib()
    with open(args.result, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
