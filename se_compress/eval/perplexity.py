"""WikiText-2 perplexity in the GPTQ convention, streamed one decoder layer at a time.

GPTQ (and the SE paper): the raw test split's rows joined with "\\n\\n", tokenized once, cut into
non-overlapping windows of the model's context; ppl = exp(mean NLL of the predicted tokens). One deviation,
stated in every result: when the tokenizer adds a BOS token, each window is BOS + (seqlen - 1) text tokens,
because such models were trained to see BOS at position 0 (lm-eval does the same with its prefix token).
Qwen3-style tokenizers add none, and their windows are plain.

`layer_hook(layer_idx, layer)` runs after each layer is loaded and before it is used: the ablations and
fake-quantized evaluations change weights there, so the checkpoint on disk is never touched.
"""
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.calibration import EVAL_TEXT, tokenizer_adds_bos
from ..models.checkpoint import Checkpoint
from ..models.streaming import StreamedModel


def wikitext2_test_text() -> str:
    rows = EVAL_TEXT.read_text(encoding="utf-8").splitlines(keepends=True)  # the HF dataset's rows
    return "\n\n".join(rows)


def eval_windows(tokenizer, text: str, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    adds_bos = tokenizer_adds_bos(tokenizer)
    body = seqlen - 1 if adds_bos else seqlen
    n = ids.numel() // body
    if max_windows:
        n = min(n, max_windows)
    windows = ids[: n * body].reshape(n, body)
    if adds_bos:
        windows = torch.cat([torch.full((n, 1), tokenizer.bos_token_id), windows], dim=1)
    return windows


def default_seqlen(config) -> int:
    return min(int(getattr(config, "max_position_embeddings", 2048) or 2048), 2048)


def nll_sum(logits: torch.Tensor, windows: torch.Tensor) -> tuple[float, int]:
    """Summed NLL of tokens 1..L-1 given their prefixes, and the count."""
    pred = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    target = windows[:, 1:].reshape(-1).to(pred.device)
    return F.cross_entropy(pred, target, reduction="sum").item(), target.numel()


@torch.no_grad()
def perplexity_streamed(ckpt: Checkpoint, windows: torch.Tensor, batch_size: int = 16,
                        layer_hook: Callable | None = None, progress: bool = True, model: StreamedModel | None = None,
                        dtype: torch.dtype | None = None) -> dict:
    sm = model or StreamedModel(ckpt, dtype=dtype)
    batches, hidden, layer_args = sm.embed_batches(windows, batch_size)
    for i in tqdm(range(len(sm.layers)), desc="ppl layers", disable=not progress):
        layer = sm.load_layer(i)
        if layer_hook is not None:
            layer_hook(i, layer)
        for b in range(len(batches)):
            hidden[b] = sm.run_layer(i, hidden[b], layer_args[b][i])
        sm.free_layer(i)
    total, count = 0.0, 0
    for h, batch in zip(hidden, batches):
        for j in range(batch.shape[0]):  # one window of logits at a time: [L, vocab] can be large
            s, n = nll_sum(sm.logits(h[j : j + 1]), batch[j : j + 1])
            total, count = total + s, count + n
    return {"ppl": math.exp(total / count), "nll": total / count, "tokens": count, "windows": windows.shape[0],
            "seqlen": windows.shape[1]}


@torch.no_grad()
def perplexity_in_memory(model, windows: torch.Tensor, batch_size: int = 8) -> dict:
    """Same numbers for a model already in memory (a fake-quantized one, a small one)."""
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        batch = windows[i : i + batch_size]
        s, n = nll_sum(model(input_ids=batch.to(model.device), use_cache=False).logits, batch)
        total, count = total + s, count + n
    return {"ppl": math.exp(total / count), "nll": total / count, "tokens": count, "windows": windows.shape[0],
            "seqlen": windows.shape[1]}
