"""Run a model one decoder layer at a time, straight from its safetensors files.

The model is built on the meta device (buffers such as rotary frequencies are real). Embeddings, final norm
and lm_head are loaded once; each decoder layer is loaded, run over every calibration batch, and freed before
the next. Peak memory is one decoder layer plus the activations of the calibration set, whatever the depth.

Device and dtype come from a Placement (placement.py): each layer is loaded straight onto its compute device in
its compute dtype (bf16 on a GPU, fp32 on the CPU), and the activations between layers wait where it says (on the
device when they fit, else in pinned host memory, moved batch by batch in `run_layer`).

The keyword arguments a decoder layer receives (attention masks, rotary embeddings, position ids) are taken
from the model's own forward: every layer is swapped for a `_Catcher` that records them and passes the hidden
states through. So each architecture's own masking rules (sliding windows, per-layer types) apply unchanged.
"""
import copy
import ctypes
import ctypes.util

import torch
from torch import nn

from ..errors import SECompressError
from .adapters import adapter_for
from .checkpoint import Checkpoint
from .finite import check_activations
from .placement import Placement, current

LAYERS_PREFIX = "model.layers."


def _return_freed_memory() -> None:
    """glibc keeps freed heap pages of each layer's small tensors (norms, routers) unless asked to trim them;
    without this, peak RSS crept up ~5 MB per layer on a 64-layer model (bench/detect_memory.py)."""
    libc_name = ctypes.util.find_library("c")
    if libc_name and hasattr(ctypes.CDLL(libc_name), "malloc_trim"):
        ctypes.CDLL(libc_name).malloc_trim(0)


class _Catcher(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.attention_type = getattr(layer, "attention_type", None)
        self.captured = None

    def forward(self, hidden_states, *args, **kwargs):
        self.captured = (hidden_states, args, kwargs)
        return hidden_states


def _expert_templates(adapter):
    known = [
        ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight", "mlp.experts.{e}.down_proj.weight"),
        ("block_sparse_moe.experts.{e}.w1.weight", "block_sparse_moe.experts.{e}.w3.weight",
         "block_sparse_moe.experts.{e}.w2.weight"),
    ]
    return ([adapter.disk_expert_keys] if adapter.disk_expert_keys else []) + known


def read_parameter(ckpt: Checkpoint, adapter, config, name: str) -> torch.Tensor:
    """The in-memory tensor `name`, read from the checkpoint's on-disk layout."""
    if name in ckpt:
        return ckpt.get(name)
    for disk_part, memory_part in adapter.disk_renames:
        if name.replace(memory_part, disk_part) in ckpt:
            return ckpt.get(name.replace(memory_part, disk_part))
    if name.endswith(("experts.gate_up_proj", "experts.down_proj")) and name.startswith(LAYERS_PREFIX):
        layer_idx = int(name[len(LAYERS_PREFIX):].split(".")[0])
        prefix = f"{LAYERS_PREFIX}{layer_idx}."
        for gate_t, up_t, down_t in _expert_templates(adapter):
            if prefix + gate_t.format(e=0) not in ckpt:
                continue
            count = adapter.num_experts(config)
            if name.endswith("gate_up_proj"):
                return torch.stack([
                    torch.cat([ckpt.get(prefix + gate_t.format(e=e)), ckpt.get(prefix + up_t.format(e=e))], dim=0)
                    for e in range(count)
                ])
            return torch.stack([ckpt.get(prefix + down_t.format(e=e)) for e in range(count)])
    if name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
        return read_parameter(ckpt, adapter, config, "model.embed_tokens.weight")
    raise SECompressError(f"{ckpt.path} has no weight for '{name}': the weights do not match config.json")


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor, as_buffer: bool) -> None:
    if as_buffer:
        module._buffers[name] = value
    else:
        module._parameters[name] = nn.Parameter(value, requires_grad=False)


