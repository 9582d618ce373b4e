"""The shipped default model: loads by name, its files are intact, and it still measures what was recorded."""
import hashlib
import json

import pytest

from se_compress.default_model.ship import CHECK_WINDOWS, HERE, SHIPPED_FILES, short_slice_ppl
from se_compress.models.checkpoint import DEFAULT_MODEL_DIR, resolve_model

EXPECTED = json.loads((HERE / "expected.json").read_text())


def test_default_resolves_and_is_a_real_qwen3_moe():
    from transformers import AutoConfig

    path = resolve_model("default")
    assert path == DEFAULT_MODEL_DIR
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "qwen3_moe"
    assert config.num_hidden_layers * config.num_experts >= 600


@pytest.mark.parametrize("name", SHIPPED_FILES)
def test_shipped_files_match_their_checksums(name):
    checksums = json.loads((HERE / "checksums.json").read_text())
    digest = hashlib.sha256((DEFAULT_MODEL_DIR / name).read_bytes()).hexdigest()
    assert digest == checksums[name]


def test_short_wikitext_slice_gives_the_recorded_perplexity():
    assert EXPECTED["wikitext2_test_windows"] == CHECK_WINDOWS
    assert short_slice_ppl(DEFAULT_MODEL_DIR) == pytest.approx(EXPECTED["ppl"], rel=1e-4)


def test_detector_finds_the_recorded_super_experts_in_early_layers():
    from se_compress.detect import detect

    report = detect("default", samples=16, seqlen=256, progress=False)
    found = [[s["layer"], s["expert"]] for s in report["super_experts"]]
    planted = [[1, 12], [2, 40]]  # PlantSpec: se1 and se2
    assert all(p in found for p in planted) and all(p in EXPECTED["super_experts"] for p in planted)
    top = report["super_experts"][0]
    assert top["layer"] <= 2 and top["token"] == "<s>" and top["max_output"] > report["thresholds"]["quantile_value"]
