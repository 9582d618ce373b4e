"""Perplexity in the GPTQ convention, streamed one decoder layer at a time, on a named text.

Texts (`--text`): `wikitext2`, WikiText-2 raw test (the SE paper's set); `books`, the two public-domain books held
out of the default model's training (its in-domain text: a model trained on 19th-century books finds Wikipedia
out of domain, and its dependence on its Super Experts shows on the books); or any UTF-8 text file.

GPTQ (and the SE paper): the raw test split's rows joined with "\\n\\n", tokenized once, cut into
non-overlapping windows of the model's context; ppl = exp(mean NLL of the predicted tokens). One deviation,
stated in every result: when the tokenizer adds a BOS token, each window is BOS + (seqlen - 1) text tokens,
because such models were trained to see BOS at position 0 (lm-eval does the same with its prefix token).
Qwen3-style tokenizers add none, and their windows are plain.

`layer_hook(layer_idx, layer)` runs after each layer is loaded and before it is used: the ablations and
fake-quantized evaluations change weights there, so the checkpoint on disk is never touched.
"""
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.calibration import EVAL_TEXT, TEXT_DIR, tokenizer_adds_bos
from ..errors import SECompressError
from ..models.checkpoint import Checkpoint
from ..models.runner import stream_layers
from ..models.streaming import StreamedModel


def wikitext2_test_text() -> str:
    rows = EVAL_TEXT.read_text(encoding="utf-8").splitlines(keepends=True)  # the HF dataset's rows
    return "\n\n".join(rows)


# The default model's held-out books, in file-name order (see data/text/SOURCES.md).
BOOK_FILES = (TEXT_DIR / "pg974_joseph-conrad_the-secret-agent.txt", TEXT_DIR / "pg98_charles-dickens_a-tale-of-two-cities.txt")
NAMED_TEXTS = ("wikitext2", "books")


@dataclass(frozen=True)
class EvalText:
    key: str  # where results are filed: 'wikitext2', 'books' or 'file:<name>'
    label: str  # what reports say was measured
    text: str


def books_text() -> str:
    return "\n\n".join(path.read_text(encoding="utf-8").strip() for path in BOOK_FILES)


def eval_text(spec: str) -> EvalText:
    """The text `--text SPEC` names: wikitext2, books, or a UTF-8 text file."""
    if spec == "wikitext2":
        return EvalText("wikitext2", "WikiText-2 raw test (shipped), rows joined with \\n\\n", wikitext2_test_text())
    if spec == "books":
        return EvalText("books", "held-out books: The Secret Agent + A Tale of Two Cities (shipped), joined with \\n\\n",
                        books_text())
    path = Path(spec).expanduser()
    if not path.is_file():
        raise SECompressError(f"--text '{spec}' is neither wikitext2, books nor a text file: use one of those")
    from ..data.textfile import check_text_file

    text = check_text_file(path, what="--text file")  # UTF-8, printable, not empty: one line otherwise
    return EvalText(f"file:{path.name}", f"text file {path}", text)


def text_windows(tokenizer, text: EvalText, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """eval_windows, refusing a text too short for one window."""
    windows = eval_windows(tokenizer, text.text, seqlen, max_windows)
    if windows.shape[0] == 0:
        raise SECompressError(f"{text.key}: the text is shorter than one window of {seqlen} tokens; pass a longer text "
                              f"or a smaller --seqlen")
    return windows


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

    def accumulators(i, layer):
        if layer_hook is not None:
            layer_hook(i, layer)
        return []

    batches, hidden = stream_layers(sm, windows, batch_size, accumulators, progress=progress, desc="ppl layers")
    window_nll, count = [], 0
    for h, batch in zip(hidden, batches):
        for j in range(batch.shape[0]):  # one window of logits at a time: [L, vocab] can be large
            s, n = nll_sum(sm.logits(h[j : j + 1]), batch[j : j + 1])
            window_nll.append(s)
            count += n
    return _result(window_nll, count, windows)


def _result(window_nll: list[float], count: int, windows: torch.Tensor) -> dict:
    """ppl over all windows, and each window's summed NLL (for paired intervals, eval/intervals.py) with a hash of
    the windows' token ids (intervals pair only results measured on the same windows)."""
    total = sum(window_nll)
    return {"ppl": math.exp(total / count), "nll": total / count, "tokens": count, "windows": windows.shape[0],
            "seqlen": windows.shape[1], "window_nll": window_nll,
            "window_ids_sha1": hashlib.sha1(windows.to(torch.int64).numpy().tobytes()).hexdigest()}


@torch.no_grad()
def perplexity_in_memory(model, windows: torch.Tensor, batch_size: int = 8) -> dict:
    """Same numbers for a model already in memory (a fake-quantized one, a small one)."""
    window_nll, count = [], 0
    for i in range(0, windows.shape[0], batch_size):
        batch = windows[i : i + batch_size]
        logits = model(input_ids=batch.to(model.device), use_cache=False).logits
        for j in range(batch.shape[0]):
            s, n = nll_sum(logits[j : j + 1], batch[j : j + 1])
            window_nll.append(s)
            count += n
    return _result(window_nll, count, windows)
