"""GPTQModel baseline for bench/quant.py, run in its own virtual environment (build/gptqmodel-venv: GPTQModel is
never a dependency of se_compress). Same model, same calibration token ids, same perplexity windows and NLL
convention as bench/quant.py; writes a JSON result (or the error, stated exactly).

    build/gptqmodel-venv/bin/python bench/gptqmodel_run.py --model M --calib-ids c.pt --windows w.pt \
        --bits 4 --group-size 128 --out DIR --result r.json
"""
import argparse
import json
import math
import os
import time
import traceback

import torch
import torch.nn.functional as F


def perplexity(model, windows, batch_size=8):
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch_size):
            batch = windows[i: i + batch_size]
            logits = model(input_ids=batch, use_cache=False).logits
            total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1),
                                     reduction="sum").item()
            count += batch[:, 1:].numel()
    return math.exp(total / count)


def main():
    ap = argparse.ArgumentParser()
    for name in ("--model", "--calib-ids", "--windows", "--out", "--result"):
        ap.add_argument(name, required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    result = {"tool": "GPTQModel", "bits": args.bits, "group_size": args.group_size,
              "cpu_workers": os.environ.get("GPTQMODEL_CPU_WORKERS")}
    stage = "import"
    try:
        import gptqmodel
        from gptqmodel import GPTQModel, QuantizeConfig

        result["version"] = gptqmodel.__version__
        calib = torch.load(args.calib_ids)
        windows = torch.load(args.windows)
        stage = "load"
        qcfg = QuantizeConfig(bits=args.bits, group_size=args.group_size, sym=True, desc_act=False)
        start = time.time()
        model = GPTQModel.load(args.model, qcfg, device="cpu")
        stage = "quantize"
        data = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in calib]
        model.quantize(data, batch_size=args.batch_size)
        result["quantize_seconds"] = round(time.time() - start, 2)
        stage = "save"
        model.save(args.out)
        result["size_bytes"] = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out)
                                   if f.endswith(".safetensors"))
        del model
        stage = "reload"
        from gptqmodel.utils.backend import BACKEND

        # the plain torch dequantizing kernel: the CPU int4pack kernel (AUTO's pick) needs in_features % group == 0,
        # which expert down_proj (64 inputs) with group 128 is not
        qmodel = GPTQModel.load(args.out, device="cpu", backend=BACKEND.GPTQ_TORCH)
        result["inference_backend"] = "gptq_torch"
        stage = "perplexity"
        start = time.time()
        result["ppl"] = perplexity(qmodel.model if hasattr(qmodel, "model") else qmodel, windows, args.batch_size)
        result["eval_seconds"] = round(time.time() - start, 2)
        result["ok"] = True
    except BaseException as exc:  # report exactly what failed, and where
        result.update(ok=False, stage=stage, error=f"{type(exc).__name__}: {exc}"[:2000],
                      traceback=traceback.format_exc()[-4000:])
    with open(args.result, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
