"""Published checkpoint formats: FP8-block (DeepSeek-V3, Qwen3-FP8) and MXFP4 (gpt-oss) read dequantized with
transformers' arithmetic, every other quantized input refused in one line, prune keeping the stored bytes,
merge/quantize/zero writing their own format, the DeepSeek-V3 MTP layer, and the published configs and layouts
of all seven families (tiny sizes, fixtures from se_compress.published)."""
import json
import re
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import planted
from se_compress.cli import main as cli_main
from se_compress.detect import detect
from se_compress.detect.rule import Criterion
from se_compress.eval.run import load_full_model
from se_compress.models.checkpoint import Checkpoint
from se_compress.models.formats import dequantize_fp8_block, dequantize_mxfp4
from se_compress.models.streaming import StreamedModel
from se_compress.published import (FAMILIES, PUBLISHED, build_published_fixture, quantize_fp8_block,
                                   quantize_mxfp4)

CALIB = dict(samples=6, seqlen=32)
CRITERION = Criterion(quantile=0.95)  # as test_prune: two planted SEs among ~50 experts
QUANTIZED = ["deepseek_v3", "qwen3_moe_fp8", "gpt_oss"]


def model_type(family):
    return family.replace("_fp8", "")


@pytest.fixture(scope="module")
def published(tmp_path_factory, tokenizer):
    cache = {}

    def make(family, fmt="published"):
        if (family, fmt) not in cache:
            out = tmp_path_factory.mktemp(f"{family}-{fmt}")
            cache[family, fmt] = build_published_fixture(family, out, tokenizer, planted(model_type(family)), fmt=fmt)
        return cache[family, fmt]

    return make


@pytest.fixture(scope="module")
def se_report(published):
    cache = {}

    def run(family, fmt="published"):
        if (family, fmt) not in cache:
            cache[family, fmt] = detect(str(published(family, fmt)), criterion=CRITERION, progress=False, **CALIB)
        return cache[family, fmt]

    return run


def ids(tokenizer, n=2, length=12):
    x = torch.randint(3, len(tokenizer), (n, length), generator=torch.Generator().manual_seed(0))
    x[:, 0] = tokenizer.bos_token_id
    return x


# ---- the arithmetic, against transformers' own ------------------------------------------------------------------

def test_fp8_block_dequantization_is_transformers_arithmetic():
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 96, generator=g) * torch.logspace(-3, 1, 64).unsqueeze(1)
    q, scale = quantize_fp8_block(weight, (32, 32))
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (2, 3)
    for dtype in (torch.float32, torch.bfloat16):
        theirs = Fp8Dequantize(None)._dequantize_one(q, scale, output_dtype=dtype)
        assert torch.equal(dequantize_fp8_block(q, scale, (32, 32), dtype), theirs)
    # a partial last block (DeepSeek-V3's kv_a_proj_with_mqa has 576 rows in 128-row blocks): cropped, as DeepSeek's
    # weight_dequant does; transformers derives the block from the grid and gets it wrong (here 12 rows, not 16)
    weight = torch.randn(24, 40, generator=g)
    q, scale = quantize_fp8_block(weight, (16, 16))
    expected = torch.empty(24, 40)
    for r in range(24):
        for c in range(40):
            expected[r, c] = q[r, c].float() * scale[r // 16, c // 16]
    assert torch.equal(dequantize_fp8_block(q, scale, (16, 16), torch.float32), expected)
    assert (dequantize_fp8_block(q, scale, (16, 16), torch.float32) - weight).abs().max() < 0.07 * weight.abs().max()


def test_mxfp4_dequantization_is_transformers_arithmetic():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 8, 2, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(117, 137, (3, 8, 2), generator=g, dtype=torch.uint8)
    for dtype in (torch.bfloat16, torch.float32):
        ours = dequantize_mxfp4(blocks, scales, dtype)
        assert ours.shape == (3, 64, 8)  # [E, in, out]: transformers' gpt-oss layout
        assert torch.equal(ours, convert_moe_packed_tensors(blocks, scales, dtype=dtype))
    # our fixture quantizer round-trips values already on the e2m1 x 2^k grid
    exact = dequantize_mxfp4(blocks, scales, torch.float32).transpose(1, 2)
    again = quantize_mxfp4(exact)
    assert torch.equal(dequantize_mxfp4(*again, torch.float32), dequantize_mxfp4(blocks, scales, torch.float32))


# ---- the published configs and layouts ------------------------------------------------------------------------

SHARD_NAMES = {"deepseek_v2": r"model-0000[1-3]-of-000003", "deepseek_v3": r"model-0000[1-3]-of-000003",
               "gpt_oss": r"model-0000[0-2]-of-00002"}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fixture_has_the_published_config_and_layout_and_reads_like_transformers(family, published, tokenizer):
    path = published(family)
    written = json.loads((path / "config.json").read_text())
    assert set(written) == set(PUBLISHED[FAMILIES[family][0]])  # the published keys, no more, no fewer
    assert AutoConfig.from_pretrained(path).model_type == model_type(family)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    pattern = SHARD_NAMES.get(family, r"model-0000[1-3]-of-00003")
    assert sorted({f for f in index["weight_map"].values()}) == sorted(f.name for f in path.glob("*.safetensors"))
    assert all(re.fullmatch(pattern + r"\.safetensors", f) for f in index["weight_map"].values())
    ckpt = Checkpoint(path)
    assert set(index["weight_map"]) == set(ckpt.stored_map)
    # our reader and plain transformers build the same model from the published layout (bf16, where transformers'
    # CPU FP8 dequantization works; it mis-blocks DeepSeek's partial blocks, see the FP8 test above)
    x = ids(tokenizer)
    sm = StreamedModel(ckpt, dtype=torch.bfloat16)
    for i in range(len(sm.layers)):
        sm.load_layer(i)
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    if family == "deepseek_v3":
        differ = {n for n, p in sm.model.named_parameters() if not torch.equal(p, dict(theirs.named_parameters())[n])}
        assert differ == {f"model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight" for i in range(4)}
        return
    with torch.no_grad():
        assert torch.equal(sm.model(x).logits, theirs(x).logits)


@pytest.mark.parametrize("family", QUANTIZED)
def test_detect_on_quantized_checkpoint_finds_the_planted_ses_with_the_statistics_of_the_dequantized_model(
        family, se_report):
    quantized, reference = se_report(family), se_report(family, "bf16")
    found = {(s["layer"], s["expert"], s["channel"]) for s in quantized["super_experts"]}
    assert found == set(planted(model_type(family)))
    assert quantized["experts"] == reference["experts"]  # every per-expert statistic, exactly


# ---- writing --------------------------------------------------------------------------------------------------

def _bytes(t):
    return t.contiguous().view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)


