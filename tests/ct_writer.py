"""Write a compressed-tensors checkpoint with compressed-tensors' own API, as llm-compressor does: the checkpoint's
tensors as modules (experts as per-expert `nn.Linear`, the layout llm-compressor calibrates and saves), the library's
apply_quantization_config (its target/ignore matching), min-max scales from its calculate_qparams, its
ModelCompressor to compress and to write quantization_config. Returns the fake-quantized weight of every module the
library quantized (its own fake_quantize): what a reader must give back."""
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _as_modules(tensors: dict) -> torch.nn.Module:
    root = torch.nn.Module()
    for key, value in tensors.items():
        module_name, _, param = key.rpartition(".")
        module = root
        parts = module_name.split(".")
        for i, part in enumerate(parts):
            if not hasattr(module, part):
                weight = tensors.get(".".join(parts[: i + 1]) + ".weight")
                if i == len(parts) - 1 and weight is not None and weight.ndim == 2 and "embed" not in part:
                    child = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=module_name + ".bias" in tensors,
                                            dtype=weight.dtype, device="meta")
                else:
                    child = torch.nn.Module()
                module.add_module(part, child)
            module = getattr(module, part)
        setattr(module, param, torch.nn.Parameter(value, requires_grad=False))
    return root


def _min_max_qparams(module) -> None:
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    args = module.quantization_scheme.weights
    w = module.weight.float()
    if args.strategy in ("group", "tensor_group"):
        w = w.reshape(w.shape[0], -1, args.group_size)
        lo, hi = w.amin(-1), w.amax(-1)
    elif args.strategy == "channel":
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    else:
        lo, hi = w.amin().reshape(1), w.amax().reshape(1)
    global_scale = None
    if args.strategy == "tensor_group":
        global_scale = generate_gparam(w.amin(), w.amax())
        module.weight_global_scale.data.copy_(global_scale)
    scale, zero = calculate_qparams(lo, hi, args, global_scale=global_scale)
    module.weight_scale.data = scale.reshape(module.weight_scale.shape).to(module.weight_scale.dtype)
    if hasattr(module, "weight_zero_point"):
        module.weight_zero_point.data = zero.reshape(module.weight_zero_point.shape).to(module.weight_zero_point.dtype)


def write_ct_checkpoint(src: Path, out: Path, groups: dict, ignore: list[str],
                        edit_config=None) -> dict[str, torch.Tensor]:
    """groups: name -> (preset scheme name such as 'W4A16' / 'INT8_W8A8' / 'FP8_DYNAMIC' / 'NVFP4', targets,
    weight overrides such as {'group_size': 16})."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import is_module_quantized

    src, out = Path(src), Path(out)
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    root = _as_modules(tensors)
    schemes = {}
    for name, (preset, targets, overrides) in groups.items():
        scheme = preset_name_to_scheme(preset, targets)
        for key, value in overrides.items():
            setattr(scheme.weights, key, value)
        schemes[name] = scheme
    apply_quantization_config(root, QuantizationConfig(config_groups=schemes, ignore=ignore))
    expected = {}
    for name, module in root.named_modules():
        if is_module_quantized(module):
            _min_max_qparams(module)
            args = module.quantization_scheme.weights
            expected[name] = fake_quantize(module.weight, module.weight_scale, getattr(module, "weight_zero_point", None),
                                           args, global_scale=getattr(module, "weight_global_scale", None))
    compressor = ModelCompressor.from_pretrained_model(root)
    compressor.compress_model(root)
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in root.state_dict().items()}, out / "model.safetensors")
    for f in src.iterdir():
        if f.name == "config.json" or f.name.startswith("token"):
            shutil.copy(f, out / f.name)
    compressor.update_config(str(out))
    if edit_config:
        config = json.loads((out / "config.json").read_text())
        edit_config(config)
        (out / "config.json").write_text(json.dumps(config))
    return expected
