"""Reading compressed-tensors checkpoints written by compressed-tensors' own API (llm-compressor's layout: class-name
targets, per-expert Linear modules, `ignore` lists): the reader gives back the library's own fake-quantized weights,
follows the library's precedence between groups, evaluates in `se-compress eval`, and refuses what it cannot
evaluate in one line."""
import json

import pytest
import torch

from ct_writer import write_ct_checkpoint
from se_compress.cli import main as cli_main
from se_compress.models.checkpoint import Checkpoint
from se_compress.models.ct_checkpoint import CompressedTensorsCheckpoint

LLMC_IGNORE = ["lm_head", "re:.*mlp.gate$", "re:.*shared_expert_gate$"]  # llm-compressor's MoE examples


@pytest.mark.parametrize("model_type,preset,overrides,activations", [
    ("qwen3_moe", "W4A16", {"group_size": 16}, False),     # pack-quantized
    ("qwen2_moe", "W8A8", {}, True),                 # int-quantized, per-channel, dynamic int8 activations
    ("qwen3_moe", "FP8_DYNAMIC", {}, True),               # float-quantized
    ("qwen3_moe", "NVFP4", {}, True),                     # nvfp4-pack-quantized, fp8 group scales + global scale
])
def test_llmcompressor_layout_reads_as_the_librarys_fake_quant(model_type, preset, overrides, activations, tiny_model,
                                                               tmp_path):
    src = tiny_model(model_type)
    out = tmp_path / "ct"
    expected = write_ct_checkpoint(src, out, {"group_0": (preset, ["Linear"], overrides)}, LLMC_IGNORE)
    reader, original = CompressedTensorsCheckpoint(out), Checkpoint(src)
    assert set(reader.weight_map) == set(original.weight_map)       # the dense view: the original's names, no qparams
    assert set(reader.schemes) == set(expected)
    experts = {k for k in original.weight_map if ".experts." in k}
    assert experts and all(k[: -len(".weight")] in reader.schemes for k in experts)   # every expert was quantized
    for key in original.weight_map:
        module = key[: -len(".weight")]
        if module in expected and preset == "NVFP4":
            # the library decompresses NVFP4 in bf16 (its unpacked e2m1 dtype) where fake_quantize ran in this
            # model's fp32: equal to bf16 rounding (2^-8), not bit for bit
            torch.testing.assert_close(reader.get(key), expected[module].to(original.get(key).dtype), rtol=2**-8,
                                       atol=1e-6)
        elif module in expected:
            assert torch.equal(reader.get(key), expected[module].to(original.get(key).dtype)), key
        else:                                                     # ignored (router, lm_head), norms, embeddings
            assert torch.equal(reader.get(key), original.get(key)), key
    assert bool(reader.notes) == activations                      # a weight-only reading says so


def test_group_precedence_is_the_librarys_exact_name_then_regex_then_class(tiny_model, tmp_path):
    src = tiny_model("qwen3_moe")
    q_proj_0 = "model.layers.0.self_attn.q_proj"
    expected = write_ct_checkpoint(src, tmp_path / "ct", {
        "linear4": ("W4A16", ["Linear"], {"group_size": 16}),
        "down8": ("W8A16", [r"re:.*experts\.\d+\.down_proj$"], {"group_size": 16}),
        "q2": ("W2A16", [q_proj_0], {"group_size": 16}),
    }, LLMC_IGNORE + ["re:.*layers\\.3\\.mlp\\.experts\\.0\\..*"])
    reader = CompressedTensorsCheckpoint(tmp_path / "ct")
    bits = {name: scheme.weights.num_bits for name, scheme in reader.schemes.items()}
    assert bits[q_proj_0] == 2 and bits["model.layers.1.self_attn.q_proj"] == 4
    assert bits["model.layers.2.mlp.experts.5.down_proj"] == 8 and bits["model.layers.2.mlp.experts.5.up_proj"] == 4
    assert "model.layers.3.mlp.experts.0.down_proj" not in bits and "model.layers.3.mlp.experts.1.down_proj" in bits
    dtype = reader.get("model.embed_tokens.weight").dtype
    for module, weight in expected.items():
        assert torch.equal(reader.get(module + ".weight"), weight.to(dtype)), module


def test_eval_loads_an_llmcompressor_w8a8_checkpoint_and_says_activations_are_not_quantized(tiny_model, tmp_path):
    src = tiny_model("qwen3_moe")
    write_ct_checkpoint(src, tmp_path / "ct", {"group_0": ("W8A8", ["Linear"], {})}, LLMC_IGNORE)
    assert cli_main(["eval", str(tmp_path / "ct"), "--tasks", "wikitext2", "--max-windows", "2",
                     "--out", str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["reader"]["format"].startswith("compressed-tensors (W8A8")
    assert "activation" in result["reader"]["notes"][0]
    assert 1 < result["perplexity"]["wikitext2"]["ppl"] < 1e4
    # push (dry run) describes it from its config.json: quantized, compressed-tensors, the scheme and its targets
    from se_compress.publish import push_checkpoint

    pushed = push_checkpoint(tmp_path / "ct", "org/w8a8", dry_run=True, base_model="Qwen/Qwen3-30B-A3B",
                             echo=lambda *a: None)
    assert pushed["metadata"]["base_model_relation"] == "quantized" and "compressed-tensors" in pushed["metadata"]["tags"]
    assert "W8A8 on `Linear`" in pushed["card"]


def _transform(config):
    config["quantization_config"]["transform_config"] = {"config_groups": {"R1": {"type": "hadamard"}}}


def _ignore_a_quantized_module(config):
    config["quantization_config"]["ignore"].append("model.layers.0.self_attn.q_proj")


def _unknown_format(config):
    config["quantization_config"]["config_groups"]["group_0"]["format"] = "marlin-99"


@pytest.mark.parametrize("edit,words", [
    (_transform, "transforms"),
    (_ignore_a_quantized_module, "no config group targets"),
    (_unknown_format, "marlin-99"),
])
def test_what_cannot_be_evaluated_is_one_line(edit, words, tiny_model, tmp_path, capsys):
    src = tiny_model("qwen3_moe")
    write_ct_checkpoint(src, tmp_path / "ct", {"group_0": ("W4A16", ["Linear"], {"group_size": 16})}, LLMC_IGNORE,
                        edit_config=edit)
    assert cli_main(["eval", str(tmp_path / "ct"), "--tasks", "wikitext2", "--max-windows", "1",
                     "--out", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err and words in lines[0], err
    assert not (tmp_path / "eval" / "eval.json").exists()