@pytest.mark.parametrize("family,keep", [("deepseek_v3", 12), ("gpt_oss", 12), ("qwen3_moe_fp8", 10)])
def test_prune_keeps_the_stored_format_byte_for_byte(family, keep, published, se_report, tmp_path):
    from se_compress.prune import prune_model

    src = published(family)
    report = se_report(family)
    out = prune_model(str(src), tmp_path / "pruned", keep=keep, se_report=report, progress=False)
    twin = prune_model(str(published(family, "bf16")), tmp_path / "twin", keep=keep, se_report=report, progress=False)
    cin, cout = Checkpoint(src), Checkpoint(out)
    config_in, config_out = json.loads((src / "config.json").read_text()), json.loads((out / "config.json").read_text())
    assert config_out["quantization_config"] == config_in["quantization_config"]
    compression = json.loads((out / "compression_report.json").read_text())
    assert "kept" in compression["stored_format"]
    layers = config_in["num_hidden_layers"]
    num_experts = 16
    plans = {l["layer"]: l["kept"] for l in compression["layers"]}
    expected_bytes = 0
    for key in cin.stored_map:
        layer = int(key.split(".")[2]) if key.startswith("model.layers.") else -1
        tensor = cin.get_stored(key)
        if layer >= layers:  # the MTP layer: dropped
            assert key not in cout.stored_map
            continue
        kept = plans.get(layer)
        m = re.match(r"^(model\.layers\.\d+\.mlp\.experts\.)(\d+)\.(.+)$", key)
        if kept is not None and m:
            if int(m.group(2)) in kept:
                new_key = f"{m.group(1)}{kept.index(int(m.group(2)))}.{m.group(3)}"
                assert torch.equal(_bytes(cout.get_stored(new_key)), _bytes(tensor)), key
                expected_bytes += tensor.nbytes
            continue
        if kept is not None and (".mlp.experts." in key or re.search(r"\.mlp\.(gate|router)\.", key)):
            assert tensor.shape[0] == num_experts
            assert torch.equal(_bytes(cout.get_stored(key)), _bytes(tensor[kept])), key
            expected_bytes += tensor[kept].nbytes
            continue
        assert cout.get_stored(key).dtype == tensor.dtype and torch.equal(_bytes(cout.get_stored(key)), _bytes(tensor)), key
        expected_bytes += tensor.nbytes
    assert sum(cout.get_stored(k).nbytes for k in cout.stored_map) == expected_bytes
    assert cout.size_bytes() < cin.size_bytes()
    if family == "deepseek_v3":
        assert config_out["num_nextn_predict_layers"] == 0 and "multi-token-prediction" in compression["multi_token_prediction"]
        assert json.loads((twin / "config.json").read_text())["num_nextn_predict_layers"] == 0
    # read back through our reader: the dequantized pruned model is the pruned dequantized model
    ctwin = Checkpoint(twin)
    assert set(cout.weight_map) == set(ctwin.weight_map)
    for key in cout.weight_map:
        assert torch.equal(cout.get(key), ctwin.get(key)), key
    if family in ("gpt_oss", "qwen3_moe_fp8"):  # transformers dequantizes these on CPU itself (FP8 in bf16 only, and
        # only where the blocks divide the weights): the pruned checkpoint loads there with our reader's logits
        dtype = torch.float32 if family == "gpt_oss" else torch.bfloat16
        x = torch.tensor([[0, 40, 41, 42]])
        model, _ = load_full_model(cout, dtype, "cpu")
        with torch.no_grad():
            assert torch.equal(AutoModelForCausalLM.from_pretrained(out, dtype=dtype)(x).logits, model(x).logits)


