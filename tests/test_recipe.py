"""Recipes are data: every shipped one validates, and typos or wrong types are refused with one line that
names the key, the value and what is allowed."""
import pytest

from se_compress.errors import SECompressError
from se_compress.recipe import available_recipes, load_recipe

REQUIRED = ["qwen3-int4-se-protect", "qwen3-int4-naive", "qwen3-int3-se-protect", "qwen3-int3-naive",
            "qwen3-int2-se-protect", "qwen3-int2-naive", "qwen3-prune25-se-protect", "qwen3-prune25-naive",
            "qwen3-prune50-se-protect", "qwen3-prune50-naive", "qwen3-merge50-se-singleton", "qwen3-merge50-naive",
            "paper-ablation"]


def test_every_required_recipe_ships_and_names_an_existing_twin():
    assert set(REQUIRED) <= set(available_recipes())
    for name in available_recipes():
        recipe = load_recipe(name)
        assert recipe.name == name
        for twin in recipe.baselines:
            assert twin in available_recipes()


def test_se_protect_and_naive_twins_differ_in_se_handling():
    protect, naive = load_recipe("qwen3-int4-se-protect"), load_recipe("qwen3-int4-naive")
    assert protect.stages[0].quantize.se_policy == ["noclip", "calib"] and naive.stages[0].quantize.se_policy == ["none"]
    assert protect.stages[0].quantize.output_format == "pack-quantized"
    assert load_recipe("qwen3-prune50-se-protect").stages[0].prune.se_policy == "protect"
    assert load_recipe("qwen3-merge50-se-singleton").stages[0].merge.se_policy == "singleton"


@pytest.mark.parametrize("text,needles", [
    ("name: x\nstages:\n  - prune: {fracton: 0.5}\n", ["unknown key 'stages.0.prune.fracton'", "fraction, keep"]),
    ("name: x\nstages:\n  - quantize: {bits: 5}\n", ["'stages.0.quantize.bits' is 5", "2, 3, 4 or 8"]),
    ("name: x\nstages:\n  - prune: {fraction: half}\n", ["stages.0.prune.fraction", "valid number"]),
    ("name: x\nstages:\n  - prune: {fraction: 0.5, criterion: freq}\n", ["'freq'", "'frequency'"]),
    ("name: x\nstages:\n  - prune: {fraction: 0.5, keep: 3}\n", ["exactly one of fraction or keep"]),
    ("name: x\nstages:\n  - quantize: {se_policy: [noclip, clipless]}\n", ["se_policy.1", "'noclip'"]),
    ("name: x\nstagez: []\n", ["unknown key 'stagez'", "stages"]),
    ("name: x\nstages: [\n", ["not valid YAML"]),
])
def test_typos_and_wrong_types_are_one_line(tmp_path, text, needles):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(SECompressError) as err:
        load_recipe(str(path))
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_unknown_recipe_lists_the_shipped_ones():
    with pytest.raises(SECompressError, match="qwen3-int4-se-protect"):
        load_recipe("qwen3-int5-se-protect")


def test_compare_all_means_every_shipped_compression_recipe_with_its_twin():
    from se_compress.driver import expand_recipes

    names = expand_recipes(["all"])
    assert "paper-ablation" not in names and "qwen3-int4-se-protect" in names
    for name in names:  # each recipe's naive twins are in the table beside it
        assert set(load_recipe(name).baselines) <= set(names)
    peers = [n for n in available_recipes() if n.startswith("peer-")]  # need their venvs: named, never in 'all'
    assert peers and not set(peers) & set(names)
    assert len(names) == len(available_recipes()) - 1 - len(peers)
    assert expand_recipes(["qwen3-int4-naive"]) == ["qwen3-int4-naive"]
