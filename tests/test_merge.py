"""Expert merging on tiny planted-SE models: fewer experts in a plain checkpoint, SEs kept alone, exact when the
merged experts were identical."""
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from se_compress.errors import SECompressError
from se_compress.merge import merge_model, plan_clusters
from se_compress.merge.cluster import average_linkage
from se_compress.models.adapters import adapter_for

CALIB = dict(samples=6, seqlen=32)


def load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def moe_blocks(model):
    adapter = adapter_for(model.config)
    for i, layer in enumerate(model.model.layers):
        if adapter.is_moe_layer(model.config, i):
            moe = adapter.moe_block(layer)
            yield i, getattr(moe, adapter.router_attr), moe.experts


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_merging_two_identical_experts_keeps_the_outputs(model_type, tiny_model, tmp_path):
    """Experts 3 and 4 made identical (weights, biases, router row) with top-1 routing: before, a token whose best
    expert is 3 or 4 gets that output with weight 1; after, the merged expert has the same row and weights."""
    model = load(tiny_model(model_type))
    model.config.num_experts_per_tok = 1
    with torch.no_grad():
        for _, router, experts in moe_blocks(model):
            router.top_k = 1
            for _, tensor in list(experts.named_parameters()) + list(router.named_parameters()):
                tensor[3] = tensor[4]
    src = tmp_path / "src"
    model.save_pretrained(src)
    AutoTokenizer.from_pretrained(tiny_model(model_type)).save_pretrained(src)

    out = merge_model(str(src), tmp_path / "merged", keep=15, se_policy="singleton", progress=False, **CALIB)
    report = json.loads((out / "compression_report.json").read_text())
    for layer in report["layers"]:
        assert [c["members"] for c in layer["clusters"] if len(c["members"]) > 1] == [[3, 4]]
    ids = torch.randint(3, 500, (3, 24))
    ids[:, 0] = 0
    with torch.no_grad():
        torch.testing.assert_close(load(out)(ids).logits, load(src)(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type,keep", [("qwen3_moe", 6), ("mixtral", 6), ("deepseek_v3", 8)])
def test_merged_checkpoint_is_smaller_keeps_the_se_alone_and_groups(model_type, keep, tiny_model, tmp_path):
    from se_compress.detect import detect
    from se_compress.detect.rule import Criterion

    src = tiny_model(model_type)
    se_report = detect(str(src), criterion=Criterion(quantile=0.95), progress=False, **CALIB)
    out = merge_model(str(src), tmp_path / "merged", keep=keep, se_report=se_report, progress=False, **CALIB)
    report = json.loads((out / "compression_report.json").read_text())
    before, after = load(src), load(out)
    for key in adapter_for(after.config).expert_count_keys:
        assert getattr(after.config, key) == keep
    assert after.config.num_experts_per_tok == 2
    assert "Expert merging" in (out / "README.md").read_text()
    blocks_before = {i: (r, e) for i, r, e in moe_blocks(before)}
    for i, router, experts in moe_blocks(after):
        clusters = [c["members"] for c in next(l for l in report["layers"] if l["layer"] == i)["clusters"]]
        assert sorted(e for c in clusters for e in c) == list(range(16)) and len(clusters) == keep
        assert experts.down_proj.shape[0] == keep and router.weight.shape[0] == keep
        if model_type == "deepseek_v3":  # every merge stays inside one group of four, keep/4 clusters per group
            assert all(len({e // 4 for e in c}) == 1 for c in clusters)
            assert [c[0] // 4 for c in clusters] == [0, 0, 1, 1, 2, 2, 3, 3]
            assert router.e_score_correction_bias.shape == (keep,)
        for j, members in enumerate(clusters):  # merged weights: frequency-weighted mean of the members
            entry = next(l for l in report["layers"] if l["layer"] == i)["clusters"][j]
            expected = sum(w * blocks_before[i][1].down_proj[e].double() for w, e in zip(entry["weights"], members))
            torch.testing.assert_close(experts.down_proj[j].double(), expected, atol=1e-6, rtol=1e-5)
    se_layer = next(l for l in report["layers"] if l["layer"] == 2)["clusters"]
    alone = next(j for j, c in enumerate(se_layer) if 5 in c["members"])
    assert se_layer[alone]["members"] == [5] and "Super Expert" in se_layer[alone]["why"]
    se_experts = dict((i, e) for i, _, e in moe_blocks(after))[2]
    assert torch.equal(se_experts.gate_up_proj[alone], blocks_before[2][1].gate_up_proj[5])
    assert torch.equal(se_experts.down_proj[alone], blocks_before[2][1].down_proj[5])
    assert after.generate(torch.tensor([[0, 40, 41]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_average_linkage_matches_scipy():
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist, squareform

    points = np.random.default_rng(0).normal(size=(24, 5))
    distance = squareform(pdist(points))
    ours = average_linkage(distance, 6)
    labels = fcluster(linkage(pdist(points), method="average"), 6, criterion="maxclust")
    theirs = sorted(sorted(np.flatnonzero(labels == k).tolist()) for k in set(labels))
    assert ours == theirs


def test_singleton_ses_and_bad_requests():
    distance = np.ones((4, 4)) - np.eye(4)
    assert plan_clusters(distance, {0}, keep=2, groups=1, singleton=True, layer=0) == [[0], [1, 2, 3]]
    with pytest.raises(SECompressError, match="keeping each SE alone"):
        plan_clusters(distance, {0, 1}, keep=2, groups=1, singleton=True, layer=3)


@pytest.mark.parametrize("kwargs,needle", [(dict(keep=1), "below num_experts_per_tok=2"),
                                           (dict(fraction=1.5), "--fraction must be in (0, 1)"),
                                           (dict(keep=8, se_policy="protect"), "unknown --se-policy")])
def test_merge_refuses_bad_requests(kwargs, needle, tiny_model, tmp_path):
    with pytest.raises(SECompressError) as err:
        merge_model(str(tiny_model("qwen3_moe")), tmp_path / "out", progress=False, **kwargs)
    assert needle in str(err.value) and not (tmp_path / "out").exists()


def test_cli_merge(tiny_model, tmp_path):
    from test_cli_errors import assert_one_line_error, run_cli

    src = str(tiny_model("qwen3_moe"))
    code, _, err = run_cli("merge", src, "--out", str(tmp_path / "a"), "--keep", "1")
    assert_one_line_error(code, err, "below num_experts_per_tok=2")
    code, out, err = run_cli("merge", src, "--out", str(tmp_path / "b"), "--keep", "8", "--samples", "4", "--seqlen", "16")
    assert code == 0, err
    assert "merge: 16 -> 8 routed experts" in out and "merged with others: none" in out
    assert load(tmp_path / "b").config.num_experts == 8
