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
import functools

import torch
from torch import nn

from ..errors import SECompressError
from .adapters import adapter_for
from .checkpoint import Checkpoint
from .finite import check_activations
from .placement import Placement, current

LAYERS_PREFIX = "model.layers."


RELEASE_BYTES = 256 << 20  # checkpoint bytes read between two releases of its mappings while a layer is read
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20


@functools.cache
def _map_large_blocks_alone() -> None:
    """glibc serves blocks below its mmap threshold from the heap, and raises that threshold (up to 32 MiB) each
    time a mapped block is freed; a layer's many 1-32 MiB tensors (one expert's matrix, a solve chunk) then land on
    the heap, fragment it, and RSS keeps memory nothing uses: 1.2 GiB of a Qwen3-30B-A3B layer's GPTQ peak (5.36 ->
    4.13 GiB with a fixed 1 MiB threshold, same time; issue 19). Fixed, every such block is mapped on its own and
    returned to the system when freed."""
    libc_name = ctypes.util.find_library("c")
    if libc_name and hasattr(ctypes.CDLL(libc_name), "mallopt"):
        ctypes.CDLL(libc_name).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


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


def _fused_experts(ckpt: Checkpoint, adapter, config, name: str):
    """Where each per-expert 2-D key goes in the fused in-memory experts tensor `name`: [(expert, half, key)] (half 0
    gate, 1 up of gate_up_proj [E, 2I, H]; None for down_proj [E, H, I]), or None when the experts are fused on disk."""
    layer_idx = int(name[len(LAYERS_PREFIX):].split(".")[0])
    prefix = f"{LAYERS_PREFIX}{layer_idx}."
    for gate_t, up_t, down_t in _expert_templates(adapter):
        if prefix + gate_t.format(e=0) not in ckpt:
            continue
        count = adapter.num_experts(config)
        if name.endswith("gate_up_proj"):
            return [(e, part, prefix + t.format(e=e)) for e in range(count) for part, t in ((0, gate_t), (1, up_t))]
        return [(e, None, prefix + down_t.format(e=e)) for e in range(count)]
    return None


def read_parameter(ckpt: Checkpoint, adapter, config, name: str, into) -> torch.Tensor:
    """The in-memory tensor `name`, read from the checkpoint's on-disk layout into memory of its own (the file's
    pages can be unmapped as soon as the layer is read). `into(shape, stored_dtype)` gives the empty destination
    (StreamedModel._room: the placement's device and the pass's dtype)."""
    stored = None
    if name in ckpt:
        stored = ckpt.get(name)
    for disk_part, memory_part in adapter.disk_renames:
        if stored is None and name.replace(memory_part, disk_part) in ckpt:
            stored = ckpt.get(name.replace(memory_part, disk_part))
    if stored is not None:
        return into(stored.shape, stored.dtype).copy_(stored)
    if name.endswith(("experts.gate_up_proj", "experts.down_proj")) and name.startswith(LAYERS_PREFIX):
        parts = _fused_experts(ckpt, adapter, config, name)
        if parts is not None:
            # one destination, filled expert by expert: no per-expert copies, no stacked intermediate; the file's
            # pages are let go every RELEASE_BYTES read (a mapped page read stays in RSS until it is unmapped: a
            # Mixtral-8x7B layer's 2.6 GiB of bf16 pages sat beside its 5.3 GiB fp32 copy)
            first = ckpt.get(parts[0][2])
            (width, cols), dtype = first.shape, first.dtype
            del first
            halves = 2 if name.endswith("gate_up_proj") else 1
            out = into((len(parts) // halves, halves * width, cols), dtype)
            read = 0
            for e, half, key in parts:
                rows = slice(None) if half is None else slice(half * width, (half + 1) * width)
                out[e, rows].copy_(ckpt.get(key))
                read += width * cols * dtype.itemsize
                if read >= RELEASE_BYTES:
                    ckpt.release()
                    read = 0
            return out
    if name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
        return read_parameter(ckpt, adapter, config, "model.embed_tokens.weight", into)
    raise SECompressError(f"{ckpt.path} has no weight for '{name}': the weights do not match config.json")


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor, as_buffer: bool) -> None:
    if as_buffer:
        module._buffers[name] = value
    else:
        module._parameters[name] = nn.Parameter(value, requires_grad=False)


class StreamedModel:
    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype | None = None, attn_implementation: str | None = None,
                 experts_implementation: str | None = None, placement: Placement | None = None,
                 keep_stored_dtype: bool = False):
        """`dtype` overrides the placement's compute dtype (None: the placement decides: bf16 on GPU, fp32 on CPU).
        `keep_stored_dtype`: for a pass that edits and writes layers without running them (round-to-nearest): each
        tensor is held in the dtype it is read in, so a bf16 layer takes half the memory of its fp32 copy and
        the values written are the same."""
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        _map_large_blocks_alone()
        self.placement = placement or current()
        self.device = self.placement.device
        self.ckpt, self.dtype = ckpt, dtype or self.placement.compute_dtype
        self.keep_stored_dtype = keep_stored_dtype
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
        self.ckpt.release()
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
                into = functools.partial(self._room, keep_dtype=is_buffer and tensor.dtype == torch.float32)
                _set_tensor(sub, tensor_name, read_parameter(self.ckpt, self.adapter, self.config, full, into),
                            is_buffer)

    def _room(self, shape, stored_dtype: torch.dtype, keep_dtype: bool = False) -> torch.Tensor:
        """Empty memory on the placement's device for a tensor read from the checkpoint: floating tensors in the
        pass's dtype unless kept as stored (fp32 buffers; every tensor under keep_stored_dtype)."""
        keep = keep_dtype or self.keep_stored_dtype or not stored_dtype.is_floating_point
        return torch.empty(shape, dtype=stored_dtype if keep else self.dtype, device=self.device)

    def load_layer(self, idx: int) -> nn.Module:
        self._load_module_tensors(f"{LAYERS_PREFIX}{idx}", self.layers[idx])
        self.ckpt.release()  # the layer owns copies: its file pages need not stay mapped (they count in RSS)
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
