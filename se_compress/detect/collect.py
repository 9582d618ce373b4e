"""One statistics pass over the calibration set, streamed (default) or with the whole model in memory.

Both paths use the same recorders; the streamed one must give the same numbers (tests check it).
"""
from dataclasses import dataclass

import torch

from ..models.adapters import adapter_for
from ..models.checkpoint import Checkpoint
from ..models.placement import current
from ..models.runner import stream_layers
from ..models.streaming import StreamedModel
from .stats import ExpertRecorder, HiddenRecorder, attach_recorders, detach_recorders


@dataclass
class Statistics:
    experts: dict[int, ExpertRecorder]  # MoE layer index -> recorder
    hidden: list[HiddenRecorder]        # per decoder layer output
    num_layers: int
    num_experts: int
    seq_len: int


def _batches(input_ids: torch.Tensor, batch_size: int):
    for start in range(0, input_ids.shape[0], batch_size):
        yield start, input_ids[start : start + batch_size]


def collect_streamed(ckpt: Checkpoint, input_ids: torch.Tensor, batch_size: int = 8, progress: bool = True,
                     dtype: torch.dtype | None = None, layer_hook=None) -> Statistics:
    """Device and dtype: the current Placement (models/placement.py); `dtype` overrides its compute dtype.

    `layer_hook(layer_idx, layer)`, if given, runs after each layer is loaded and before the batches go through it
    (the merger hangs a hook on the MoE block there to see its inputs in the same pass)."""
    sm = StreamedModel(ckpt, dtype=dtype)
    config, adapter = sm.config, sm.adapter
    stats = Statistics({}, [], len(sm.layers), adapter.num_experts(config), input_ids.shape[1])

    def accumulators(i, layer):
        if layer_hook is not None:
            layer_hook(i, layer)
        recorder, handles = attach_recorders(adapter, layer, i, config)
        hidden_rec = HiddenRecorder(config.hidden_size, stats.seq_len)
        if recorder is not None:
            stats.experts[i] = recorder
        stats.hidden.append(hidden_rec)
        return [recorder, hidden_rec, _Detach(adapter, layer, handles)]

    stream_layers(sm, input_ids, batch_size, accumulators, data_parallel=True, progress=progress)
    for rec in list(stats.experts.values()) + stats.hidden:  # torchrun: every rank gets the one-process values
        rec.reduce()
    return stats


class _Detach:
    """Takes the recorders off a layer when its batches are done."""

    def __init__(self, adapter, layer, handles):
        self.adapter, self.layer, self.handles = adapter, layer, handles

    def close(self):
        detach_recorders(self.adapter, self.layer, self.handles)


@torch.no_grad()
def collect_in_memory(ckpt: Checkpoint, input_ids: torch.Tensor, batch_size: int = 8,
                      dtype: torch.dtype | None = None) -> Statistics:
    """Reference path: the whole model loaded with plain from_pretrained (small models, tests)."""
    from transformers import AutoModelForCausalLM

    from ..models.finite import check_module_weights

    placement = current()
    model = AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=dtype or placement.compute_dtype,
                                                 trust_remote_code=ckpt.trust_remote_code)
    check_module_weights(model, ckpt.path)  # NaN/Inf: one line (models/finite.py)
    model.to(placement.device).eval()
    config, adapter = model.config, adapter_for(model.config)
    seq_len = input_ids.shape[1]
    layers = model.model.layers
    stats = Statistics({}, [], len(layers), adapter.num_experts(config), seq_len)
    all_handles = []
    for i, layer in enumerate(layers):
        recorder, handles = attach_recorders(adapter, layer, i, config)
        all_handles += handles
        if recorder is not None:
            stats.experts[i] = recorder
        hidden_rec = HiddenRecorder(config.hidden_size, seq_len)
        stats.hidden.append(hidden_rec)
        all_handles.append(layer.register_forward_hook(
            lambda m, a, out, rec=hidden_rec: rec.update(out[0] if isinstance(out, tuple) else out)))
    for start, batch in _batches(input_ids, batch_size):
        for rec in list(stats.experts.values()) + stats.hidden:
            rec.token_base = start * seq_len
        model.model(input_ids=placement.to_compute(batch), use_cache=False)
    for i, layer in enumerate(layers):
        detach_recorders(adapter, layer, [])
    for h in all_handles:
        h.remove()
    return stats
