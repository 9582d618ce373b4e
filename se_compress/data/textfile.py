"""The check of a text file given as input (calibration, evaluation text): UTF-8 text, long enough."""
from pathlib import Path

from ..errors import SECompressError
from ..inputs import TEXT_LIMIT, regular_file


def check_text_file(file: Path, what: str = "calibration file", min_bytes: int = 2) -> str:
    """The file's text: UTF-8, mostly printable, not empty, at least `min_bytes` long (a byte-level tokenizer
    makes at most one token per byte, so fewer bytes than tokens needed can never be enough)."""
    file = regular_file(file, what, TEXT_LIMIT)  # no device, FIFO or folder; not gigabytes
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise SECompressError(f"cannot read {what} {file}: {exc.strerror}") from None
    if not data.strip():
        raise SECompressError(f"{what} {file} is empty: pass a text file with some content")
    if b"\x00" in data:
        raise SECompressError(f"{what} {file} is binary (it holds NUL bytes), not text: pass a UTF-8 text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SECompressError(f"{what} {file} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}): "
                              f"pass text, converted to UTF-8 if it is in another encoding") from None
    control = sum(1 for ch in text if not (ch.isprintable() or ch in "\n\r\t\f\v"))
    if control > 0.02 * len(text):
        raise SECompressError(f"{what} {file} is {control / len(text):.0%} control characters: not text; pass a text file")
    if len(data) < min_bytes:
        raise SECompressError(f"{what} {file} has {len(data)} bytes, too few for one sample of {min_bytes} tokens: "
                              f"use a longer text or a smaller --seqlen")
    return text
