"""The streamed runner: every pass over a model's layers, written once.

    embed the calibration (or evaluation) batches once (none for a pass that only edits and writes)
    for each decoder layer l:
        load l on the placement
        for each round the pass asks for on l (one, for a statistics pass):
            for each batch b:  acc.begin(b) for each accumulator;  out_b <- layer_l(h_b);  acc.add(out_b)
            acc.close() (hooks off); if the round keeps its outputs: h_b <- out_b
        free l
    return the batches and their final hidden states

An accumulator owns one statistic of the layer (detection's recorders, the attention on the first token, a Hessian's
hooks, ...): `begin(place)` is told which batch is about to run (its global index and the global index of its first
token, the same on every rank), `add(output)` gets the layer's output for it; both are optional, as is `close()`.
What an accumulator sees inside the layer it sees through its own hooks. The cross-rank reduction is the
accumulator's too (`reduce()`, called by the pass when its statistic is complete); the runner knows nothing of
ranks beyond the data-parallel split of the batches (distributed.my_input_ids) when a pass asks for it.

Statistics passes (detection, perplexity, the sink) give one round per layer: `accumulators_for(l, layer)`.
Quantization needs several (GPTQ: collect the attention inputs, quantize attention; collect the MLP inputs through
the quantized attention, quantize the MLP; run the quantized layer for the next layer's inputs), so it gives
`rounds_for(l, layer)`: an iterable of Round, usually a generator, whose code between two rounds runs after the
first round's batches (reduce, quantize) and whose code after the last round runs before the layer is freed
(write). A pass that only edits and writes layers gives no input ids and no rounds.
"""
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .. import distributed as dist
from .streaming import StreamedModel


@dataclass(frozen=True)
class BatchPlace:
    index: int        # global index of the batch (batch_size samples of the whole calibration set)
    first_token: int  # global index of its first token in the flattened [samples * seq_len] ids


@dataclass
class Round:
    """One run of every batch through the loaded layer, with the accumulators that watch it. keep_outputs: the
    outputs become the next layer's inputs (False for a collection round before the layer is changed)."""
    accumulators: list
    keep_outputs: bool = True


@torch.no_grad()
def stream_layers(sm: StreamedModel, input_ids: torch.Tensor | None, batch_size: int,
                  accumulators_for: Callable[[int, torch.nn.Module], list] | None = None, *,
                  rounds_for: Callable[[int, torch.nn.Module], Iterable[Round]] | None = None,
                  data_parallel: bool = False, progress: bool = False, desc: str = "layers"):
    """Run `input_ids` [N, L] through every decoder layer of `sm`, batch by batch, feeding the accumulators that
    `accumulators_for(layer_idx, layer)` returns for each layer (one round), or each Round that
    `rounds_for(layer_idx, layer)` gives. `input_ids` None: no batches (the rounds only edit and write).
    `data_parallel`: under torchrun this rank runs its own share of the batches only.
    Returns (this rank's batches of ids, their final hidden states)."""
    if (accumulators_for is None) == (rounds_for is None):
        raise TypeError("stream_layers takes accumulators_for or rounds_for, one of them")
    if rounds_for is None:
        rounds_for = lambda i, layer: [Round(accumulators_for(i, layer))]  # noqa: E731
    batches, hidden, layer_args, places = [], [], [], []
    if input_ids is not None:
        ids, batch_ids = dist.my_input_ids(input_ids, batch_size) if data_parallel else (
            input_ids, list(range(-(-input_ids.shape[0] // batch_size))))
        batches, hidden, layer_args = sm.embed_batches(ids, batch_size)
        places = [BatchPlace(b, b * batch_size * input_ids.shape[1]) for b in batch_ids]
    for i in tqdm(range(len(sm.layers)), desc=desc, disable=not progress):
        layer = sm.load_layer(i)
        for round_ in rounds_for(i, layer):  # a generator's code between rounds runs here
            accumulators = [a for a in round_.accumulators if a is not None]
            try:
                for b, place in enumerate(places):
                    for acc in accumulators:
                        if hasattr(acc, "begin"):
                            acc.begin(place)
                    out = sm.run_layer(i, hidden[b], layer_args[b][i])
                    if round_.keep_outputs:
                        hidden[b] = out
                    for acc in accumulators:
                        if hasattr(acc, "add"):
                            acc.add(out)
            finally:
                for acc in accumulators:
                    if hasattr(acc, "close"):
                        acc.close()
            round_ = accumulators = None  # done: its statistics are the pass's now, not held while the next is made
        sm.free_layer(i)
    return batches, hidden
