"""GPTQModel's GPTQ on our calibration tokens, run by the peer's own virtual environment's python (never imported
by se_compress; bench/quant.py uses it too).

    build/gptqmodel-venv/bin/python se_compress/peers/gptqmodel_run.py --model M --calib-ids ids.pt \
        --bits 4 --group-size 32 --out DIR --result result.json [--recipe gptqmodel_dynamic.json]

QuantizeConfig(bits, group_size, sym=True, desc_act=False[, dynamic=the export's dict]); quantize on our token ids;
saved in GPTQ format (its size is recorded), then reloaded with GPTQModel's torch kernel and every quantized
module's weight dequantized by GPTQModel itself (`dequantize_weight`) into a dense copy of the source checkpoint
(same keys: GPTQModel's per-expert modules are the per-expert disk keys). se_compress evaluates that copy: it does
not read the GPTQ format. Writes result.json: versions, seconds, GPTQ size, or the failing stage and its error.
"""
import json
import os
import shutil
import time
import traceback
from pathlib import Path

from runner_args import parse_args, peak_rss_mib  # beside this script (never se_compress)


def dense_copy(source: Path, qmodel, out: Path) -> int:
    """The source's tensors with every GPTQ module's weight replaced by GPTQModel's dequantization; modules done."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = {}
    for f in sorted(source.glob("*.safetensors")):
        tensors.update(load_file(f))
    dtype = next(v.dtype for k, v in tensors.items() if k.endswith("embed_tokens.weight"))
    done = 0
    for name, module in qmodel.named_modules():
        if not hasattr(module, "dequantize_weight") or not hasattr(module, "qweight"):
            continue
        key = name.removeprefix("model.") if name.removeprefix("model.") + ".weight" in tensors else name
        if key + ".weight" not in tensors:
            raise KeyError(f"GPTQModel module {name} has no weight {key}.weight in the source checkpoint")
        with torch.no_grad():
            weight = module.dequantize_weight().T  # GPTQ layout [in, out] -> nn.Linear's [out, in]
        if tuple(weight.shape) != tuple(tensors[key + ".weight"].shape):
            raise ValueError(f"{name}: dequantized {tuple(weight.shape)} vs source {tuple(tensors[key + '.weight'].shape)}")
        tensors[key + ".weight"] = weight.to(dtype).contiguous()
        done += 1
    out.mkdir(parents=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    for f in source.iterdir():
        if f.name == "config.json" or f.name.startswith(("token", "generation_config")):
            shutil.copy(f, out / f.name)
    return done


def main():
    args = parse_args("gptqmodel_dynamic.json from se-compress detect --export gptqmodel")
    result = {"tool": "GPTQModel", "bits": args.bits, "group_size": args.group_size, "recipe": args.recipe,
              "cpu_workers": os.environ.get("GPTQMODEL_CPU_WORKERS"), "threads": os.environ.get("OMP_NUM_THREADS")}
    stage, start = "import", time.time()
    try:
        import gptqmodel
        import torch
        from gptqmodel import GPTQModel, QuantizeConfig
        from gptqmodel.utils.backend import BACKEND

        result["version"] = gptqmodel.__version__
        ids = torch.load(args.calib_ids)
        dynamic = json.loads(Path(args.recipe).read_text())["dynamic"] if args.recipe else None
        stage = "load"
        qcfg = QuantizeConfig(bits=args.bits, group_size=args.group_size, sym=True, desc_act=False, dynamic=dynamic)
        model = GPTQModel.load(args.model, qcfg, device="cpu")
        stage = "quantize"
        t0 = time.time()
        model.quantize([{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in ids], batch_size=8)
        result["quantize_seconds"] = round(time.time() - t0, 1)
        stage = "save"
        gptq_dir = Path(args.out).parent / "gptq"
        model.save(str(gptq_dir))
        result["gptq_size_bytes"] = sum(f.stat().st_size for f in gptq_dir.glob("*.safetensors"))
        del model
        stage = "dequantize"
        qmodel = GPTQModel.load(str(gptq_dir), device="cpu", backend=BACKEND.TORCH)
        result["dequantized_modules"] = dense_copy(Path(args.model), qmodel, Path(args.out))
        shutil.rmtree(gptq_dir)
        result["ok"] = True
    except BaseException as exc:  # noqa: BLE001: the caller reports exactly what failed, and where
        result.update(ok=False, stage=stage, error=f"{type(exc).__name__}: {exc}"[:2000],
                      traceback=traceback.format_exc()[-4000:])
    result["wall_seconds"] = round(time.time() - start, 1)
    result["peak_rss_mib"] = peak_rss_mib()
    with open(args.result, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
