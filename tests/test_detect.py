"""The detector on tiny models of every supported architecture with planted Super Experts."""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import ARCHITECTURES, planted
from se_compress.detect import detect, write_report
from se_compress.detect.rule import Criterion

# Two planted SEs need a quantile that can select two out of ~50 experts (see rule.py: P99.5 selects at most 1).
CRITERION = Criterion(quantile=0.95)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_finds_exactly_the_planted_super_experts(model_type, tiny_model, tmp_path):
    path = tiny_model(model_type)
    report = detect(str(path), samples=6, seqlen=32, criterion=CRITERION, progress=False)
    found = sorted((s["layer"], str(s["expert"]), s["channel"]) for s in report["super_experts"])
    assert found == sorted((l, str(e), c) for l, e, c in planted(model_type))
    routed = [s for s in report["super_experts"] if s["expert"] != "shared"]
    assert all(s["token"] == "<s>" and s["position"] == 0 for s in routed)  # the trigger token is BOS
    assert report["architecture"] == model_type
    assert 2 in report["massive_activation_layers"] and 0 not in report["massive_activation_layers"]
    out = write_report(report, tmp_path / "report")
    saved = json.loads((out / "se_report.json").read_text())
    for key in ["model", "architecture", "num_layers", "num_experts", "calibration", "criterion", "super_experts",
                "experts", "massive_activation_layers"]:
        assert key in saved
    assert all(isinstance(e["expert"], int) or e["expert"] == "shared" for e in saved["experts"])
    for png in ["se_heatmap.png", "se_top_experts.png", "massive_activations.png"]:
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_streamed_equals_in_memory(model_type, tiny_model):
    path = tiny_model(model_type)
    streamed = detect(str(path), samples=5, seqlen=24, batch_size=2, criterion=CRITERION, progress=False)
    in_memory = detect(str(path), samples=5, seqlen=24, batch_size=2, criterion=CRITERION, progress=False, streamed=False)
    keys = ["layer", "expert", "max_output", "count", "reap", "ean", "channel", "position", "sample"]
    assert [[e[k] for k in keys] for e in streamed["experts"]] == [[e[k] for k in keys] for e in in_memory["experts"]]
    assert [h["max"] for h in streamed["hidden_states"]] == [h["max"] for h in in_memory["hidden_states"]]
    assert streamed["super_experts"] == in_memory["super_experts"]


def _plain_expert_outputs(model_type, moe, x):
    """Each routed expert's output for the tokens the router sends to it, written out by hand from the weights."""
    router = moe.router if model_type == "gpt_oss" else moe.gate
    _, weights, index = router(x)
    outputs = {}
    for e in range(moe.experts.num_experts):
        rows, k = torch.where(index == e)
        if len(rows) == 0:
            continue
        xe = x[rows]
        if model_type == "gpt_oss":
            gu = xe @ moe.experts.gate_up_proj[e] + moe.experts.gate_up_proj_bias[e]
            gate, up = gu[:, ::2].clamp(max=moe.experts.limit), gu[:, 1::2].clamp(-moe.experts.limit, moe.experts.limit)
            h = (up + 1) * gate * torch.sigmoid(gate * moe.experts.alpha)
            y = h @ moe.experts.down_proj[e] + moe.experts.down_proj_bias[e]
        else:
            inter = moe.experts.down_proj.shape[-1]
            wg, wu = moe.experts.gate_up_proj[e][:inter], moe.experts.gate_up_proj[e][inter:]
            y = (F.silu(xe @ wg.T) * (xe @ wu.T)) @ moe.experts.down_proj[e].T
        outputs[e] = (y, weights[rows, k])
    return outputs


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_statistics_equal_a_plain_per_expert_recomputation(model_type, tiny_model):
    from transformers import AutoModelForCausalLM

    path = tiny_model(model_type)
    report = detect(str(path), samples=4, seqlen=16, batch_size=4, criterion=CRITERION, progress=False)
    from se_compress.data.calibration import build_calibration
    from transformers import AutoTokenizer

    calib = build_calibration(AutoTokenizer.from_pretrained(path), "wikitext2", 4, 16, 0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    inputs = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=calib.input_ids)
        for h in hooks:
            h.remove()
        by_key = {(e["layer"], e["expert"]): e for e in report["experts"]}
        for layer_idx, x in inputs.items():
            outputs = _plain_expert_outputs(model_type, model.model.layers[layer_idx].mlp, x)
            for e in range(model.model.layers[layer_idx].mlp.experts.num_experts):
                entry = by_key[(layer_idx, e)]
                if e not in outputs:
                    assert entry["count"] == 0 and entry["max_output"] == 0.0
                    continue
                y, w = outputs[e]
                assert entry["count"] == y.shape[0]
                assert entry["max_output"] == pytest.approx(y.abs().max().item(), rel=1e-5)
                assert entry["reap"] == pytest.approx((w * y.norm(dim=-1)).mean().item(), rel=1e-4)


def test_hidden_recorder_keeps_its_sample_not_the_batch():
    """Its median sample was a strided view of the batch's |h|: every layer kept every token's hidden state alive
    (detect --samples 2000 on the default model ran out of memory)."""
    from se_compress.detect.stats import HiddenRecorder

    rec = HiddenRecorder(hidden_size=256, seq_len=512, sample_per_batch=4096)
    rec.update(torch.randn(8, 512, 256))
    sample = rec.samples[-1]
    assert sample.numel() == 4096 and sample.untyped_storage().nbytes() == 4096 * 4