def test_quantize_from_fp8_writes_compressed_tensors_that_transformers_loads_with_fake_quant_logits(
        published, tokenizer, tmp_path):
    from se_compress.quant import quantize_model

    src = published("qwen3_moe_fp8")
    kw = dict(method="rtn", bits=4, group_size=16, se_policy="noclip",
              se_report={"super_experts": [{"layer": 2, "expert": 5, "channel": 7, "token_id": 0, "position": 0}]},
              samples=4, seqlen=32, progress=False)
    packed = quantize_model(str(src), tmp_path / "packed", output_format="pack-quantized", **kw)
    fake = quantize_model(str(src), tmp_path / "fake", output_format="fake-quant", **kw)
    assert json.loads((packed / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
    assert "quantization_config" not in json.loads((fake / "config.json").read_text())
    assert Checkpoint(fake).get("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
    report = json.loads((packed / "compression_report.json").read_text())
    assert any("fp8" in note for note in report["notes"])
    assert "fp8" in (packed / "README.md").read_text()
    x = ids(tokenizer)
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(packed)(x).logits
        b = AutoModelForCausalLM.from_pretrained(fake)(x).logits
    assert torch.equal(a, b)


def test_zero_and_merge_from_fp8_with_mtp_write_bf16_and_say_so(published, se_report, tokenizer, tmp_path):
    from se_compress.merge import merge_model
    from se_compress.prune import zero_experts_model

    src = published("deepseek_v3")
    zeroed = zero_experts_model(str(src), tmp_path / "zeroed", "2:5", progress=False)
    config = json.loads((zeroed / "config.json").read_text())
    assert "quantization_config" not in config and config["num_nextn_predict_layers"] == 0
    notes = json.loads((zeroed / "compression_report.json").read_text())["format_notes"]
    assert any("FP8" in n for n in notes) and any("multi-token-prediction" in n for n in notes)
    assert "## Stored format" in (zeroed / "README.md").read_text()
    ckpt = Checkpoint(zeroed)
    assert ckpt.format is None and not any(k.startswith("model.layers.4.") for k in ckpt.stored_map)
    assert ckpt.get("model.layers.2.mlp.experts.5.down_proj.weight").abs().max() == 0
    assert torch.equal(ckpt.get("model.layers.2.mlp.experts.4.down_proj.weight"),
                       Checkpoint(src).get("model.layers.2.mlp.experts.4.down_proj.weight"))
    merged = merge_model(str(src), tmp_path / "merged", keep=12, se_report=se_report("deepseek_v3"), progress=False,
                         similarity_tokens=64, **CALIB)
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config and config["n_routed_experts"] == 12
    x = ids(tokenizer)
    with torch.no_grad():
        assert torch.isfinite(AutoModelForCausalLM.from_pretrained(merged)(x).logits).all()


def test_eval_loads_fp8_through_our_reader(published, tokenizer):
    model, how = load_full_model(Checkpoint(published("deepseek_v3")), torch.float32, "cpu")
    assert "se_compress reader" in how and "FP8" in how
    reference = AutoModelForCausalLM.from_pretrained(published("deepseek_v3", "bf16"), dtype=torch.float32).eval()
    x = ids(tokenizer)
    with torch.no_grad():
        assert torch.equal(model(x).logits, reference(x).logits)


# ---- refused formats ------------------------------------------------------------------------------------------

REFUSED = {
    "gptq": ({"quant_method": "gptq", "bits": 4, "group_size": 128}, None, "GPTQ"),
    "awq": ({"quant_method": "awq", "bits": 4, "version": "gemm"}, None, "AWQ"),
    "compressed-tensors": ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {}},
                           None, "compressed-tensors"),
    "bitsandbytes": ({"quant_method": "bitsandbytes", "load_in_4bit": True}, None, "bitsandbytes"),
    "fp8-per-tensor": ({"quant_method": "fp8", "activation_scheme": "static"}, None, "FP8 without weight_block_size"),
    "unknown": ({"quant_method": "nf3-magic"}, None, "unknown format"),
    "autogptq-file": (None, "quantize_config.json", "GPTQ"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_other_quantized_inputs_are_refused_in_one_line(name, tiny_model, tmp_path, capsys):
    qc, extra_file, label = REFUSED[name]
    path = tmp_path / name
    shutil.copytree(tiny_model("qwen3_moe"), path)
    if qc is not None:
        config = json.loads((path / "config.json").read_text())
        config["quantization_config"] = qc
        (path / "config.json").write_text(json.dumps(config))
    if extra_file:
        (path / extra_file).write_text(json.dumps({"bits": 4, "group_size": 128}))
    for command in (["detect", str(path)], ["prune", str(path), "--out", str(tmp_path / "o"), "--keep", "8"]):
        assert cli_main(command) == 2
        err = capsys.readouterr().err
        lines = [l for l in err.strip().splitlines() if l.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert label in lines[0] and "pass the original unquantized" in lines[0], lines[0]
