"""quantize_model on tiny planted models: compressed-tensors output that plain transformers reloads with the
fake-quant logits, SE policies end to end, expert coverage, what is never quantized, and the CLI's errors."""
import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from se_compress.cli import main as cli_main
from se_compress.models.checkpoint import Checkpoint
from se_compress.quant import quantize_model
from se_compress.quant.compressed_tensors import PackedCheckpoint
from se_compress.quant.hessian import ExpertCollector, use_collector

# The SE planted by conftest in every tiny model: layer 2, expert 5, hidden channel 7, fired by BOS.
SE_REPORT = {"super_experts": [{"layer": 2, "expert": 5, "channel": 7, "token_id": 0, "position": 0}]}
FAST = dict(samples=4, seqlen=32, progress=False)
NEVER_QUANTIZED = re.compile(r"(embed_tokens|lm_head|\.gate\.weight|shared_expert_gate|norm|sinks|bias)")


def _logits(path, x):
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path)(x).logits


def _ids(tokenizer):
    x = torch.randint(3, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    x[:, 0] = tokenizer.bos_token_id
    return x


@pytest.mark.parametrize("model_type,method,bits,group_size,dtype", [
    ("qwen3_moe", "gptq", 4, 16, torch.bfloat16),
    ("qwen2_moe", "gptq", 3, 0, torch.bfloat16),
    ("mixtral", "rtn", 2, 8, torch.float32),
    ("deepseek_v3", "gptq", 8, 16, torch.float32),
    ("olmoe", "gptq", 4, 16, torch.float32),
    ("deepseek_v2", "rtn", 4, 16, torch.bfloat16),
])
def test_pack_quantized_reloads_in_transformers_with_fake_quant_logits(model_type, method, bits, group_size, dtype,
                                                                      tiny_model, tokenizer, tmp_path):
    src = tiny_model(model_type, dtype=dtype)
    kw = dict(method=method, bits=bits, group_size=group_size, se_policy="noclip,calib", se_report=SE_REPORT, **FAST)
    packed = quantize_model(str(src), tmp_path / "packed", output_format="pack-quantized", **kw)
    fake = quantize_model(str(src), tmp_path / "fake", output_format="fake-quant", **kw)
    x = _ids(tokenizer)
    a, b, original = _logits(packed, x), _logits(fake, x), _logits(src, x)
    assert torch.equal(a, b)                     # plain transformers on the packed ints == our fake-quant model
    assert not torch.equal(a, original)          # and something was really quantized
    report = json.loads((packed / "compression_report.json").read_text())
    assert report["loading"]["transformers"] is True and report["size_bytes"] < report["source_size_bytes"]
    # what is never quantized comes out bit for bit; every quantized Linear/expert is packed
    src_ckpt, out_ckpt = Checkpoint(src), Checkpoint(packed, raw=True)
    for key in src_ckpt.weight_map:
        if NEVER_QUANTIZED.search(key):
            assert key in out_ckpt and torch.equal(out_ckpt.get(key), src_ckpt.get(key)), key
        else:
            assert key not in out_ckpt and key[: -len("weight")] + "weight_packed" in out_ckpt, key
    assert out_ckpt.get(next(k for k in out_ckpt.weight_map if k.endswith("weight_packed"))).dtype == torch.int32
    # se_compress's own reader of the packed checkpoint gives the fake-quant weights exactly
    reader, fake_ckpt = PackedCheckpoint(packed), Checkpoint(fake)
    assert all(torch.equal(reader.get(k), fake_ckpt.get(k)) for k in fake_ckpt.weight_map)
    groups = json.loads((packed / "config.json").read_text())["quantization_config"]["config_groups"]
    experts_groups = [g for g in groups.values() if any("experts" in t for t in g["targets"])]
    assert len(experts_groups) == 1 and all(g["weights"]["symmetric"] for g in groups.values())


@pytest.mark.parametrize("bits", [2, 4])
def test_planted_super_weight_survives_noclip_and_naive_clip_search_cuts_it(bits, tiny_model, tmp_path):
    src = tiny_model("qwen3_moe", dtype=torch.bfloat16)
    key = "model.layers.2.mlp.experts.5.down_proj.weight"
    assert Checkpoint(src).get(key)[7, 0].item() == 40.0
    common = dict(method="gptq", bits=bits, group_size=16, clip_search=True, output_format="fake-quant", **FAST)
    naive = quantize_model(str(src), tmp_path / "naive", se_policy="none", **common)
    kept = quantize_model(str(src), tmp_path / "noclip", se_policy="noclip", **common)  # detects the SE itself
    assert Checkpoint(naive).get(key)[7, 0].item() < 0.95 * 40.0
    assert abs(Checkpoint(kept).get(key)[7, 0].item() - 40.0) <= 40.0 * 2 ** -8
    report = json.loads((kept / "compression_report.json").read_text())
    assert [(s["layer"], s["expert"], s["channel"]) for s in report["super_experts"]] == [(2, 5, 7)]
    assert [(w["row"], w["col"]) for w in report["super_weights"]] == [(7, 0)]


def _moe_input(model, layer_idx, ids):
    captured = {}
    moe = model.model.layers[layer_idx].mlp
    handle = moe.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return moe, captured["x"]


@pytest.mark.parametrize("mode", ["routed", "all"])
def test_calib_puts_the_trigger_tokens_into_the_se_expert_hessian(mode, tiny_model, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model("qwen3_moe")).eval()
    ids = _ids(tokenizer)
    moe, x = _moe_input(model, 2, ids)
    trigger = torch.zeros(ids.shape, dtype=torch.bool)
    trigger[:, 0] = True                      # BOS at position 0, as the detector reports
    bos = x[0, 0] / x[0, 0].norm()            # the trigger token's input direction
    expert = 3                                # an expert the router does not send BOS to (BOS goes to SE 5)
    assert expert not in moe.gate(x[:, 0].reshape(-1, x.shape[-1]))[2].flatten().tolist()
    shares, hessians = {}, {}
    for calib in (False, True):
        collector = ExpertCollector(moe.experts, mode, {expert} if calib else set(), {"mask": trigger.reshape(-1)})
        with torch.no_grad(), use_collector(moe.experts, collector):
            out = moe(x)
        sums = collector.input_hessian(expert)
        assert sums.nt == (2 if calib else 0)  # the two BOS tokens, routed to this expert or not
        hessians[calib] = H = sums.final(0.25 if calib else 0.0)
        shares[calib] = float(bos @ H @ bos / H.trace())
        assert torch.isfinite(out).all()
    base = hessians[False] / hessians[False].trace()
    assert torch.allclose(hessians[True], 0.75 * base + 0.25 * torch.outer(bos, bos), atol=1e-5)
    assert shares[True] > shares[False] + 0.15  # the trigger input now carries a fixed share of the weight
    with torch.no_grad():
        assert torch.allclose(moe(x), out, atol=1e-5)  # collecting kept the real routed output


def test_expert_with_no_token_falls_back_to_rtn_with_finite_scales(tiny_model, tokenizer, tmp_path):
    src = tiny_model("qwen3_moe", dtype=torch.bfloat16)
    out = quantize_model(str(src), tmp_path / "q", method="gptq", group_size=16, se_policy="none",
                         expert_calibration="routed", samples=1, seqlen=8, progress=False)
    report = json.loads((out / "compression_report.json").read_text())
    fallbacks = [m for m in report["modules"] if m.get("fallback")]
    assert fallbacks and report["warnings"] and report["expert_calibration"]["experts_with_no_routed_token"] > 0
    starved = next(m for m in fallbacks if m.get("tokens") == 0)
    ckpt = Checkpoint(out, raw=True)
    layer, expert = starved["layer"], starved["expert"]
    for proj in ("gate_proj", "up_proj", "down_proj"):
        scale = ckpt.get(f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight_scale").float()
        assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.isfinite(_logits(out, _ids(tokenizer))).all()
    # all-token calibration (the default) leaves no expert without data
    out_all = quantize_model(str(src), tmp_path / "all", method="gptq", group_size=16, se_policy="none",
                             samples=1, seqlen=8, progress=False)
    assert not any(m.get("fallback") for m in json.loads((out_all / "compression_report.json").read_text())["modules"])


def test_layer_policy_writes_one_scheme_per_moe_layer(tiny_model, tokenizer, tmp_path):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.utils.match import match_name

    src = tiny_model("qwen3_moe", dtype=torch.bfloat16)
    kw = dict(method="rtn", group_size=16, se_policy="layer", se_report=SE_REPORT, **FAST)
    packed = quantize_model(str(src), tmp_path / "packed", **kw)
    fake = quantize_model(str(src), tmp_path / "fake", output_format="fake-quant", **kw)
    qc = json.loads((packed / "config.json").read_text())["quantization_config"]
    bits_of = {name: g["weights"]["num_bits"] for name, g in qc["config_groups"].items()}
    assert bits_of["experts_w4"] == 4 and bits_of["experts_w8"] == 8
    # compressed-tensors' own matching and decompression, module by module, give our fake-quant weights
    ckpt, fake_ckpt = Checkpoint(packed, raw=True), Checkpoint(fake)
    for key in [k for k in ckpt.weight_map if k.endswith("weight_packed")]:
        module = key[: -len(".weight_packed")]
        matches = [n for n, g in qc["config_groups"].items() if any(match_name(module, t) for t in g["targets"])]
        assert len(matches) == 1, module
        expected_bits = 8 if ".layers.2.mlp.experts." in module else 4
        assert bits_of[matches[0]] == expected_bits, module
        scheme = QuantizationScheme(targets=qc["config_groups"][matches[0]]["targets"],
                                    weights=qc["config_groups"][matches[0]]["weights"])
        state = {s: ckpt.get(f"{module}.{s}") for s in ("weight_packed", "weight_scale", "weight_shape")}
        weight = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
        assert torch.equal(weight, fake_ckpt.get(f"{module}.weight")), module
    report = json.loads((packed / "compression_report.json").read_text())
    assert report["loading"]["transformers"] is False and "one scheme per MoE layer" in report["loading"]["why"]
    assert "transformers: False" in (packed / "README.md").read_text()
    # Why it is labelled so: transformers 5.23 decompresses every layer's experts with the first experts scheme.
    x = _ids(tokenizer)
    assert not torch.equal(_logits(packed, x), _logits(fake, x))


def test_keep_policy_leaves_se_expert_in_bf16_and_is_labelled_not_deployable(tiny_model, tmp_path):
    src = tiny_model("qwen3_moe", dtype=torch.bfloat16)
    out = quantize_model(str(src), tmp_path / "keep", method="rtn", group_size=16, se_policy="keep",
                         se_report=SE_REPORT, **FAST)
    src_ckpt, out_ckpt = Checkpoint(src), Checkpoint(out)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        se = f"model.layers.2.mlp.experts.5.{proj}.weight"
        other = f"model.layers.2.mlp.experts.4.{proj}.weight"
        assert torch.equal(out_ckpt.get(se), src_ckpt.get(se))
        assert not torch.equal(out_ckpt.get(other), src_ckpt.get(other))
    report = json.loads((out / "compression_report.json").read_text())
    assert report["output_format"] == "fake-quant" and report["requested_format"] == "pack-quantized"
    assert report["loading"]["deployable_quantized"] is False and report["notes"]
    assert "Not deployable" in (out / "README.md").read_text()


def test_gpt_oss_transposed_experts_fake_quant(tiny_model, tokenizer, tmp_path):
    src = tiny_model("gpt_oss")
    out = quantize_model(str(src), tmp_path / "q", method="gptq", group_size=8, se_policy="noclip,calib",
                         se_report=SE_REPORT, output_format="fake-quant", **FAST)
    down = Checkpoint(out).get("model.layers.2.mlp.experts.down_proj")  # [E, I, H]
    assert down[5, 0, 7].item() == pytest.approx(40.0, rel=1e-6)
    x = _ids(tokenizer)
    logits = _logits(out, x)
    assert torch.isfinite(logits).all() and not torch.equal(logits, _logits(src, x))
    assert torch.equal(Checkpoint(out).get("model.layers.2.mlp.router.weight"),
                       Checkpoint(src).get("model.layers.2.mlp.router.weight"))


def _cli_error(capsys, *argv):
    code = cli_main(list(argv))
    err = capsys.readouterr().err
    lines = [l for l in err.strip().splitlines() if l.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_cli_quantize_and_its_one_line_errors(tiny_model, tmp_path, capsys):
    qwen, oss = str(tiny_model("qwen3_moe")), str(tiny_model("gpt_oss"))
    out = str(tmp_path / "cli")
    assert cli_main(["quantize", qwen, "--out", out, "--method", "rtn", "--group-size", "16", "--se-policy", "none",
                     "--samples", "2", "--seqlen", "16"]) == 0
    assert "written:" in capsys.readouterr().out
    assert "--force" in _cli_error(capsys, "quantize", qwen, "--out", out, "--se-policy", "none")
    assert "--format fake-quant" in _cli_error(capsys, "quantize", qwen, "--out", out + "2", "--asymmetric")
    assert "--format fake-quant" in _cli_error(capsys, "quantize", oss, "--out", out + "2", "--se-policy", "none")
    assert "group size" in _cli_error(capsys, "quantize", qwen, "--out", out + "2", "--group-size", "12")
    assert "unknown SE policy" in _cli_error(capsys, "quantize", qwen, "--out", out + "2", "--se-policy", "noclip,fast")
    assert "--layer-bits" in _cli_error(capsys, "quantize", qwen, "--out", out + "2", "--se-policy", "layer",
                                        "--layer-bits", "4")
    bad = tmp_path / "other_report.json"
    bad.write_text(json.dumps({"architecture": "qwen3_moe", "super_experts": [{"layer": 9, "expert": 99, "channel": 1}]}))
    assert "another model" in _cli_error(capsys, "quantize", qwen, "--out", out + "2", "--se-report", str(bad))
    assert "not found" in _cli_error(capsys, "quantize", qwen, "--out", out + "2", "--se-report", str(tmp_path / "no.json"))
    assert "already quantized" in _cli_error(capsys, "quantize", out, "--out", out + "3", "--se-policy", "none")


def test_asymmetric_act_order_clip_search_fake_quant(tiny_model, tokenizer, tmp_path):
    src = tiny_model("olmoe")
    out = quantize_model(str(src), tmp_path / "q", method="gptq", bits=3, group_size=16, symmetric=False,
                         act_order=True, clip_search=True, se_policy="noclip", se_report=SE_REPORT,
                         output_format="fake-quant", **FAST)
    report = json.loads((out / "compression_report.json").read_text())
    experts = [m for m in report["modules"] if isinstance(m.get("expert"), int)]
    assert experts and all(m["output_error"] < m["rtn_output_error"] * 1.5 for m in experts)
    assert sum(m["output_error"] for m in experts) < sum(m["rtn_output_error"] for m in experts)
    assert report["super_weights"] and all(w["rel_error"] <= 2 ** -8 for w in report["super_weights"])
    assert torch.isfinite(_logits(out, _ids(tokenizer))).all()


def test_round_to_nearest_holds_bf16_layers_as_stored_and_writes_the_fp32_codes(tiny_model, tmp_path):
    """RTN runs no layer, so it holds each layer in its stored dtype (half the memory of fp32 on the CPU); the codes
    and scales are those of rounding the fp32 values (rtn.py computes in fp32), clip search included."""
    from se_compress.quant.pack import unpack_int32
    from se_compress.quant.rtn import QuantSpec, rtn_quantize

    src = tiny_model("qwen3_moe", dtype=torch.bfloat16)
    out = quantize_model(str(src), tmp_path / "rtn", method="rtn", bits=3, group_size=16, clip_search=True,
                         se_policy="none", progress=False)
    src_ckpt, packed = Checkpoint(src), Checkpoint(out, raw=True)
    checked = 0
    for key in src_ckpt.weight_map:
        if ".experts." not in key:
            continue
        w = src_ckpt.get(key)
        expected = rtn_quantize(w.float(), QuantSpec(3, 16, True), torch.bfloat16, clip=True)
        prefix = key[: -len("weight")]
        assert torch.equal(unpack_int32(packed.get(prefix + "weight_packed"), 3, w.shape[1]), expected.q), key
        assert torch.equal(packed.get(prefix + "weight_scale"), expected.scale), key
        checked += 1
    assert checked == 3 * 4 * 16  # gate, up, down of every expert of the 4 MoE layers
