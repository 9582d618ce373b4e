"""`se-compress detect --export`: the Super Experts as an llm-compressor recipe and a GPTQModel dynamic dict. The
recipe is parsed by llm-compressor's own recipe loader when its venv exists (`make peers`); skipped otherwise."""
import json
import re
import subprocess

import pytest
import yaml

from se_compress.cli import main as cli_main
from se_compress.peers import PEERS

SE = [f"model.layers.2.mlp.experts.5.{p}" for p in ("gate_proj", "up_proj", "down_proj")]  # conftest's plant


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "report"
    assert cli_main(["detect", str(tiny_model("qwen3_moe")), "--samples", "4", "--seqlen", "32", "--quantile", "0.95",
                     "--export", "llmcompressor,gptqmodel", "--export-bits", "4", "--export-group-size", "16",
                     "--out", str(out)]) == 0
    assert [(s["layer"], s["expert"]) for s in json.loads((out / "se_report.json").read_text())["super_experts"]] == [(2, 5)]
    return out


def test_recipe_puts_the_se_experts_in_an_8_bit_group_that_compressed_tensors_matches_first(exported):
    import torch
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import is_match, match_targets

    gptq = yaml.safe_load((exported / "llmcompressor_recipe.yaml").read_text())["default_stage"]["default_modifiers"]["GPTQModifier"]
    assert gptq["config_groups"]["super_experts"]["targets"] == SE
    config = QuantizationConfig(config_groups=gptq["config_groups"], ignore=gptq["ignore"])
    targets = {t: g for g in config.config_groups.values() for t in g.targets}
    linear = torch.nn.Linear(1, 1, device="meta")
    bits = lambda name: targets[match_targets(name, linear, list(targets))[0]].weights.num_bits
    assert all(bits(name) == 8 for name in SE)
    assert bits("model.layers.2.mlp.experts.6.down_proj") == 4 and bits("model.layers.1.self_attn.q_proj") == 4
    assert not is_match("model.layers.2.mlp.gate", linear, list(targets), config.ignore)  # routers, lm_head untouched


def test_gptqmodel_dynamic_matches_exactly_the_se_modules(exported):
    doc = json.loads((exported / "gptqmodel_dynamic.json").read_text())
    assert doc["super_experts"] == [[2, 5]] and "group_size=16" in doc["usage"]
    names = [f"model.layers.{l}.mlp.experts.{e}.{p}" for l in range(4) for e in range(16)
             for p in ("gate_proj", "up_proj", "down_proj")]
    matched = {n for n in names for key in doc["dynamic"] if re.match(key[2:], n)}
    assert matched == set(SE) and all(k.startswith("+:") and v == {"bits": 8} for k, v in doc["dynamic"].items())


def test_llmcompressor_own_recipe_loader_reads_it(exported):
    peer = PEERS["llmcompressor"]
    if not peer.installed.exists():
        pytest.skip("llm-compressor's venv is not set up (make peers)")
    code = ("import json, sys; from llmcompressor.recipe import Recipe; r = Recipe.create_instance(sys.argv[1]); "
            "m = r.modifiers[0]; print(json.dumps({'type': type(m).__name__, 'ignore': list(m.ignore), "
            "'groups': {k: [list(g.targets), g.weights.num_bits] for k, g in m.config_groups.items()}}))")
    proc = subprocess.run([str(peer.python), "-c", code, str(exported / "llmcompressor_recipe.yaml")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    parsed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert parsed["type"] == "GPTQModifier" and parsed["groups"] == {"group_0": [["Linear"], 4], "super_experts": [SE, 8]}
    assert "lm_head" in parsed["ignore"]


def test_export_of_an_unknown_tool_is_one_line(tiny_model, capsys, tmp_path):
    assert cli_main(["detect", str(tiny_model("qwen3_moe")), "--export", "awq", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "unknown export 'awq'" in err and "Traceback" not in err
