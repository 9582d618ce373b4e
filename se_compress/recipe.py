"""Recipes: YAML files that name the stages of a compression run, its evaluation and its naive baselines.

    name: qwen3-int4-se-protect
    description: GPTQ W4 g128, SE-aware (noclip + calib); deployable compressed-tensors
    detect: {calib: wikitext2, samples: 64, seqlen: 256}
    stages:
      - quantize: {method: gptq, bits: 4, group_size: 32, se_policy: [noclip, calib]}
    evaluate: {tasks: [wikitext2]}
    baselines: [qwen3-int4-naive]

Validated with pydantic: a typo or a wrong type is one line naming the key, the value and what is allowed.

The option models below are the one declaration of each stage's options: the recipe keys are their fields, the
CLI flags are made from them (options.py: name, type, default, bounds, choices, and `description` as the help
text; json_schema_extra `flag` where the CLI spells a field otherwise), and the comparison table reads their
describe(). A new option is a new field here, nowhere else.
"""
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import SECompressError
from .eval.tasks import DEFAULT_TASKS
from .inputs import RECIPE_LIMIT, read_text

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CalibrationOptions(Strict):
    """The calibration tokens every stage's statistics pass reads (a recipe's `detect:` section)."""
    calib: str = Field("wikitext2", description="calibration text: 'wikitext2' (valid split, shipped), 'c4' (shipped "
                       "sample), a text file, or a Hub dataset org/name[:split]")
    samples: int = Field(64, ge=1, description="number of calibration sequences")
    seqlen: int = Field(256, ge=2, description="tokens per calibration sequence")
    seed: int = Field(0, ge=0, description="seed for picking calibration sequences")


class DetectOptions(CalibrationOptions):
    quantile: float = Field(0.995, gt=0, lt=1, description="a(l,e) must exceed this quantile of all a (paper: 0.995)")
    max_fraction: float = Field(0.1, gt=0, le=1, description="a(l,e) must exceed max(a) times this (paper: 0.1)")
    layers: str = Field("auto", description="layers the rule applies to: auto (where massive activations are seen), "
                        "paper (first 75%), all, or '1,2,3'")
    massive_ratio: float = Field(100.0, gt=0, description="auto layers: max|h| >= this x median|h|")

    def criterion(self):
        from .detect.rule import Criterion

        return Criterion(self.quantile, self.max_fraction, self.layers, self.massive_ratio)


class SizeTarget(Strict):
    fraction: float | None = Field(None, gt=0, lt=1, description="share of the routed experts removed (pruned, or "
                                   "merged away) from each MoE layer, e.g. 0.25")
    keep: int | None = Field(None, ge=1, description="routed experts kept per MoE layer")

    @model_validator(mode="after")
    def one_target(self):
        if (self.fraction is None) == (self.keep is None):
            raise ValueError("give exactly one of fraction or keep")
        return self

    def size(self) -> str:
        return f"-{self.fraction:.0%}" if self.fraction else f"keep {self.keep}"


class PruneStage(SizeTarget):
    criterion: Literal["frequency", "reap", "ean", "random"] = Field(
        "reap", description="frequency (routing count), reap (routing weight x output norm, mean over routed tokens), "
                            "ean (summed output norm) or random (seeded)")
    se_policy: Literal["protect", "none"] = Field("protect", description="protect (never remove a Super Expert) or "
                                                  "none (naive)")

    def describe(self) -> tuple[str, str]:
        return f"prune {self.size()} {self.criterion}", self.se_policy


class MergeStage(SizeTarget):
    se_policy: Literal["singleton", "none"] = Field("singleton", description="singleton (each Super Expert its own "
                                                    "cluster) or none (naive)")
    router_rows: Literal["frequency", "dominant"] = Field(
        "frequency", description="merged router row: frequency (routing-frequency-weighted mean of the rows) or "
                                 "dominant (row of the most used member)")
    similarity: Literal["outputs", "mean"] = Field(
        "outputs", description="outputs (cosine of the experts' outputs on the same tokens) or mean (cosine of their "
                               "mean outputs, HC-SMoE's feature)")
    max_cluster_size: int | None = Field(None, ge=0, description="largest cluster (default: balanced, ceil(experts / "
                                         "clusters); 0: no limit)")
    similarity_tokens: int = Field(512, ge=1, description="calibration tokens per layer for the similarity")

    def describe(self) -> tuple[str, str]:
        return f"merge {self.size()}", self.se_policy


