"""Every command's options and inputs, checked before any model work: one line naming the problem and the fix,
exit status 2, nothing written.

Cheap by design (it runs before a 25-40 s detection pass): it reads config.json, the safetensors headers, the
first bytes of pickle files and the calibration text, and probes the output location (output.py); it never builds
a model or a tokenizer. What can only fail later (disk full, a folder made read-only meanwhile, a kill) is caught
where it happens and still ends in one line with nothing that looks complete (export/writer.py, output.py, cli.py).

- Numbers: argparse `type=` helpers below, so `--samples 0` or `--quantile -1` is refused while parsing.
- Paths: the model folder (config.json parses, model_type supported, weights whole), calibration text (UTF-8,
  printable, long enough), JSON reports given as inputs, and the output location (output.check_output).
- Layer lists inside the model's depth.
- config.json against the safetensors headers' shapes (models/consistency.py); every input file a regular file of a
  bounded size (inputs.py); the calibration activations within the memory available.
"""
import argparse
import json
import re
from pathlib import Path

from .data.textfile import check_text_file
from .errors import SECompressError
from .inputs import read_json_report
from .models.files import check_pickle_file, check_weights, read_config

# ---- numbers: argparse types (an ArgumentTypeError becomes one line through OneLineParser) ----------------------


def _number(kind, text):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a {'whole ' if kind is int else ''}number") from None


def positive_int(text: str) -> int:
    """1, 2, 3, ... (a count: 0 never means 'all')."""
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, a whole number (got {value}; 0 never means 'all')")
    return value


def non_negative_int(text: str) -> int:
    value = _number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, a whole number (got {value})")
    return value


