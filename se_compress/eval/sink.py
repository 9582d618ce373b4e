"""Attention mass on the first token (the attention sink), per layer, and the paper's D_sink.

mass(l) = mean over heads and over query positions t >= 1 of the attention weight on key 0.
D_sink(l) = 1 - mean over heads of [mass after / mass before]  (paper, Sec. on attention sinks).
Measured with eager attention (the only implementation that returns weights), streamed.
"""
from collections.abc import Callable

import torch

from ..models.checkpoint import Checkpoint
from ..models.streaming import StreamedModel


@torch.no_grad()
def first_token_attention(ckpt: Checkpoint, windows: torch.Tensor, layer_hook: Callable | None = None,
                          batch_size: int = 4) -> list[list[float]]:
    """Per layer, per head: mean attention on key 0 over queries t >= 1 and all windows."""
    sm = StreamedModel(ckpt, attn_implementation="eager")
    batches, hidden, layer_args = sm.embed_batches(windows, batch_size)
    per_layer = []
    for i in range(len(sm.layers)):
        layer = sm.load_layer(i)
        if layer_hook is not None:
            layer_hook(i, layer)
        sums, n = None, 0
        captured = {}
        handle = layer.self_attn.register_forward_hook(lambda m, a, out: captured.__setitem__("w", out[1]))
        for b in range(len(batches)):
            hidden[b] = sm.run_layer(i, hidden[b], layer_args[b][i])
            weights = captured["w"]  # [batch, heads, queries, keys]
            mass = weights[:, :, 1:, 0].mean(dim=2).sum(dim=0)  # per head, summed over windows
            sums = mass if sums is None else sums + mass
            n += weights.shape[0]
        handle.remove()
        sm.free_layer(i)
        per_layer.append((sums / n).tolist())
    return per_layer


def d_sink(before: list[list[float]], after: list[list[float]]) -> list[float]:
    out = []
    for heads_before, heads_after in zip(before, after):
        ratios = [a / b for a, b in zip(heads_after, heads_before) if b > 0]
        out.append(1.0 - sum(ratios) / len(ratios) if ratios else 0.0)
    return out
