"""Each stage's options are declared once (recipe.py's models): every recipe key is a CLI flag of the stage's command
with the same default, and every flag of that command is a recipe key or one of the command's own run options."""
import argparse

import pytest

from se_compress.cli import build_parser, main
from se_compress.options import default, flag, from_args
from se_compress.recipe import (AblateStage, CalibrationOptions, DetectOptions, EvaluateOptions, MergeStage,
                                PruneStage, QuantizeStage, Recipe, ZeroStage)
from se_compress.errors import SECompressError

# The command's own options: where the model and the output are, how it runs; never a stage's setting.
RUN_FLAGS = {"-h", "--help", "--allow-pickle", "--trust-remote-code", "--out", "--force", "--se-report", "--batch-size",
             "--device", "--threads"}
STAGES = {
    "detect": ([DetectOptions], {"--in-memory", "--stability", "--export", "--export-bits", "--export-group-size",
                                 "--export-mode", "--export-scope"}),
    "quantize": ([QuantizeStage, CalibrationOptions], set()),
    "prune": ([PruneStage, ZeroStage, CalibrationOptions], set()),
    "merge": ([MergeStage, CalibrationOptions], set()),
    "ablate": ([AblateStage, DetectOptions], set()),
    "eval": ([EvaluateOptions], {"--text", "--task-source", "--baseline", "--label"}),
}


def _subparser(command):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices[command]


@pytest.mark.parametrize("command", STAGES)
def test_every_recipe_key_is_a_flag_with_the_same_default_and_back(command):
    models, own = STAGES[command]
    parser, sub = _subparser(command)
    parsed = parser.parse_args([command])
    flags = {s: a for a in sub._actions for s in a.option_strings}
    declared = set()
    for model in models:
        for name, field in model.model_fields.items():
            option = flag(name, field)
            declared.add(option)
            assert option in flags, f"{model.__name__}.{name}: no {option} on `se-compress {command}`"
            assert flags[option].dest == name and flags[option].help, option
            value = getattr(parsed, name) if hasattr(parsed, name) else default(field)  # a switch: unset is the default
            assert value == default(field), f"{option}: CLI default {value!r}, recipe default {default(field)!r}"
    dests = [a.dest for a in sub._actions]
    assert len(dests) == len(set(dests)), f"two flags of `se-compress {command}` write the same option: {dests}"
    undeclared = set(flags) - declared - RUN_FLAGS - own
    assert not undeclared, f"`se-compress {command}` flags not declared in recipe.py: {sorted(undeclared)}"


def test_the_flags_build_the_recipes_options():
    parser, _ = _subparser("quantize")
    args = parser.parse_args(["quantize", "--method", "rtn", "--bits", "3", "--group-size", "channel", "--asymmetric",
                              "--se-policy", "noclip,layer", "--layer-bits", "16", "--keep-attention"])
    assert from_args(QuantizeStage, args) == QuantizeStage(method="rtn", bits=3, group_size="channel", symmetric=False,
                                                           se_policy=["noclip", "layer"], layer_bits=16,
                                                           quantize_attention=False)
    args = parser.parse_args(["merge", "--keep", "4", "--router-rows", "dominant", "--max-cluster-size", "0"])
    assert from_args(MergeStage, args) == MergeStage(keep=4, router_rows="dominant", max_cluster_size=0)


@pytest.mark.parametrize("argv,needle", [
    (["quantize", "--se-policy", "noclip,fast"], "unknown SE policy 'fast'"),
    (["quantize", "--format", "gguf"], "--format"),
    (["prune", "--criterion", "size"], "--criterion"),
    (["merge", "--similarity", "l2"], "--similarity"),
    (["merge", "--similarity-tokens", "0"], "--similarity-tokens"),
])
def test_bad_flag_values_are_one_line(capsys, argv, needle):
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines


def test_rules_between_flags_read_as_flags():
    parser, _ = _subparser("prune")
    with pytest.raises(SECompressError, match=r"^prune: give exactly one of --fraction or --keep$"):
        from_args(PruneStage, parser.parse_args(["prune"]), "prune")


def test_recipe_and_cli_group_size_share_their_rules():
    recipe = {"name": "x", "stages": [{"quantize": {"group_size": "channel"}}]}
    assert Recipe.model_validate(recipe).stages[0].quantize.group_size == 0  # the CLI's 'channel' too
    parser, _ = _subparser("quantize")
    for bad in ("-1", "0"):
        with pytest.raises(Exception, match="0 never means per-channel"):
            QuantizeStage(group_size=int(bad))
        with pytest.raises(SystemExit):
            parser.parse_args(["quantize", "--group-size", bad])


def test_compare_describes_each_stage_from_its_options():
    from se_compress.compare import describe
    from se_compress.recipe import load_recipe

    assert describe(load_recipe("qwen3-int4-se-protect")) == ("GPTQ W4 g32", "noclip+calib")
    assert describe(load_recipe("qwen3-prune25-naive"))[0].startswith("prune -25%")
    recipe = Recipe.model_validate({"name": "x", "stages": [{"merge": {"keep": 4}}, {"zero": {"experts": "se"}},
                                                            {"quantize": {"method": "rtn", "se_policy": ["none"]}}]})
    assert describe(recipe) == ("merge keep 4, zero se, RTN W4 g32", "singleton, none")
