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


def signal_quantize_while_writing(tmp_path, sig, env=None, launcher=()):
    """Start `quantize default --method rtn` (no detection pass: straight to writing) into tmp_path/area/w4, send
    `sig` once the layer loop runs, and return (argv, exit status, the lines starting with 'error:', all stderr).
    `launcher`: options before the command (`--nproc 2`)."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", "se_compress", *launcher, "quantize", "default", "--method", "rtn", "--se-policy", "none",
            "--out", str(tmp_path / "area" / "w4")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    seen = ""
    while "quantize rtn" not in seen:  # the layer loop has started: the checkpoint is being written
        char = proc.stderr.read(1)
        if not char:
            break
        seen += char
    assert "quantize rtn" in seen, seen
    proc.send_signal(sig)
    _, rest = proc.communicate(timeout=120)
    err = seen + rest
    return argv, proc.returncode, [line for line in err.splitlines() if line.startswith("error:")], err