def _group_size(value):
    """The CLI's spelling too: 32, 64, 128, ... or 'channel' (one scale per row, 0); validate.group_size's rules."""
    import argparse

    from .validate import group_size

    try:
        return group_size(str(value))
    except argparse.ArgumentTypeError as exc:
        raise ValueError(str(exc)) from None


class QuantizeStage(Strict):
    method: Literal["rtn", "gptq"] = Field("gptq", description="round-to-nearest, or GPTQ (error feedback from "
                                           "calibration Hessians)")
    bits: Literal[2, 3, 4, 8] = Field(4, description="bits per quantized weight")
    group_size: int = Field(32, description="weights per scale: 32, 64, 128..., or 'channel' (one per row); one size "
                            "must divide every expert input width for pack-quantized output: 32 fits the default "
                            "model's 32-wide experts, 128 the usual choice for Qwen3-30B-A3B and most published models",
                            json_schema_extra={"cli_type": "group_size"})
    symmetric: bool = Field(True, description="asymmetric ranges with zero points (fake-quant only for experts)",
                            json_schema_extra={"flag": "--asymmetric"})
    se_policy: list[Literal["none", "noclip", "calib", "layer", "keep"]] = Field(
        ["noclip", "calib"], title="SE policy",
        description="comma list of noclip, calib, layer, keep; or none (naive). See `compression_report.json`")
    output_format: Literal["pack-quantized", "fake-quant"] = Field(
        "pack-quantized", description="compressed-tensors packed ints (vLLM, transformers) or dequantized weights "
                                      "(evaluation)", json_schema_extra={"flag": "--format"})
    clip_search: bool = Field(False, description="MSE grid search of clip ratios per group (never on SE experts with "
                              "noclip)")
    act_order: bool = Field(False, description="GPTQ: quantize columns in decreasing Hessian diagonal order")
    quantize_attention: bool = Field(True, description="leave attention unquantized",
                                     json_schema_extra={"flag": "--keep-attention"})
    layer_bits: int | None = Field(None, ge=1, description="bits of the experts of SE layers for --se-policy layer "
                                   "(default 8; 16 = bf16)")
    expert_calibration: Literal["all", "routed"] = Field(
        "all", description="GPTQ expert Hessians from every token (all) or the routed tokens only (RTN below 0.5% "
                           "coverage)")

    @field_validator("group_size", mode="before")
    @classmethod
    def _cli_spelling(cls, value, info):
        parsed = (info.context or {}).get("parsed_flags")  # options.from_args: validate.group_size ran already
        return value if parsed else _group_size(value)

    def describe(self) -> tuple[str, str]:
        return f"{self.method.upper()} W{self.bits} g{self.group_size}", "+".join(self.se_policy)


class PeerStage(Strict):
    """Another tool's GPTQ on our calibration tokens, in its own venv (se_compress/peers/)."""
    tool: Literal["llmcompressor", "gptqmodel"]
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = 32
    se_export: Literal["none", "int8", "keep"] = Field("none", description="our SE list in the tool's config "
                                                       "(se-compress detect --export): SE experts at 8 bits or bf16")

    def describe(self) -> tuple[str, str]:
        return (f"{self.tool} GPTQ W{self.bits} g{self.group_size}",
                f"our SE list: {self.se_export}" if self.se_export != "none" else "none")


class ZeroStage(Strict):
    experts: str = Field(..., description="instead of pruning: zero down_proj of L:E,... (E may be 'shared'), 'se' "
                         "or 'random:K'", json_schema_extra={"flag": "--zero"})

    def describe(self) -> tuple[str, None]:
        return f"zero {self.experts}", None


class AblateStage(Strict):
    draws: int = Field(5, ge=1, description="random draws of each kind")
    eval_seqlen: int | None = Field(None, ge=2, description="perplexity window (default: the model's context, at "
                                    "most 2048)")
    max_windows: int | None = Field(None, ge=1, description="evaluate only the first N windows (quick runs; default: "
                                    "all)")
    text: str = Field("wikitext2", description="perplexity text: wikitext2 (WikiText-2 test, the paper's set), books "
                      "(the default model's held-out books, its in-domain text) or a UTF-8 text file")

    def describe(self) -> tuple[str, None]:
        return "ablate", None


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
    tasks: list[str] = Field(DEFAULT_TASKS, description="comma list (a recipe: a list; [] = no evaluation)")
    limit: int | None = Field(None, ge=1, description="at most N examples per lm-eval task (quick runs; default: all)")
    seqlen: int | None = Field(None, ge=2, description="perplexity window (default: the model's context, at most "
                               "2048)")
    max_windows: int | None = Field(None, ge=1, description="evaluate only the first N perplexity windows (default: "
                                    "all)")


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
