"""The shipped default model: loads by name, its files are intact, and it still measures what was recorded."""
import hashlib
import json

import pytest

from se_compress.default_model.ship import CHECK_WINDOWS, HERE, TEXTS, short_slice_ppl, shipped_files
from se_compress.models.checkpoint import DEFAULT_MODEL_DIR, resolve_model

EXPECTED = json.loads((HERE / "expected.json").read_text())


def test_default_resolves_and_is_a_real_qwen3_moe():
    from transformers import AutoConfig

    path = resolve_model("default")
    assert path == DEFAULT_MODEL_DIR
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "qwen3_moe"
    assert config.num_hidden_layers * config.num_experts >= 600


def test_every_shipped_file_matches_its_checksum_and_the_weights_stay_small():
    checksums = json.loads((HERE / "checksums.json").read_text())
    names = shipped_files()
    assert sorted(checksums) == sorted(names)  # no shard missing, none unrecorded
    for name in names:
        assert hashlib.sha256((DEFAULT_MODEL_DIR / name).read_bytes()).hexdigest() == checksums[name], name
    weights = sum((DEFAULT_MODEL_DIR / n).stat().st_size for n in names if n.endswith(".safetensors"))
    assert weights <= 45e6  # the budget for a model shipped inside the package


@pytest.mark.parametrize("text", TEXTS)
def test_short_slice_gives_the_recorded_perplexity(text):
    assert EXPECTED["check_windows"] == CHECK_WINDOWS
    assert short_slice_ppl(DEFAULT_MODEL_DIR, text) == pytest.approx(EXPECTED["ppl"][text], rel=1e-4)


def test_the_held_out_books_are_in_domain_and_wikitext_is_not():
    """The reason `books` exists: the model was trained on books, so its in-domain perplexity is far lower."""
    assert EXPECTED["ppl"]["books"] * 3 < EXPECTED["ppl"]["wikitext2"]


def test_detector_finds_the_recorded_super_experts_in_early_layers():
    from se_compress.default_model.plant import PlantSpec
    from se_compress.detect import detect

    report = detect("default", samples=16, seqlen=256, progress=False)
    found = [[s["layer"], s["expert"]] for s in report["super_experts"]]
    spec = PlantSpec()
    planted = [[spec.se1_layer, spec.se1_expert], [spec.se2_layer, spec.se2_expert]]
    assert all(p in found for p in planted) and all(p in EXPECTED["super_experts"] for p in planted)
    assert len(found) >= 3  # at least one learned beside the planted two
    top = report["super_experts"][0]
    assert top["layer"] <= 2 and top["channel"] == spec.massive_channel
    assert all(s["max_output"] > report["thresholds"]["quantile_value"] for s in report["super_experts"])
    assert top["token"] in ("<s>", "\n", "\n\n")  # the planted triggers: BOS and newlines
