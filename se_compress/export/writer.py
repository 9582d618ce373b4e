"""Write a standard Hugging Face checkpoint one decoder layer at a time, safely.

- Everything goes to a hidden temporary folder next to the output, renamed to the output name only when
  complete: a killed run never leaves a folder that looks like a finished checkpoint.
- Never writes into the input model's folder; replaces only an output se_compress wrote, and only with `force`
  (se_compress/output.py: any other existing folder or file is refused; the old output is deleted only after the
  new one is in place).
- Tensors are written in the input's on-disk layout (per-expert 2-D keys, or fused like gpt-oss), in the
  input's dtype, and sharded like the input (same largest shard size; one file if the input had one), with
  shards of at most MAX_SHARD_BYTES: a shard waits in memory until it is full (safetensors writes a file at
  once), and the published 4-5 GB shards would hold several quantized layers there (issue 19: peak RSS).
- Tokenizer files and generation_config.json are copied; config.json is the (edited) config given.
"""
import errno
import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..errors import SECompressError
from ..output import check_output, ordinary_permissions, replace_folder
from ..models.adapters import adapter_for
from ..models.checkpoint import Checkpoint
from ..models.streaming import LAYERS_PREFIX, _expert_templates

COPY_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja", ".py")
NOT_COPIED = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json",
              # se_compress's studies of the input model (the shipped default model holds some): wrong for the output
              "se_report.json", "ablation.json", "stability.json", "training.json", "compare.json",
              "compression_report.json", "recipe.json", "eval.json"}


MAX_SHARD_BYTES = 1 << 30  # 4% of a 24 GiB machine; a Qwen3-30B-A3B layer at W4 is 0.3 GiB


def check_output_path(src: Path, out: Path, force: bool) -> None:
    check_output(out, inputs=[src], force=force, kind="checkpoint")


