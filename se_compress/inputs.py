"""What a file given on the command line may be before a byte of it is read: a regular file of a bounded size.

`/dev/zero` as `--calib` or `--se-report` used to grow memory without a word (3 GB in 38 s), a FIFO hung forever:
`read_bytes()` reads until the end, and those have none. So every input file is stat()ed first: a device, a FIFO,
a socket or a folder is refused, and so is a file larger than what its kind can sensibly be (a report is a few
hundred KB, a recipe a few KB; a calibration text needs a few MB, not gigabytes). Each refusal is one line naming
the file, what it is, and the fix. A limit is a ceiling far above any real input, not a tuning knob.

Only the errors module is imported: models/ and data/ call this too.
"""
import os
import stat
from pathlib import Path

from .errors import SECompressError

MiB = 2**20
REPORT_LIMIT = 64 * MiB       # se_report.json, eval.json, compare.json: ~15 KB for the default model, ~2 MB for 6k experts
RECIPE_LIMIT = 1 * MiB        # a recipe is a dozen lines of YAML
TEXT_LIMIT = 1024 * MiB       # calibration / evaluation text: WikiText-2 is 11 MB; 1 GiB already tokenizes for minutes

_KINDS = [(stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket")]


def _human(size: int) -> str:
    return f"{size / MiB:.0f} MiB" if size >= MiB else f"{size} bytes"


def regular_file(path, what: str, limit: int) -> Path:
    """`path` if it is a regular file (a symbolic link to one is fine) of at most `limit` bytes; else one line."""
    path = Path(path).expanduser()
    try:
        info = os.stat(path)  # follows links: the file that would be read
    except FileNotFoundError:
        raise SECompressError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise SECompressError(f"cannot read {what} {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _KINDS if test(info.st_mode)), "not a regular file")
        raise SECompressError(f"{what} {path} is {kind}, not a regular file: pass a file (se_compress reads inputs "
                              f"whole, and a device or pipe never ends)")
    if info.st_size > limit:
        raise SECompressError(f"{what} {path} is {_human(info.st_size)}, more than the {_human(limit)} such a file "
                              f"can sensibly be: pass the right file, or a cut of it")
    return path


def read_text(path, what: str, limit: int) -> str:
    """The file's text after the kind and size checks (UTF-8 decoding errors are the caller's to explain)."""
    return regular_file(path, what, limit).read_text(encoding="utf-8")


# ---- calibration budget against memory --------------------------------------------------------------------------


def available_memory() -> int | None:
    """Bytes the kernel says a new allocation can get without swapping (MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_activation_memory(samples: int, seqlen: int, hidden_size: int, bytes_per_value: int,
                            available: int | None) -> None:
    """Refuse a calibration set whose activations cannot fit, before the tokenizer runs.

    A streamed pass holds every calibration token's hidden state twice (a layer's inputs and its outputs):
    2 x samples x seqlen x hidden x bytes, a lower bound of what it needs (layer weights, masks and the Python
    process come on top). `--samples 100000` used to run until memory filled."""
    need = 2 * samples * seqlen * hidden_size * bytes_per_value
    if available is not None and need > available:
        fits = max(1, available // (2 * seqlen * hidden_size * bytes_per_value))
        raise SECompressError(f"--samples {samples} x --seqlen {seqlen} needs at least {need / 2**30:.1f} GiB for the "
                              f"activations (2 x tokens x hidden {hidden_size} x {bytes_per_value} bytes), more than "
                              f"the {available / 2**30:.1f} GiB available: use at most --samples {fits} at this --seqlen")


def read_json_report(path, filename: str, what: str, written_by: str) -> dict:
    """A JSON report se_compress wrote (`filename`, `what` it holds), given as the file or the folder holding it; a
    missing or broken file is one line that says which command writes it."""
    import json

    path = Path(path)
    if path.is_dir():
        path = path / filename
    if not path.exists():
        raise SECompressError(f"{what} not found: {path} (run {written_by} first, or pass its {filename})")
    try:
        return json.loads(read_text(path, what, REPORT_LIMIT))  # a device or FIFO: one line, never read
    except FileNotFoundError:
        raise SECompressError(f"{what} not found: {path} (run {written_by} first, or pass its {filename})") from None
    except ValueError:  # UnicodeDecodeError included
        raise SECompressError(f"{path} is not valid JSON: pass the {filename} written by {written_by}") from None
