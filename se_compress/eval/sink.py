"""Attention mass on the first token (the attention sink), per layer, and the paper's D_sink.

mass(l) = mean over heads and over query positions t >= 1 of the attention weight on key 0.
D_sink(l) = 1 - mean over heads of [mass after / mass before]  (paper, Sec. on attention sinks).
Measured with eager attention (the only implementation that returns weights), streamed.
"""
from collections.abc import Callable

import torch

from ..models.checkpoint import Checkpoint
from ..models.runner import stream_layers
from ..models.streaming import StreamedModel


class FirstTokenAttention:
    """The accumulator of one layer (models/runner.py): per head, the attention on key 0 summed over the windows."""

    def __init__(self, layer):
        self.sums, self.n, self.weights = None, 0, None
        self.handle = layer.self_attn.register_forward_hook(lambda m, a, out: setattr(self, "weights", out[1]))

    def add(self, output: torch.Tensor) -> None:
        weights = self.weights  # [batch, heads, queries, keys]
        mass = weights[:, :, 1:, 0].mean(dim=2).sum(dim=0)  # per head, summed over windows
        self.sums = mass if self.sums is None else self.sums + mass
        self.n += weights.shape[0]

    def close(self) -> None:
        self.handle.remove()

    def result(self) -> list[float]:
        return (self.sums / self.n).tolist()


@torch.no_grad()
def first_token_attention(ckpt: Checkpoint, windows: torch.Tensor, layer_hook: Callable | None = None,
                          batch_size: int = 4) -> list[list[float]]:
    """Per layer, per head: mean attention on key 0 over queries t >= 1 and all windows."""
    sm = StreamedModel(ckpt, attn_implementation="eager")
    per_layer = []

    def accumulators(i, layer):
        if layer_hook is not None:
            layer_hook(i, layer)
        per_layer.append(FirstTokenAttention(layer))
        return [per_layer[-1]]

    stream_layers(sm, windows, batch_size, accumulators)
    return [acc.result() for acc in per_layer]


def d_sink(before: list[list[float]], after: list[list[float]]) -> list[float]:
    out = []
    for heads_before, heads_after in zip(before, after):
        ratios = [a / b for a, b in zip(heads_after, heads_before) if b > 0]
        out.append(1.0 - sum(ratios) / len(ratios) if ratios else 0.0)
    return out
