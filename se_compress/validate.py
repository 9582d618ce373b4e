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
import struct
import zipfile
from pathlib import Path

from .errors import SECompressError, read_json_report

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


# ---- the model folder ------------------------------------------------------------------------------------------


def read_config(path: Path) -> dict:
    """config.json of a checkpoint folder, parsed, with a supported model_type."""
    from .models.adapters import ADAPTERS

    file = Path(path) / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise SECompressError(f"{file} is not UTF-8 text: pass the checkpoint's real config.json") from None
    except ValueError as exc:
        raise SECompressError(f"{file} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}): "
                              f"fix it or re-download the checkpoint") from None
    except OSError as exc:
        raise SECompressError(f"cannot read {file}: {exc.strerror}") from None
    if not isinstance(config, dict):
        raise SECompressError(f"{file} is not a model config (a JSON object): re-download the checkpoint")
    model_type = config.get("model_type")
    if model_type not in ADAPTERS:
        what = f"'{model_type}'" if model_type else "(no model_type in config.json)"
        raise SECompressError(f"unsupported architecture {what}: se_compress supports {', '.join(sorted(ADAPTERS))}")
    layers = config.get("num_hidden_layers")
    if not isinstance(layers, int) or layers < 1:
        raise SECompressError(f"{file}: num_hidden_layers is {layers!r}, not a positive number: fix the config")
    return config


def _safetensors_keys(file: Path) -> list[str]:
    from .models.checkpoint import check_safetensors_file

    check_safetensors_file(file)  # truncated or not safetensors: one line
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return [k for k in json.loads(f.read(size)) if k != "__metadata__"]


def check_pickle_file(file: Path) -> None:
    """A PyTorch weights file as torch.save writes it (a zip holding data.pkl); any other pickle is refused before
    torch.load sees it."""
    try:
        with zipfile.ZipFile(file) as archive:
            if any(name.endswith("data.pkl") for name in archive.namelist()):
                return
    except (zipfile.BadZipFile, OSError):
        pass
    raise SECompressError(f"{file} is not a PyTorch weights file (torch.save's zip format with data.pkl): convert the "
                          f"checkpoint to safetensors, or re-download it")


def check_weights(path: Path, config: dict, allow_pickle: bool) -> None:
    """Weight files present, whole, and holding every decoder layer the config promises."""
    path = Path(path)
    safetensors = sorted(path.glob("*.safetensors"))
    pickles = sorted(path.glob("*.bin")) + sorted(path.glob("*.pt"))
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            listed = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise SECompressError(f"{index} is not a valid safetensors index: re-download the checkpoint") from None
        missing = sorted(f for f in listed if not (path / f).exists())
        if missing:
            raise SECompressError(f"{path} lacks {len(missing)} weight file(s) listed in its index ({missing[0]}, ...): "
                                  f"the download is incomplete; re-download it")
    if not safetensors:
        if not pickles:
            raise SECompressError(f"no weight files (*.safetensors) in {path}")
        if not allow_pickle:
            raise SECompressError(f"{path} has only pickle weights ({pickles[0].name}); pickle can run code when loaded: "
                                  f"convert to safetensors or pass --allow-pickle if you trust the source")
        for f in pickles:
            check_pickle_file(f)
        return
    keys = [k for f in safetensors for k in _safetensors_keys(f)]
    from .models.consistency import check_consistency, read_shapes

    prefix = "model.layers."
    present = {int(k[len(prefix):].split(".")[0]) for k in keys if k.startswith(prefix) and k[len(prefix):].split(".")[0].isdigit()}
    if present:
        absent = [i for i in range(config["num_hidden_layers"]) if i not in present]
        if absent:
            raise SECompressError(f"the weights in {path} have no tensors for layer(s) {absent[:5]}"
                                  f"{' ...' if len(absent) > 5 else ''} of the {config['num_hidden_layers']} in "
                                  f"config.json: a shard is missing or the checkpoint is incomplete; re-download it")
    check_consistency(path, config, read_shapes(safetensors))  # config vs tensor shapes (models/consistency.py)


def check_model(model: str, allow_pickle: bool = False) -> tuple[Path, dict]:
    """'default', a folder or a Hub id -> (local folder, its config.json), the folder's shape checked."""
    from .models.checkpoint import resolve_model

    path = resolve_model(model, allow_pickle=allow_pickle)
    config = read_config(path)
    check_weights(path, config, allow_pickle)
    return path, config


# ---- text ------------------------------------------------------------------------------------------------------


def check_text_file(file: Path, what: str = "calibration file", min_bytes: int = 2) -> str:
    """The file's text: UTF-8, mostly printable, not empty, at least `min_bytes` long (a byte-level tokenizer
    makes at most one token per byte, so fewer bytes than tokens needed can never be enough)."""
    from .inputs import TEXT_LIMIT, regular_file

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


def check_calibration(name: str, seqlen: int | None = None) -> None:
    """A shipped set, a readable text file, or something shaped like a Hub dataset id (fetched later)."""
    from .data.calibration import SHIPPED

    if name in SHIPPED:
        return
    path = Path(name).expanduser()
    if path.exists():
        check_text_file(path, min_bytes=max(2, (seqlen or 2) - 1))
        return
    if "/" in name and not name.startswith((".", "/", "~")) and name.count("/") == 1:
        return
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
