"""One model, opened once per command: every stage takes this handle, never a path to open again.

`open_model('default' | folder | Hub id)` resolves the name to a local folder (downloading a Hub id once), reads and
checks config.json, checks the weight files' headers (models/files.py), and then hands out, each made on first use
and kept: the checkpoint reader (FP8-block and MXFP4 included, models/formats.py), the transformers config (built
from the config.json already read), the architecture adapter, the tokenizer, and the fingerprint that caches
key on. Placement (device, dtype) stays the command's context (models/placement.py); `handle.placement` asks it.

A handle passed where a name is expected is returned as it is, so a stage called by the driver with the driver's
handle opens nothing, and the same stage called from the CLI or a test with a name opens the model itself.
"""
import hashlib
import json
from functools import cached_property
from pathlib import Path

from ..errors import SECompressError
from .adapters import adapter_for
from .checkpoint import Checkpoint, build_config, resolve_model
from .files import check_weights, read_config
from .placement import current


def load_tokenizer(path: Path, trust_remote_code: bool = False, config=None):
    """The tokenizer of a checkpoint folder; `config` (the transformers config, already read) spares transformers
    reading config.json again to find the tokenizer class."""
    from transformers import AutoTokenizer

    try:
        extra = {"config": config} if config is not None else {}
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **extra)
    except Exception as exc:
        raise SECompressError(f"no usable tokenizer in {path} ({type(exc).__name__}): copy the base model's tokenizer "
                              f"files there") from None


def fingerprint(path: Path) -> str:
    """Changes when the weights or the config change (names, sizes, modification times; no hashing of GBs)."""
    files = sorted(Path(path).glob("*.safetensors")) + [Path(path) / "config.json"]
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()]
    return hashlib.sha1(json.dumps(stats).encode()).hexdigest()[:16]


class ModelHandle:
    """A resolved, checked model folder and what is read from it, each read once (see the module docstring)."""

    def __init__(self, name: str, path: Path, config_dict: dict, allow_pickle: bool = False,
                 trust_remote_code: bool = False):
        self.name, self.path, self.config_dict = str(name), Path(path), config_dict
        self.allow_pickle, self.trust_remote_code = allow_pickle, trust_remote_code

    def __repr__(self) -> str:
        return f"ModelHandle({self.name!r}, {str(self.path)!r})"

    @cached_property
    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self.path, allow_pickle=self.allow_pickle, trust_remote_code=self.trust_remote_code,
                          config_dict=self.config_dict, config=self.config)

    @cached_property
    def config(self):
        """The transformers config (shared with the checkpoint reader: one object, config.json read once)."""
        return build_config(self.path, self.config_dict, self.trust_remote_code)

    @cached_property
    def adapter(self):
        return adapter_for(self.config)

    @cached_property
    def tokenizer(self):
        return load_tokenizer(self.path, self.trust_remote_code, self.config)

    @cached_property
    def fingerprint(self) -> str:
        return fingerprint(self.path)

    @property
    def placement(self):
        return current()


def open_model(model, allow_pickle: bool = False, trust_remote_code: bool = False) -> ModelHandle:
    """A ModelHandle for `model` ('default', a folder, a Hub id), or `model` itself when it is one already."""
    if isinstance(model, ModelHandle):
        return model
    path = resolve_model(str(model), allow_pickle=allow_pickle)
    config_dict = read_config(path)
    check_weights(path, config_dict, allow_pickle)
    return ModelHandle(model, path, config_dict, allow_pickle, trust_remote_code)


def model_name(model) -> str:
    """The name a user gave for `model` (a handle's, or the string itself): what reports print."""
    return model.name if isinstance(model, ModelHandle) else str(model)
