import json

import pytest

from conftest import planted
from se_compress.detect import detect
from se_compress.detect.rule import Criterion
from se_compress.eval.ablation import ablate, write_ablation


def test_ablation_zeroes_the_ses_and_draws_matching_random_sets(tiny_model, tmp_path):
    path = tiny_model("deepseek_v3")
    report = detect(str(path), samples=4, seqlen=32, criterion=Criterion(quantile=0.95), progress=False)
    result = ablate(str(path), se_report=report, draws=3, max_windows=6, sink_windows=2, progress=False)
    ses = sorted(tuple(k) for k in result["super_experts"])
    assert ses == sorted((l, e) for l, e, _ in planted("deepseek_v3"))
    assert len(result["random_ppl"]) == len(result["layer_matched_ppl"]) == 3
    for draw in result["random_experts"]:
        assert len(draw) == len(ses) and not set(map(tuple, draw)) & set(ses)
    for draw in result["layer_matched_experts"]:  # one per SE, in the SE's own layer
        assert sorted(l for l, _ in draw) == sorted(l for l, _ in ses)
    assert result["se_ppl"] != result["base_ppl"]  # the planted SE's output reaches the logits
    assert len(result["sink_attention"]["base"]) == 4
    se = result["intervals_vs_base"]["se"]  # paired over the same 6 windows as the base
    assert se["windows"] == 6 and se["ratio"] == pytest.approx(result["se_ppl"] / result["base_ppl"])
    assert se["low"] <= se["ratio"] <= se["high"] and len(result["intervals_vs_base"]) == 1 + 3 + 3
    out = write_ablation(result, tmp_path / "abl")
    saved = json.loads((out / "ablation.json").read_text())
    for key in ["base_ppl", "se_ppl", "random_ppl", "layer_matched_ppl", "sink_attention"]:
        assert key in saved
    md = (out / "ablation.md").read_text()
    assert (out / "ablation.png").exists() and "| Super Experts |" in md and f"[{se['low']:.3f}, {se['high']:.3f}]" in md
