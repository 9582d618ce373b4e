"""Any compressed-tensors checkpoint (llm-compressor's, vLLM's, ours) read as a dense one, through the
compressed-tensors library itself: its target/ignore matching and its own decompressors.

Which scheme a stored module has is decided exactly as compressed-tensors' `apply_quantization_config` decides it
when transformers or vLLM load the checkpoint:
    module m is quantized  iff  is_match(name, m, all targets, ignore)
    its scheme             =    the group of match_targets(name, m, targets)[0]   (exact name > `re:` > class name)
so class-name targets (`Linear`, llm-compressor's default), `re:` regexes and plain module names all work, and an
`ignore` entry wins over every target. The module class comes from the model built on the meta device; names that
exist only on disk (transformers 5 fuses experts in memory; disk, llm-compressor and vLLM keep
`...experts.{e}.down_proj` per expert) are the per-expert `nn.Linear` those tools see.

The weight is then rebuilt by the registered compressor of the group's format (pack-quantized W4A16, int-quantized
and float-quantized W8A8, nvfp4-pack-quantized, mxfp4/8, naive, dense): compressor.decompress({weight_packed,
weight_scale, ...}, scheme)["weight"], rounded once to the checkpoint's dtype.

What this view is NOT (said in `notes`, printed by eval): activations (W8A8's input_activations, NVFP4's A4) and
the kv cache stay unquantized here, a weight-only reading of the checkpoint. Refused in one line, naming it:
transforms (rotations, SpinQuant/QuIP: the stored weights are rotated), sparsity formats, a format with no
registered compressor, a config the library's own validation rejects, and quantized tensors of a module that no
config group targets.
"""
import json
from collections import OrderedDict
from pathlib import Path

import torch

from ..errors import SECompressError
from .checkpoint import Checkpoint


def _refuse(path: Path, what: str) -> SECompressError:
    return SECompressError(f"{path} is a compressed-tensors checkpoint with {what}, which se_compress cannot "
                           f"evaluate: pass a weight-quantized compressed-tensors checkpoint (W4A16, W8A8, FP8, NVFP4) "
                           f"or the unquantized model")


def quantization_config(config: dict) -> dict:
    """A parsed config.json's quantization config (older compressed-tensors writers call it compression_config)."""
    qc = config.get("quantization_config") or config.get("compression_config") or {}
    return qc if isinstance(qc, dict) else {}


def is_compressed_tensors(config: dict) -> bool:
    return quantization_config(config).get("quant_method") == "compressed-tensors"


