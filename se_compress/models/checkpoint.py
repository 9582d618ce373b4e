"""Finding a model and reading its weights tensor by tensor, without loading the whole checkpoint."""
from functools import cached_property
from pathlib import Path

import torch

from ..errors import SECompressError
from .files import check_pickle_file, check_safetensors_file, read_config
from .finite import check_weight
from .formats import stored_format

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "default_model" / "weights"
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]


def resolve_model(name: str, allow_pickle: bool = False) -> Path:
    """'default', a local checkpoint folder, or a Hugging Face Hub id -> a local folder."""
    if name == "default":
        if not (DEFAULT_MODEL_DIR / "config.json").exists():
            raise SECompressError(f"the shipped default model is missing from {DEFAULT_MODEL_DIR}: reinstall se_compress")
        return DEFAULT_MODEL_DIR
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SECompressError(f"model path {path} is a file: pass the checkpoint folder that holds config.json")
        if not (path / "config.json").exists():
            raise SECompressError(f"no config.json in {path}: pass a Hugging Face checkpoint folder")
        return path
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise SECompressError(f"model folder not found: {name} (pass an existing folder, a Hub id like org/name, or 'default')")
    from huggingface_hub import snapshot_download

    patterns = HUB_FILES + (["*.bin", "*.pt"] if allow_pickle else [])
    try:
        return Path(snapshot_download(repo_id=name, allow_patterns=patterns))
    except Exception as exc:  # the hub client raises many types; the user needs one line
        raise SECompressError(
            f"could not get '{name}' from the Hugging Face Hub ({type(exc).__name__}): check the id and the network, "
            f"or pass a local folder"
        ) from None


def build_config(path: Path, config_dict: dict, trust_remote_code: bool = False):
    """The transformers config of a checkpoint folder from its config.json, already read and checked (read_config):
    what AutoConfig.from_pretrained makes of the file, without reading it again (custom code: AutoConfig itself)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if "auto_map" not in config_dict:
        config = CONFIG_MAPPING[config_dict["model_type"]].from_dict(dict(config_dict))
        config._name_or_path = str(path)
        return config
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise SECompressError(f"{path} needs custom code to load; pass --trust-remote-code if you trust it") from None
        raise SECompressError(f"cannot read {Path(path) / 'config.json'}: {str(exc).splitlines()[0]}") from None


class Checkpoint:
    """A local checkpoint folder: its config and a name -> tensor reader over its weight files.

    FP8-block and MXFP4 checkpoints are shown dequantized under the in-memory names (see formats.py); `stored_map` and
    `get_stored` give the tensors as they are on disk. Any other quantized checkpoint is refused here, unless `raw`
    (read the stored tensors as they are, whatever they hold: for tests and inspection)."""

    def __init__(self, path: Path, allow_pickle: bool = False, trust_remote_code: bool = False, raw: bool = False,
                 config_dict: dict | None = None, config=None):
        """`config_dict`, `config`: config.json as already read and checked, and the transformers config built from it
        (models/handle.py), so that neither is read again."""
        self.path = Path(path)
        self.trust_remote_code = trust_remote_code
        self._config_dict = config_dict
        if config is not None:
            self.__dict__["config"] = config  # the cached_property below, already known
        safetensors = sorted(self.path.glob("*.safetensors"))
        pickles = sorted(self.path.glob("*.bin")) + sorted(self.path.glob("*.pt"))
        if not safetensors and pickles and not allow_pickle:
            raise SECompressError(
                f"{self.path} has only pickle weights ({pickles[0].name}); pickle can run code when loaded: "
                f"convert to safetensors or pass --allow-pickle if you trust the source"
            )
        if not safetensors and not pickles:
            raise SECompressError(f"no weight files (*.safetensors) in {self.path}")
        self.files = safetensors or pickles
        self.is_safetensors = bool(safetensors)
        self.weight_map: dict[str, Path] = {}
        if self.is_safetensors:
            from safetensors import safe_open

            for f in self.files:
                check_safetensors_file(f)
                with safe_open(f, "pt") as handle:
                    for key in handle.keys():
                        self.weight_map[key] = f
        else:
            self._pickled = {}
            for f in self.files:
                check_pickle_file(f)  # any other pickle: one line, never handed to torch.load
                try:
                    state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                except Exception as exc:  # noqa: BLE001: torch raises many types for a file it cannot read
                    raise SECompressError(f"cannot read {f} as PyTorch weights ({type(exc).__name__}): convert the "
                                          f"checkpoint to safetensors, or re-download it") from None
                self._pickled.update(state)
                self.weight_map.update({k: f for k in state})
        self._handles = {}
        self.stored_map = dict(self.weight_map)
        self.format = None if raw else stored_format(self.path, config_dict)
        self._derived = {}
        if self.format is not None:
            self._derived = self.format.derived(self.stored_map)
            for name, sources in self._derived.items():
                for key in sources:
                    self.weight_map.pop(key, None)
                self.weight_map[name] = self.stored_map[sources[0]]
            for key in self.format.hidden(self.stored_map):
                self.weight_map.pop(key, None)

    @cached_property
    def config(self):
        """The transformers config (one given to the constructor, else built from config.json: models/handle.py)."""
        config_dict = self._config_dict if self._config_dict is not None else read_config(self.path)
        return build_config(self.path, config_dict, self.trust_remote_code)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name` as the model computes with it (dequantized where the checkpoint stores it quantized)."""
        if name in self._derived:  # a stored FP8/MXFP4 code's NaN shows in the value it dequantizes to
            value = self.format.dequantize(*(self.get_stored(k) for k in self._derived[name]), name=name)
            return check_weight(value, name, self.stored_map[self._derived[name][0]].name)
        return self.get_stored(name)

    def get_stored(self, name: str) -> torch.Tensor:
        """The tensor `name` exactly as stored on disk."""
        f = self.stored_map[name]
        if not self.is_safetensors:
            return check_weight(self._pickled[name], name, f.name)
        from safetensors import safe_open

        if f not in self._handles:
            self._handles[f] = safe_open(f, "pt")
        return check_weight(self._handles[f].get_tensor(name), name, f.name)  # NaN/Inf: one line (finite.py)

    def release(self) -> None:
        """Drop the open (memory-mapped) files: pages read so far would otherwise stay mapped and count in RSS."""
        self._handles = {}

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)
