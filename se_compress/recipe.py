"""Recipes: YAML files that name the stages of a compression run, its evaluation and its naive baselines.

    name: qwen3-int4-se-protect
    description: GPTQ W4 g128, SE-aware (noclip + calib); deployable compressed-tensors
    detect: {calib: wikitext2, samples: 64, seqlen: 256}
    stages:
      - quantize: {method: gptq, bits: 4, group_size: 32, se_policy: [noclip, calib]}
    evaluate: {tasks: [wikitext2]}
    baselines: [qwen3-int4-naive]

Validated with pydantic: a typo or a wrong type is one line naming the key, the value and what is allowed.
"""
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import SECompressError
from .inputs import RECIPE_LIMIT, read_text

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DetectOptions(Strict):
    calib: str = "wikitext2"
    samples: int = Field(64, ge=1)
    seqlen: int = Field(256, ge=2)
    seed: int = 0
    quantile: float = Field(0.995, gt=0, lt=1)
    max_fraction: float = Field(0.1, gt=0, le=1)
    layers: str = "auto"


class SizeTarget(Strict):
    fraction: float | None = Field(None, gt=0, lt=1, description="fraction of routed experts removed per layer")
    keep: int | None = Field(None, ge=1, description="experts kept per layer")

    @model_validator(mode="after")
    def one_target(self):
        if (self.fraction is None) == (self.keep is None):
            raise ValueError("give exactly one of fraction or keep")
        return self


class PruneStage(SizeTarget):
    criterion: Literal["frequency", "reap", "ean", "random"] = "reap"
    se_policy: Literal["protect", "none"] = "protect"


class MergeStage(SizeTarget):
    se_policy: Literal["singleton", "none"] = "singleton"


class QuantizeStage(Strict):
    method: Literal["rtn", "gptq"] = "gptq"
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = Field(32, description="32 (the CLI's default too), 64, 128, ... or -1 for per-channel")
    symmetric: bool = True
    se_policy: list[Literal["none", "noclip", "calib", "layer", "keep"]] = ["noclip", "calib"]
    output_format: Literal["pack-quantized", "fake-quant"] = "pack-quantized"
    clip_search: bool = False
    act_order: bool = False
    quantize_attention: bool = True
    layer_bits: int | None = None


class PeerStage(Strict):
    """Another tool's GPTQ on our calibration tokens, in its own venv (se_compress/peers/)."""
    tool: Literal["llmcompressor", "gptqmodel"]
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = 32
    se_export: Literal["none", "int8", "keep"] = Field("none", description="our SE list in the tool's config "
                                                       "(se-compress detect --export): SE experts at 8 bits or bf16")


class ZeroStage(Strict):
    experts: str = Field(..., description="'se', 'random:K' or 'L:E,L:E'")


class AblateStage(Strict):
    draws: int = Field(5, ge=1)
    max_windows: int | None = Field(None, ge=1)
    text: str = Field("wikitext2", description="perplexity text: wikitext2, books or a text file")


STAGE_KINDS = ("prune", "merge", "quantize", "zero", "ablate", "peer")


class Stage(Strict):
    prune: PruneStage | None = None
    merge: MergeStage | None = None
    quantize: QuantizeStage | None = None
    zero: ZeroStage | None = None
    ablate: AblateStage | None = None
    peer: PeerStage | None = None

    @model_validator(mode="after")
    def exactly_one(self):
        given = [k for k in STAGE_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("each stage is exactly one of " + ", ".join(STAGE_KINDS))
        return self

    @property
    def kind(self) -> str:
        return next(k for k in STAGE_KINDS if getattr(self, k) is not None)

    @property
    def options(self):
        return getattr(self, self.kind)


class EvaluateOptions(Strict):
    tasks: list[str] = ["wikitext2", "sink"]
    limit: int | None = Field(None, ge=1, description="at most N examples per lm-eval task")
    seqlen: int | None = Field(None, ge=2, description="perplexity window (default: the model's context)")
    max_windows: int | None = Field(None, ge=1, description="only the first N perplexity windows")


class Recipe(Strict):
    name: str
    description: str = ""
    model: str | None = None
    device: str = Field("auto", description="auto (CUDA when available), cpu, cuda or cuda:N; --device overrides it")
    detect: DetectOptions = DetectOptions()
    stages: list[Stage] = Field(..., min_length=1)
    evaluate: EvaluateOptions = EvaluateOptions()
    baselines: list[str] = []


def _section_keys(loc) -> list[str]:
    """The keys allowed in the section that holds loc[-1]."""
    import typing

    cls = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        annotation = cls.model_fields[part].annotation
        candidates = [annotation] + list(typing.get_args(annotation))
        candidates += [a for c in candidates for a in typing.get_args(c)]
        cls = next(c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel))
    return list(cls.model_fields)


def _explain(exc: ValidationError, source: str) -> str:
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")  # a typo explains a missing key
    err = errors[0]
    where = ".".join(str(p) for p in err["loc"]) or "recipe"
    value = err.get("input")
    if err["type"] == "extra_forbidden":
        return f"{source}: unknown key '{where}'; allowed here: {', '.join(_section_keys(err['loc']))}"
    if err["type"] == "literal_error":
        allowed = err.get("ctx", {}).get("expected", "")
        return f"{source}: '{where}' is {value!r}; allowed: {allowed}"
    return f"{source}: '{where}': {err['msg']} (got {value!r})"


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str) -> Recipe:
    path = Path(name_or_path)
    if not path.exists():
        path = RECIPES_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise SECompressError(f"recipe '{name_or_path}' not found: use a file or one of {', '.join(available_recipes())}")
    try:
        data = yaml.safe_load(read_text(path, "recipe", RECIPE_LIMIT))  # a device or FIFO: one line, never read
    except UnicodeDecodeError:
        raise SECompressError(f"recipe {path} is not UTF-8 text: pass a YAML recipe") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise SECompressError(f"recipe {path} is not valid YAML ({line.strip() or 'syntax'}): fix the syntax") from None
    if not isinstance(data, dict):
        raise SECompressError(f"recipe {path} must be a YAML mapping with name, stages, ...")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise SECompressError(_explain(exc, str(path))) from None