class CompressedTensorsCheckpoint(Checkpoint):
    """`get('x.weight')` is x's dequantized weight for every module compressed-tensors says is quantized; every other
    tensor as stored. `schemes`: module name -> QuantizationScheme; `notes`: what this weight-only view leaves out."""

    def __init__(self, path, **kwargs):
        super().__init__(path, raw=True, **kwargs)
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.compressors.format import infer_module_format
        from compressed_tensors.config import CompressionFormat
        from compressed_tensors.quantization import QuantizationConfig, QuantizationMetadata
        from compressed_tensors.utils.match import is_match, match_targets
        from pydantic import ValidationError

        config = self._config_dict  # as the model handle read it (models/handle.py), else read here
        raw = quantization_config(config if config is not None else json.loads((self.path / "config.json").read_text()))
        if raw.get("transform_config"):
            raise _refuse(self.path, f"transforms ({', '.join(raw['transform_config'].get('config_groups', {})) or 'rotations'})")
        if raw.get("sparsity_config"):
            raise _refuse(self.path, f"sparsity ({raw['sparsity_config'].get('format', 'sparse')})")
        try:
            qconfig = QuantizationConfig.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"] if "[" not in str(p))
            raise _refuse(self.path, f"a quantization_config compressed-tensors rejects ({where} "
                                     f"{first.get('input')!r}: {first['msg'][:120]})") from None
        self.qconfig = qconfig
        target_to_scheme = OrderedDict((t, s) for s in qconfig.config_groups.values() for t in s.targets)
        qparams = set(QuantizationMetadata.all_qparam_names()) | {"weight_packed"}
        stored_modules = {k.rpartition(".")[0] for k in self.stored_map
                          if k.rpartition(".")[2] in qparams | {"weight"}}
        classes = self._module_classes()
        self.schemes, self.compressors, self.notes = {}, {}, []
        for name in sorted(stored_modules):
            module = classes.get(name) or _PER_EXPERT_LINEAR
            if not is_match(name, module, list(target_to_scheme), qconfig.ignore):
                leftovers = [k for k in self.stored_map if k.startswith(name + ".") and k.rpartition(".")[2] in qparams]
                if leftovers:
                    raise _refuse(self.path, f"quantized tensors ({leftovers[0]}) in module {name} that no config group "
                                             f"targets (or that `ignore` lists)")
                continue
            scheme = target_to_scheme[match_targets(name, module, list(target_to_scheme))[0]]
            fmt = scheme.format or (qconfig.format if qconfig.format not in (None, "mixed-precision") else None)
            fmt = CompressionFormat(fmt) if fmt else infer_module_format(torch.nn.Linear, scheme)
            try:
                compressor = BaseCompressor.get_value_from_registry(fmt.value)
                params = compressor.compression_param_names(scheme)
            except Exception:  # noqa: BLE001: the registry raises its own types for an unknown name
                raise _refuse(self.path, f"format '{fmt.value}' (no compressed-tensors decompressor)") from None
            if name + "." + params[0] not in self.stored_map:
                raise _refuse(self.path, f"module {name} targeted by a '{fmt.value}' group but stored without "
                                         f"{params[0]}")
            self.schemes[name], self.compressors[name] = scheme, (compressor, params)
            for p in params:
                self.weight_map.pop(name + "." + p, None)
            self.weight_map[name + ".weight"] = self.stored_map[name + "." + params[0]]
        if any(s.input_activations is not None or s.output_activations is not None for s in self.schemes.values()):
            self.notes.append("activation quantization of the checkpoint not applied: weights dequantized, "
                              "activations in full precision (a weight-only reading)")
        if qconfig.kv_cache_scheme is not None:
            self.notes.append("kv-cache quantization of the checkpoint not applied")
        for key in [k for k in self.weight_map if k.rpartition(".")[2] in qparams]:
            self.weight_map.pop(key)  # static activation scales etc.: no meaning once dequantized

    def _module_classes(self) -> dict[str, torch.nn.Module]:
        """name -> module of the model built on the meta device (no weights), for class-name targets."""
        from transformers import AutoModelForCausalLM

        config = self.config
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=self.trust_remote_code)
        return dict(model.named_modules())

    def describe(self) -> str:
        kinds = sorted({_scheme_label(s) for s in self.schemes.values()})
        return f"compressed-tensors ({', '.join(kinds)}; {len(self.schemes)} modules)"

    def get(self, name: str) -> torch.Tensor:
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module not in self.schemes:
            return super().get(name)
        compressor, params = self.compressors[module]
        state = {p: self.get_stored(f"{module}.{p}") for p in params if f"{module}.{p}" in self.stored_map}
        weight = compressor.decompress(state, self.schemes[module])["weight"]
        return weight.to(_dtype(self.config))


_PER_EXPERT_LINEAR = torch.nn.Linear(1, 1, bias=False, device="meta")


def _dtype(config) -> torch.dtype:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.bfloat16
    if isinstance(value, str):
        value = getattr(torch, value.replace("torch.", ""), torch.bfloat16)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.bfloat16


def _scheme_label(scheme) -> str:
    w, a = scheme.weights, scheme.input_activations
    weights = f"W{w.num_bits}{'fp' if w.type == 'float' else ''}" if w is not None else "W16"
    group = f" g{w.group_size}" if w is not None and w.group_size else ""
    acts = f"A{a.num_bits}{'fp' if a.type == 'float' else ''}" if a is not None else "A16"
    return f"{weights}{acts}{group}"
