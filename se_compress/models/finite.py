"""NaN and Inf are refused where they enter: in a weight as it is read, in an activation as a layer computes it.

A checkpoint with NaN in one expert's down_proj used to pass: `detect` reported a shorter SE set (the NaN spreads
through later layers), `quantize` wrote a NaN checkpoint. One NaN or Inf in a weight is a corrupt file, never a
model to measure, so the checkpoint reader (checkpoint.py) hands every floating-point tensor it reads to
`check_weight`: one pass (`torch.aminmax`) over a tensor already in memory, cheaper than copying it once.

An activation that turns non-finite while a layer runs (fp16/bf16 overflow: bf16 keeps the range of fp32, fp16
overflows past 65504) is a different failure: the weights are whole but the arithmetic is not. `check_activations`
stops the pass at the first layer whose output holds one, naming it.
"""
import torch

from ..errors import SECompressError


def _first_bad(values: torch.Tensor) -> tuple[int, int, tuple[int, ...]]:
    """(NaN count, Inf count, index of the first non-finite value)."""
    nan, inf = torch.isnan(values), torch.isinf(values)
    first = torch.nonzero(nan | inf)[0].tolist()
    return int(nan.sum()), int(inf.sum()), tuple(first)


def all_finite(values: torch.Tensor) -> bool:
    """No NaN, no +-Inf. torch.aminmax is one vectorized pass with no tensor-sized temporary (NaN propagates to
    both ends, +Inf shows in the max, -Inf in the min): 50x faster than isfinite(t).all() on bf16 on the CPU
    (bench/finite_check.py)."""
    if values.numel() == 0:
        return True
    low, high = torch.aminmax(values)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def check_weight(tensor: torch.Tensor, name: str, shard) -> torch.Tensor:
    """`tensor` unchanged when every value is finite; else one line naming the tensor, its shard and the values."""
    if tensor.is_floating_point() and tensor.element_size() > 1 and not all_finite(tensor):
        nan, inf, first = _first_bad(tensor)
        raise SECompressError(
            f"weight {name} in {shard} holds {nan} NaN and {inf} Inf value(s) (first at index {list(first)}): the "
            f"checkpoint is corrupt, and a model with it would give a wrong answer that looks like one; re-download "
            f"it or restore the file from its source")
    return tensor


def check_activations(hidden: torch.Tensor, layer_idx: int) -> torch.Tensor:
    """`hidden` unchanged when finite; else one line naming the decoder layer whose output went non-finite."""
    if not all_finite(hidden):
        nan, inf, _ = _first_bad(hidden)
        raise SECompressError(
            f"the activations turned non-finite in decoder layer {layer_idx} ({nan} NaN, {inf} Inf in its {hidden.dtype} "
            f"output; the weights read were finite): an overflow of the compute dtype; run in fp32 with --device cpu, "
            f"or check that the checkpoint is the model it claims to be")
    return hidden


def check_module_weights(model: torch.nn.Module, where) -> None:
    """Every parameter of a model loaded whole (transformers' from_pretrained), checked as `check_weight` does; the
    in-memory name is given, and `where` (the checkpoint folder) for the shard."""
    for name, parameter in model.named_parameters():
        check_weight(parameter.detach(), name, where)