def sequence_length(text: str) -> int:
    """Tokens per sequence: at least 2 (one token predicts nothing)."""
    value = _number(int, text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 tokens (got {value})")
    return value


def positive_float(text: str) -> float:
    value = _number(float, text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number above 0 (got {text})")
    return value


def open_fraction(text: str) -> float:
    """Strictly between 0 and 1 (a share of experts removed, a quantile)."""
    value = _number(float, text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), both ends excluded (got {text})")
    return value


def fraction_up_to_one(text: str) -> float:
    value = _number(float, text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (got {text})")
    return value


def group_size(text: str) -> int:
    """32, 64, 128, ... weights per scale, or 'channel' (one scale per row, returned as 0). A count is at least 1:
    0 (or -1, other tools' spelling) never silently means per-channel; 'channel' says it."""
    if text in ("channel", "per-channel"):
        return 0
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a number like 128, or 'channel' for one scale per row (got '{text}'; "
                                         f"0 never means per-channel)")
    return int(text)


class OneLineParser(argparse.ArgumentParser):
    """argparse prints the usage block and then the error; se_compress prints one line (and where to get help)."""

    def error(self, message):
        message = re.sub(r"^argument ([^:]+): ", r"\1 ", message)  # "--samples must be ..." reads as one sentence
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default in --help, unless the help text already says it (or there is none to show)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (default in (None, False, argparse.SUPPRESS) or default == [] or "%(default)" in text or "(default" in text
                or not (action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE))):
            return text
        return f"{text} (default: %(default)s)"


# ---- the model folder: the checks live beside the readers (models/files.py); here they are orchestrated

def check_model(model: str, allow_pickle: bool = False) -> tuple[Path, dict]:
    """'default', a folder or a Hub id -> (local folder, its config.json), the folder's shape checked."""
    from .models.checkpoint import resolve_model

    path = resolve_model(model, allow_pickle=allow_pickle)
    config = read_config(path)
    check_weights(path, config, allow_pickle)
    return path, config


# ---- text ------------------------------------------------------------------------------------------------------


def check_calibration(name: str, seqlen: int | None = None) -> None:
    """A shipped set, a readable text file, or something shaped like a Hub dataset id (fetched later)."""
    from .data.calibration import SHIPPED

    if name in SHIPPED:
        return
    path = Path(name).expanduser()
    if path.exists():
        check_text_file(path, min_bytes=max(2, (seqlen or 2) - 1))
        return
    looks_like_file = path.suffix.lower() in (".txt", ".text", ".md", ".json", ".jsonl", ".csv", ".tsv", ".parquet")
    if "/" in name and not name.startswith((".", "/", "~")) and name.count("/") == 1 and not looks_like_file:
        return  # org/name: a Hub dataset (a file name like data/train.txt is a missing file, not 30 s of Hub retries)
    raise SECompressError(f"calibration '{name}' not found: use {' or '.join(SHIPPED)}, a text file, or a Hub dataset "
                          f"org/name[:split]")


def check_calibration_memory(samples: int, seqlen: int, config: dict, device: str | None) -> None:
    """The calibration activations fit in memory (inputs.check_activation_memory): fp32 on the CPU; bf16 on a GPU,
    where they may also wait in host memory."""
    from .inputs import available_memory, check_activation_memory

    hidden = config.get("hidden_size")
    if not isinstance(hidden, int) or hidden < 1:
        return  # consistency.py names a bad hidden_size
    available, bytes_per_value = available_memory(), 4
    if str(device or "auto").lower() != "cpu":
        import torch

        if torch.cuda.is_available() and available is not None:
            bytes_per_value = 2
            available += torch.cuda.get_device_properties(0).total_memory
    check_activation_memory(samples, seqlen, hidden, bytes_per_value, available)


# ---- layers ----------------------------------------------------------------------------------------------------


def check_layers(spec: str, num_layers: int | None) -> None:
    """--layers auto|paper|all|'1,2,3', every listed layer inside the model."""
    if spec in ("auto", "paper", "all"):
        return
    parts = [x.strip() for x in spec.split(",")]
    if not parts or not all(x.isdigit() for x in parts):
        raise SECompressError(f"--layers must be auto, paper, all or a list like 1,2,3 (got '{spec}')")
    if num_layers is not None:
        outside = [int(x) for x in parts if int(x) >= num_layers]
        if outside:
            raise SECompressError(f"--layers {spec}: layer {outside[0]} is beyond the model, which has {num_layers} "
                                  f"layers (0..{num_layers - 1})")


# ---- a command's arguments -------------------------------------------------------------------------------------


def check_args(args) -> None:
    """Everything about a parsed command line that can be checked without model work. Fills in args.out with the
    command's default output (args.default_out) so the command writes exactly where it was checked."""
    from .output import check_output, probe_writable

    path = config = None
    if getattr(args, "model", None) is not None and getattr(args, "checks_model", False):
        path, config = check_model(args.model, getattr(args, "allow_pickle", False))
    if getattr(args, "checkpoint", None) is not None:  # push: a local folder it writes README.md into
        from .publish import _check_folder

        path = _check_folder(args.checkpoint)
        config = read_config(path)
        check_weights(path, config, allow_pickle=False)
        probe_writable(path, path)
    if getattr(args, "calib", None):
        check_calibration(args.calib, getattr(args, "seqlen", None))
    if config and getattr(args, "samples", None) and getattr(args, "seqlen", None):
        check_calibration_memory(args.samples, args.seqlen, config, getattr(args, "device", None))
    if getattr(args, "layers", None):
        check_layers(args.layers, config["num_hidden_layers"] if config else None)
    for attr, filename, what, writer in (("se_report", "se_report.json", "SE report", "se-compress detect"),
                                         ("baseline", "eval.json", "eval results", "se-compress eval")):
        if getattr(args, attr, None):
            if not isinstance(read_json_report(getattr(args, attr), filename, what, writer), dict):
                raise SECompressError(f"{getattr(args, attr)} is not the {filename} written by {writer}")
    kind = getattr(args, "output_kind", None)
    if kind:
        if getattr(args, "out", None) is None:
            args.out = str(args.default_out(args, path))
        check_output(args.out, inputs=[path] if path else [], force=getattr(args, "force", False), kind=kind)