class CheckpointWriter:
    def __init__(self, src: Checkpoint, out: Path, config, force: bool = False):
        check_output_path(src.path, out, force)
        self.src, self.out, self.config, self.force = src, Path(out), config, force
        self.adapter = adapter_for(config)
        self.tmp = self.out.parent / f".{self.out.name}.partial"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)  # leftovers of a killed run
        self.tmp.mkdir(parents=True)
        sizes = [f.stat().st_size for f in src.files]
        self.max_shard = min(max(sizes), MAX_SHARD_BYTES) if len(sizes) > 1 else MAX_SHARD_BYTES
        self.dtype = self._source_dtype()
        self.templates = self._source_expert_template()
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []

    def _source_dtype(self) -> torch.dtype:
        for name in self.src.weight_map:
            t = self.src.get(name)
            if t.is_floating_point():
                return t.dtype
        return torch.float32

    def _source_expert_template(self):
        for gate_t, up_t, down_t in _expert_templates(self.adapter):
            if f"{LAYERS_PREFIX}{self._first_moe_layer()}." + gate_t.format(e=0) in self.src:
                return gate_t, up_t, down_t
        return None  # fused on disk

    def _first_moe_layer(self) -> int:
        return next(i for i in range(self.config.num_hidden_layers) if self.adapter.is_moe_layer(self.config, i))

    def _disk_tensors(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """One in-memory tensor -> its on-disk key(s)."""
        if self.templates and name.startswith(LAYERS_PREFIX) and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            prefix = name[: name.index("experts.")].rsplit(".", 2)[0] + "."  # model.layers.{i}.
            gate_t, up_t, down_t = self.templates
            if name.endswith("gate_up_proj"):
                inter = tensor.shape[1] // 2
                out = {}
                for e in range(tensor.shape[0]):
                    out[prefix + gate_t.format(e=e)] = tensor[e, :inter]
                    out[prefix + up_t.format(e=e)] = tensor[e, inter:]
                return out
            return {prefix + down_t.format(e=e): tensor[e] for e in range(tensor.shape[0])}
        for disk_part, memory_part in self.adapter.disk_renames:
            if self.templates and self.templates[0].startswith(disk_part.strip(".")):
                name = name.replace(memory_part, disk_part)
        return {name: tensor}

    def add(self, name: str, tensor: torch.Tensor, handed_over: bool = False) -> None:
        """`handed_over`: the caller made `tensor` for the writer and neither keeps nor changes it (packed codes)."""
        for key, given in self._disk_tensors(name, tensor).items():
            value = given.detach().to("cpu")
            if value.is_floating_point() and name.split(".")[-1] != "e_score_correction_bias":
                value = value.to(self.dtype)
            self._put(key, value, owned=handed_over or value.data_ptr() != given.data_ptr())

    def add_stored(self, key: str, tensor: torch.Tensor) -> None:
        """An on-disk tensor written exactly as given (FP8 weights and block scales, MXFP4 blocks): no renaming,
        no dtype change."""
        self._put(key, tensor.detach().to("cpu"))

    def _put(self, key: str, value: torch.Tensor, owned: bool = False) -> None:
        """Keep a copy of its own until the shard is written: the caller's tensor may change after it was given,
        or be a view (one expert of a fused tensor would keep the whole alive). A tensor that is already the
        writer's alone (`owned`: just made by a dtype or device change, or handed over) is kept as it is:
        copying it again doubled the pending shard's peak."""
        owned = owned and value.is_contiguous() and value.untyped_storage().nbytes() == value.nbytes
        self.pending[key] = value if owned else value.contiguous().clone()
        self.pending_bytes += value.numel() * value.element_size()
        if self.max_shard and self.pending_bytes >= self.max_shard:
            self._flush()

    def add_module(self, prefix: str, module: torch.nn.Module) -> None:
        """All parameters and persistent buffers of `module`, named under `prefix`."""
        for name, tensor in module.state_dict().items():
            self.add(f"{prefix}.{name}" if prefix else name, tensor)

    def add_outside_layers(self, model: torch.nn.Module) -> None:
        """Embeddings, final norm, lm_head: everything not under model.layers (tied lm_head left out as on input)."""
        for name, tensor in model.state_dict().items():
            if name.startswith(LAYERS_PREFIX):
                continue
            if name == "lm_head.weight" and name not in self.src and getattr(self.config, "tie_word_embeddings", False):
                continue
            self.add(name, tensor)

    def _flush(self) -> None:
        if not self.pending:
            return
        path = self.tmp / f"shard-{len(self.shards):05d}.safetensors"
        self._guard(lambda: save_file(self.pending, str(path), metadata={"format": "pt"}))
        ordinary_permissions(path)  # safetensors creates its files 0600
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def _guard(self, write):
        try:
            return write()
        except (OSError, SafetensorError) as exc:  # safetensors reports a failed write as its own error type
            self.abort()
            if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "(os error 28)" in str(exc):
                raise SECompressError(f"out of disk space writing {self.out}: free space or choose another --out; "
                                      f"nothing was written") from None
            reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0].split("I/O error: ")[-1]
            raise SECompressError(f"could not write {self.out}: {reason}; nothing was written") from None

    def finish(self, extra_files: dict[str, str] | None = None) -> Path:
        self._flush()
        if len(self.shards) == 1:
            self.shards[0][0].rename(self.tmp / "model.safetensors")
        else:
            total, weight_map = len(self.shards), {}
            for i, (path, keys) in enumerate(self.shards):
                final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
                path.rename(self.tmp / final)
                weight_map.update({k: final for k in keys})
            size = sum((self.tmp / f).stat().st_size for f in set(weight_map.values()))
            index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        def rest():
            for f in self.src.path.iterdir():
                if f.is_file() and f.suffix in COPY_SUFFIXES and f.name not in NOT_COPIED and not f.name.startswith("."):
                    shutil.copy2(f, self.tmp / f.name)
            self.config.to_json_file(self.tmp / "config.json")
            for name, text in (extra_files or {}).items():
                (self.tmp / name).write_text(text)
            # An existing output (ours, with force: checked at start) is deleted only once this one is in place.
            replace_folder(self.tmp, self.out)

        self._guard(rest)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False


class NullWriter:
    """What ranks other than 0 hold instead of a CheckpointWriter: the same checks and dtype, no file written."""

    def __init__(self, src, out, config, force: bool = False):
        check_output_path(src.path, out, force)
        self.src, self.out = src, out
        self.dtype = CheckpointWriter._source_dtype(self)

    def add(self, *a, **k):
        pass

    add_module = add_outside_layers = add

    def finish(self, extra_files=None):
        return self.out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def open_writer(src, out, config, force: bool = False):
    """The checkpoint writer of this process: a CheckpointWriter, or under torchrun on ranks other than 0 a NullWriter
    (the same checks, nothing written): rank 0 alone writes."""
    from .. import distributed as dist

    return (CheckpointWriter if dist.is_main() else NullWriter)(src, out, config, force=force)
