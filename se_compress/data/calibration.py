"""Calibration samples: N sequences of L tokens, deterministic for a seed, each starting where the model
expects a sequence to start.

Super Experts fire on the first token and on delimiters, so every sample begins at a line/document start,
preceded by the tokenizer's BOS token when the tokenizer adds one (Qwen3 adds none; Llama-style ones do).
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import SECompressError

TEXT_DIR = Path(__file__).resolve().parent / "text"
SHIPPED = {
    "wikitext2": TEXT_DIR / "wikitext2-valid.txt",
    "c4": TEXT_DIR / "c4-sample.txt",
}
EVAL_TEXT = TEXT_DIR / "wikitext2-test.txt"


def load_text(name_or_file: str) -> tuple[str, str]:
    """(text, source description). A shipped set name, a local text file, or a Hub dataset 'org/name[:split]'."""
    if name_or_file in SHIPPED:
        return SHIPPED[name_or_file].read_text(encoding="utf-8"), f"shipped:{name_or_file}"
    path = Path(name_or_file).expanduser()
    if path.exists():
        from .textfile import check_text_file

        return check_text_file(path), str(path)  # UTF-8, printable, not empty: random bytes are not calibration
    if "/" in name_or_file and not name_or_file.startswith((".", "/", "~")):
        return _hub_dataset_text(name_or_file), f"hub:{name_or_file}"
    raise SECompressError(
        f"calibration '{name_or_file}' not found: use {' or '.join(SHIPPED)}, a text file, or a Hub dataset org/name[:split]"
    )


def _hub_dataset_text(spec: str) -> str:
    name, _, split = spec.partition(":")
    try:
        import datasets
    except ImportError:
        raise SECompressError(f"Hub dataset '{name}' needs the datasets package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:
        raise SECompressError(f"could not load Hub dataset '{name}' ({type(exc).__name__}): check name and network") from None
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return "\n".join(str(t) for t in ds[column][:20000])


@dataclass
class Calibration:
    input_ids: torch.Tensor  # [N, L]
    source: str
    seed: int
    adds_bos: bool

    def describe(self) -> dict:
        n, length = self.input_ids.shape
        return {"source": self.source, "samples": n, "seqlen": length, "tokens": n * length, "seed": self.seed,
                "starts_with_bos": self.adds_bos}


def tokenizer_adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def build_calibration(tokenizer, name_or_file: str, samples: int, seqlen: int, seed: int) -> Calibration:
    if samples < 1 or seqlen < 2:
        raise SECompressError(f"need --samples >= 1 and --seqlen >= 2 (got {samples}, {seqlen})")
    text, source = load_text(name_or_file)
    lines = [line for line in text.split("\n") if line.strip()]
    # Tokenize line by line (newline kept) so sample starts can be placed at line starts.
    encoded = tokenizer([line + "\n" for line in lines], add_special_tokens=False)["input_ids"]
    starts = np.cumsum([0] + [len(ids) for ids in encoded[:-1]])
    stream = np.fromiter((t for ids in encoded for t in ids), dtype=np.int64)
    adds_bos = tokenizer_adds_bos(tokenizer)
    body = seqlen - 1 if adds_bos else seqlen
    usable = starts[starts + body <= len(stream)]
    if len(usable) == 0:
        raise SECompressError(
            f"calibration text {source} has {len(stream)} tokens, fewer than one sample of {seqlen}: "
            f"use a longer text or a smaller --seqlen"
        )
    if len(usable) < samples:
        # Drawing with replacement would repeat samples while the report says "N samples": a one-line text gave
        # 64 copies of one sequence. Every sample is a distinct line start, or the budget is refused.
        shape = ("it is one line, and a sample starts only at a line start" if len(lines) == 1 else
                 f"{len(lines)} lines, {len(usable)} of them followed by {body} tokens")
        raise SECompressError(
            f"calibration text {source} has {len(usable)} distinct sample start(s) for --samples {samples} x --seqlen "
            f"{seqlen} ({shape}): samples would repeat; use a longer text with more lines, fewer --samples or a "
            f"shorter --seqlen")
    rng = np.random.default_rng(seed)
    picks = rng.choice(usable, size=samples, replace=False)
    rows = [stream[s : s + body] for s in picks]
    if adds_bos:
        rows = [np.concatenate([[tokenizer.bos_token_id], r]) for r in rows]
    return Calibration(torch.tensor(np.stack(rows)), source, seed, adds_bos)
