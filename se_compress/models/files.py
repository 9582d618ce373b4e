"""The checks of a checkpoint folder's files, beside their readers: config.json parses and names a supported
architecture, the safetensors files are whole, pickle files are PyTorch's own format, every promised layer has
weights. Cheap: headers and the first bytes only, no tensor is read."""
import json
import struct
import zipfile
from pathlib import Path

from ..errors import SECompressError
from .consistency import check_consistency, read_shapes
from .adapters import ADAPTERS


def check_safetensors_file(path: Path) -> None:
    """Raise a one-line error if the file is not a whole safetensors file (truncated download, wrong file)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SECompressError(f"corrupt safetensors file {path}: {size} bytes, no header; re-download it")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise SECompressError(f"corrupt safetensors file {path}: header runs past the end; re-download it")
        try:
            header = json.loads(f.read(header_len))
        except ValueError:
            raise SECompressError(f"corrupt safetensors file {path}: unreadable header; re-download it") from None
    data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + data_end > size:
        raise SECompressError(
            f"corrupt safetensors file {path}: {size} bytes, the header needs {8 + header_len + data_end} "
            f"(truncated download?); re-download it"
        )


def read_config(path: Path) -> dict:
    """config.json of a checkpoint folder, parsed, with a supported model_type."""
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
            other = sorted({f.suffix for f in path.iterdir() if f.suffix in (".gguf", ".ggml", ".onnx", ".msgpack",
                                                                             ".h5", ".npz", ".pte")})
            found = f" (it holds {', '.join(other)} files, a format se_compress does not read)" if other else ""
            raise SECompressError(f"no weight files (*.safetensors) in {path}{found}: pass the Hugging Face "
                                  f"checkpoint folder (config.json and *.safetensors)")
        if not allow_pickle:
            raise SECompressError(f"{path} has only pickle weights ({pickles[0].name}); pickle can run code when loaded: "
                                  f"convert to safetensors or pass --allow-pickle if you trust the source")
        for f in pickles:
            check_pickle_file(f)
        return
    keys = [k for f in safetensors for k in _safetensors_keys(f)]
    prefix = "model.layers."
    present = {int(k[len(prefix):].split(".")[0]) for k in keys if k.startswith(prefix) and k[len(prefix):].split(".")[0].isdigit()}
    if present:
        absent = [i for i in range(config["num_hidden_layers"]) if i not in present]
        if absent:
            held = sorted(present)
            if absent[0] > held[-1]:  # the weights simply end early: a config promising more layers than they hold
                raise SECompressError(f"config.json num_hidden_layers is {config['num_hidden_layers']}, but the weights "
                                      f"in {path} hold layers 0-{held[-1]} ({held[-1] + 1} layers): restore the "
                                      f"checkpoint's own config.json, or re-download it if a shard is missing")
            raise SECompressError(f"the weights in {path} have no tensors for layer(s) {absent[:5]}"
                                  f"{' ...' if len(absent) > 5 else ''} of the {config['num_hidden_layers']} in "
                                  f"config.json: a shard is missing or the checkpoint is incomplete; re-download it")
    check_consistency(path, config, read_shapes(safetensors))  # config vs tensor shapes (consistency.py)
