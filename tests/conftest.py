from pathlib import Path

import pytest

ARCHITECTURES = ["qwen3_moe", "qwen2_moe", "olmoe", "mixtral", "deepseek_v2", "deepseek_v3", "gpt_oss"]
WITH_SHARED = {"qwen2_moe", "deepseek_v2", "deepseek_v3"}
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A small byte-level BPE (512 tokens) that adds BOS, trained here on the shipped WikiText-2 valid text."""
    from transformers import AutoTokenizer

    from se_compress.default_model.train import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer([REPO / "se_compress/data/text/wikitext2-valid.txt"], 512, out)
    return AutoTokenizer.from_pretrained(out)


def planted(model_type):
    """The SEs planted in the tiny model of each architecture: (layer, expert, channel)."""
    plants = [(2, 5, 7)]
    if model_type in WITH_SHARED:
        plants.append((3, "shared", 11))
    return plants


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tokenizer):
    from se_compress.synthetic import build_tiny_model

    cache = {}

    def make(model_type, **kwargs):
        key = (model_type, tuple(sorted(kwargs.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(model_type)
            plants = kwargs.pop("plants", planted(model_type))
            cache[key] = build_tiny_model(model_type, out, tokenizer, plants=plants, **kwargs)
        return cache[key]

    return make