class StreamedModel:
    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype | None = None, attn_implementation: str | None = None,
                 experts_implementation: str | None = None, placement: Placement | None = None):
        """`dtype` overrides the placement's compute dtype (None: the placement decides: bf16 on GPU, fp32 on CPU)."""
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        self.placement = placement or current()
        self.device = self.placement.device
        self.ckpt, self.dtype = ckpt, dtype or self.placement.compute_dtype
        # A copy: building and running the model writes into its config (the experts implementation a pass selects),
        # and the checkpoint's config is shared by every pass of the command (models/handle.py).
        self.config = copy.deepcopy(ckpt.config)
        self.adapter = adapter_for(self.config)
        with init_empty_weights(include_buffers=False):
            extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
            self.model = AutoModelForCausalLM.from_config(self.config, trust_remote_code=ckpt.trust_remote_code, **extra)
        if experts_implementation:
            self.model.config._experts_implementation = experts_implementation
        self.model.eval()
        self.layers = self.model.model.layers
        for name, module in self.model.named_modules():
            if not name.startswith(LAYERS_PREFIX) and name != "model.layers":
                self._load_module_tensors(name, module, recurse=False)
        self._kwargs_cache = {}

    def _load_module_tensors(self, prefix: str, module: nn.Module, recurse: bool = True) -> None:
        for sub_name, sub in (module.named_modules(prefix=prefix) if recurse else [(prefix, module)]):
            for tensor_name, tensor in list(sub._parameters.items()) + list(sub._buffers.items()):
                if tensor is None:
                    continue
                full = f"{sub_name}.{tensor_name}" if sub_name else tensor_name
                is_buffer = tensor_name in sub._buffers
                if is_buffer and tensor_name not in sub._non_persistent_buffers_set and full not in self.ckpt:
                    continue  # a persistent buffer the checkpoint leaves at its init value
                if is_buffer and tensor_name in sub._non_persistent_buffers_set:
                    if tensor.device != self.device:  # computed in __init__ (rotary frequencies): real, maybe elsewhere
                        sub._buffers[tensor_name] = tensor.to(self.device)
                    continue
                value = read_parameter(self.ckpt, self.adapter, self.config, full)
                keep = not value.is_floating_point() or (is_buffer and tensor.dtype == torch.float32)
                value = value.to(device=self.device, dtype=None if keep else self.dtype)
                _set_tensor(sub, tensor_name, value, is_buffer)

    def load_layer(self, idx: int) -> nn.Module:
        self._load_module_tensors(f"{LAYERS_PREFIX}{idx}", self.layers[idx])
        return self.layers[idx]

    def free_layer(self, idx: int) -> None:
        for sub in self.layers[idx].modules():
            for tensor_name, tensor in list(sub._parameters.items()):
                if tensor is not None:
                    sub._parameters[tensor_name] = nn.Parameter(torch.empty_like(tensor, device="meta"), requires_grad=False)
        self.ckpt.release()
        _return_freed_memory()

    @torch.no_grad()
    def embed_and_layer_kwargs(self, input_ids: torch.Tensor):
        """Embedded inputs and, per layer, the keyword arguments the model's forward passes to it."""
        input_ids = self.placement.to_compute(input_ids)
        originals = list(self.layers)
        catchers = [_Catcher(layer) for layer in originals]
        self.layers._modules.update({str(i): c for i, c in enumerate(catchers)})
        try:
            self.model.model(input_ids=input_ids, use_cache=False)
        finally:
            self.layers._modules.update({str(i): layer for i, layer in enumerate(originals)})
        hidden = catchers[0].captured[0]
        per_layer = [(c.captured[1], c.captured[2]) for c in catchers]
        return hidden, per_layer

    def embed_batches(self, input_ids: torch.Tensor, batch_size: int):
        """Split [N, L] ids into batches; returns (batches, hidden per batch, layer kwargs per batch)."""
        batches = [input_ids[i : i + batch_size] for i in range(0, input_ids.shape[0], batch_size)]
        self.plan_activations(input_ids.numel())
        hidden, layer_args = [], []
        for batch in batches:
            h, args = self.embed_and_layer_kwargs(batch)
            hidden.append(self.placement.hold(h))
            layer_args.append(args)
        return batches, hidden, layer_args

    def plan_activations(self, tokens: int) -> bool:
        """Whether the activations of `tokens` calibration tokens stay on the device (twice: a layer's in and out)."""
        item = torch.empty((), dtype=self.dtype).element_size()
        return self.placement.plan_activations(2 * tokens * self.config.hidden_size * item)

    @torch.no_grad()
    def run_layer(self, idx: int, hidden: torch.Tensor, layer_args) -> torch.Tensor:
        """The layer's output for `hidden`, held where the placement keeps activations."""
        args, kwargs = layer_args
        out = self.layers[idx](self.placement.to_compute(hidden), *args, **kwargs)
        out = check_activations(out[0] if isinstance(out, tuple) else out, idx)  # overflow: stop, layer named
        return self.placement.hold(out)

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.model.norm(self.placement.to_compute(hidden)))
