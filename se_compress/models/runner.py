"""The streamed runner: every pass over a model's layers, written once.

    embed the calibration (or evaluation) batches once
    for each decoder layer l:
        load l on the placement; ask the pass for the layer's accumulators (they may hook the layer)
        for each batch b:  acc.begin(b) for each accumulator;  h_b <- layer_l(h_b);  acc.add(h_b)
        acc.close() (hooks off); free l
    return the batches and their final hidden states

An accumulator owns one statistic of the layer (detection's recorders, the attention on the first token, ...):
`begin(place)` is told which batch is about to run (its global index and the global index of its first token, the
same on every rank), `add(output)` gets the layer's output for it; both are optional, as is `close()`. What an
accumulator sees inside the layer it sees through its own hooks. The cross-rank reduction is the accumulator's too
(`reduce()`, called by the pass when the run is over); the runner knows nothing of ranks beyond the data-parallel
split of the batches (distributed.my_input_ids) when a pass asks for it.
"""
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .. import distributed as dist
from .streaming import StreamedModel


@dataclass(frozen=True)
class BatchPlace:
    index: int        # global index of the batch (batch_size samples of the whole calibration set)
    first_token: int  # global index of its first token in the flattened [samples * seq_len] ids


@torch.no_grad()
def stream_layers(sm: StreamedModel, input_ids: torch.Tensor, batch_size: int,
                  accumulators_for: Callable[[int, torch.nn.Module], list], data_parallel: bool = False,
                  progress: bool = False, desc: str = "layers"):
    """Run `input_ids` [N, L] through every decoder layer of `sm`, batch by batch, feeding the accumulators that
    `accumulators_for(layer_idx, layer)` returns for each layer. `data_parallel`: under torchrun this rank runs its
    own share of the batches only. Returns (this rank's batches of ids, their final hidden states)."""
    ids, batch_ids = dist.my_input_ids(input_ids, batch_size) if data_parallel else (
        input_ids, list(range(-(-input_ids.shape[0] // batch_size))))
    batches, hidden, layer_args = sm.embed_batches(ids, batch_size)
    places = [BatchPlace(b, b * batch_size * input_ids.shape[1]) for b in batch_ids]
    for i in tqdm(range(len(sm.layers)), desc=desc, disable=not progress):
        layer = sm.load_layer(i)
        accumulators = [a for a in accumulators_for(i, layer) if a is not None]
        try:
            for b, place in enumerate(places):
                for acc in accumulators:
                    if hasattr(acc, "begin"):
                        acc.begin(place)
                hidden[b] = sm.run_layer(i, hidden[b], layer_args[b][i])
                for acc in accumulators:
                    if hasattr(acc, "add"):
                        acc.add(hidden[b])
        finally:
            for acc in accumulators:
                if hasattr(acc, "close"):
                    acc.close()
        sm.free_layer(i)
    return batches, hidden
