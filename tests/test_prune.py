"""Expert pruning and the --zero ablation on tiny planted-SE models: the written checkpoints are standard, smaller,
load in plain transformers, and never lose a Super Expert under `protect`."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from se_compress.data.calibration import build_calibration
from se_compress.detect import detect
from se_compress.detect.rule import Criterion
from se_compress.errors import SECompressError
from se_compress.models.adapters import adapter_for
from se_compress.models.checkpoint import Checkpoint
from se_compress.prune import CRITERIA, prune_model, zero_experts_model
from test_cli_errors import assert_one_line_error, run_cli

CALIB = dict(samples=6, seqlen=32)
CRITERION = Criterion(quantile=0.95)  # two planted SEs among ~50 experts need a lower quantile (see test_detect)


def se_report(path):
    return detect(str(path), criterion=CRITERION, progress=False, **CALIB)


def load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def edited_copy(src, dst, edit):
    """Save a copy of the model at `src` after `edit(model)` (and its tokenizer)."""
    model = load(src)
    with torch.no_grad():
        edit(model)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def routers(model):
    adapter = adapter_for(model.config)
    for i, layer in enumerate(model.model.layers):
        if adapter.is_moe_layer(model.config, i):
            yield i, getattr(adapter.moe_block(layer), adapter.router_attr), adapter.moe_block(layer).experts


def layer_plan(report, layer):
    return next(l for l in report["layers"] if l["layer"] == layer)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v2", "gpt_oss"])
def test_pruned_checkpoint_is_smaller_standard_and_keeps_the_right_experts(model_type, tiny_model, tmp_path):
    src = tiny_model(model_type)
    out = prune_model(str(src), tmp_path / "pruned", fraction=0.25, criterion="reap", progress=False, **CALIB)
    report = json.loads((out / "compression_report.json").read_text())
    assert report["experts_before"] == 16 and report["experts_after"] == 12
    assert "Expert pruning" in (out / "README.md").read_text()
    assert (out / "tokenizer.json").exists()
    assert (out / "generation_config.json").exists() == (src / "generation_config.json").exists()

    before, after = load(src), load(out)  # plain transformers
    adapter = adapter_for(after.config)
    for key in adapter.expert_count_keys:
        assert getattr(after.config, key) == 12, key
    assert after.config.num_experts_per_tok == before.config.num_experts_per_tok
    for (i, router_b, experts_b), (_, router_a, experts_a) in zip(routers(before), routers(after)):
        kept = layer_plan(report, i)["kept"]
        assert len(kept) == 12
        for name, tensor in list(experts_a.named_parameters()) + list(router_a.named_parameters()):
            original = dict(list(experts_b.named_parameters()) + list(router_b.named_parameters()))[name]
            assert torch.equal(tensor, original[kept]), (i, name)  # renumbered 0..11, in original order
    assert 5 in layer_plan(report, 2)["kept"]  # the planted SE survives (protect, the default)
    generated = after.generate(torch.tensor([[0, 40, 41]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)


def test_sharded_input_gives_sharded_output(tiny_model, tmp_path):
    src = tiny_model("qwen3_moe", max_shard_size="200KB")
    report = se_report(src)
    out = prune_model(str(src), tmp_path / "pruned", keep=8, se_report=report, progress=False)
    assert (out / "model.safetensors.index.json").exists() and len(Checkpoint(out).files) > 1
    assert "model.layers.2.mlp.experts.7.down_proj.weight" in Checkpoint(out)
    assert "model.layers.2.mlp.experts.8.down_proj.weight" not in Checkpoint(out)


UNREACHED = [0, 9, 13]


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_pruning_experts_no_token_reaches_keeps_the_logits(model_type, tiny_model, tmp_path):
    """Exact where the routing weights of the chosen experts do not depend on the others' logits: softmax top-k
    renormalized (Qwen3 with norm_topk_prob, Mixtral) or softmax over the top-k logits (gpt-oss)."""

    def unreachable(model):
        for _, router, _ in routers(model):
            router.weight[UNREACHED] = 0.0  # logit 0: below the top 2 of 13 random logits on these tokens
            if model_type == "gpt_oss":
                router.bias[UNREACHED] = -1e4

    src = edited_copy(tiny_model(model_type), tmp_path / "src", unreachable)
    report = se_report(src)
    unreached = {i: {e["expert"] for e in report["experts"] if e["layer"] == i and e["count"] == 0}
                 for i in report["moe_layers"]}
    assert all(set(UNREACHED) <= experts for experts in unreached.values())  # on exactly these calibration tokens
    out = prune_model(str(src), tmp_path / "pruned", keep=13, criterion="frequency", se_report=report, progress=False)
    for layer in json.loads((out / "compression_report.json").read_text())["layers"]:
        removed = {r["expert"] for r in layer["removed"]}
        assert len(removed) == 3 and removed <= unreached[layer["layer"]]
    ids = build_calibration(AutoTokenizer.from_pretrained(src), "wikitext2", CALIB["samples"], CALIB["seqlen"], 0).input_ids
    with torch.no_grad():
        torch.testing.assert_close(load(out)(ids).logits, load(src)(ids).logits, atol=1e-5, rtol=0)


def rare_super_expert(model):
    """Make the planted SE (2,5) of the gpt-oss tiny model fire on BOS only: lower its router bias until no other
    calibration token picks it. Its output on BOS (the massive activation) is unchanged."""
    tokenizer_bos = model.config.bos_token_id
    ids = torch.randint(3, 500, (8, 32))
    ids[:, 0] = tokenizer_bos
    captured = []
    moe = model.model.layers[2].mlp
    handle = moe.register_forward_pre_hook(lambda m, a: captured.append(a[0].reshape(-1, a[0].shape[-1])))
    model(ids)
    handle.remove()
    se_logit = captured[0] @ moe.router.weight[5] + moe.router.bias[5]  # [8 * 32]
    not_bos = (ids.reshape(-1) != tokenizer_bos)
    moe.router.bias[5] -= se_logit[not_bos].max() + 20.0


def test_protect_never_removes_an_se_that_naive_frequency_removes(tiny_model, tmp_path):
    src = edited_copy(tiny_model("gpt_oss"), tmp_path / "src", rare_super_expert)
    report = se_report(src)
    assert [(s["layer"], s["expert"]) for s in report["super_experts"]] == [(2, 5)]
    se_count = next(e["count"] for e in report["experts"] if (e["layer"], e["expert"]) == (2, 5))
    assert se_count == CALIB["samples"]  # BOS only: the least used expert of its layer

    naive = prune_model(str(src), tmp_path / "naive", keep=12, criterion="frequency", se_policy="none",
                        se_report=report, progress=False)
    naive_report = json.loads((naive / "compression_report.json").read_text())
    assert naive_report["super_experts_removed"] == [{"layer": 2, "expert": 5}]
    assert 5 not in layer_plan(naive_report, 2)["kept"]

    for criterion in CRITERIA:
        out = prune_model(str(src), tmp_path / criterion, keep=4, criterion=criterion, se_policy="protect",
                          se_report=report, progress=False)
        result = json.loads((out / "compression_report.json").read_text())
        assert 5 in layer_plan(result, 2)["kept"] and result["super_experts_removed"] == [], criterion
    assert [p["expert"] for p in layer_plan(json.loads((tmp_path / "frequency" / "compression_report.json").read_text()),
                                            2)["protected_super_experts"]] == [5]
    # The protected SE still writes its massive activation on BOS in the pruned checkpoint.
    assert se_report(tmp_path / "frequency")["super_experts"][0]["layer"] == 2


def test_deepseek_v3_keeps_group_structure_and_slices_the_correction_bias(tiny_model, tmp_path):
    def numbered_bias(model):
        for _, router, _ in routers(model):
            router.e_score_correction_bias.copy_(torch.arange(16, dtype=torch.float32) / 100)

    src = edited_copy(tiny_model("deepseek_v3"), tmp_path / "src", numbered_bias)
    report = se_report(src)
    out = prune_model(str(src), tmp_path / "pruned", keep=8, criterion="ean", se_report=report, progress=False)
    result = json.loads((out / "compression_report.json").read_text())
    model = load(out)
    assert model.config.n_group == 4 and model.config.n_routed_experts == 8 and model.config.topk_group == 2
    for i, router, experts in routers(model):
        kept = layer_plan(result, i)["kept"]
        assert [e // 4 for e in kept] == [0, 0, 1, 1, 2, 2, 3, 3]  # two of each group of four, groups in order
        assert torch.equal(router.e_score_correction_bias, torch.tensor(kept, dtype=torch.float32) / 100)
        assert experts.gate_up_proj.shape[0] == 8
    assert model.generate(torch.tensor([[0, 40]]), max_new_tokens=3, do_sample=False).shape == (1, 5)
    with pytest.raises(SECompressError, match="not divisible by n_group=4"):
        prune_model(str(src), tmp_path / "bad", keep=10, se_report=report, progress=False)
    with pytest.raises(SECompressError, match="2 best experts"):
        prune_model(str(src), tmp_path / "bad", keep=4, se_report=report, progress=False)


def test_zero_keeps_shapes_and_zeroes_only_the_named_down_projs(tiny_model, tmp_path):
    src = tiny_model("qwen2_moe")
    out = zero_experts_model(str(src), tmp_path / "zeroed", "2:5,3:shared,1:0", progress=False)
    before, after = load(src), load(out)
    assert after.config.num_experts == 16
    zeroed = {"model.layers.2.mlp.experts.down_proj": 5, "model.layers.1.mlp.experts.down_proj": 0}
    params_b = dict(before.named_parameters())
    for name, tensor in after.named_parameters():
        if name in zeroed:
            e = zeroed[name]
            assert tensor[e].abs().max() == 0
            keep = [i for i in range(16) if i != e]
            assert torch.equal(tensor[keep], params_b[name][keep])
        elif name == "model.layers.3.mlp.shared_expert.down_proj.weight":
            assert tensor.abs().max() == 0
        else:
            assert torch.equal(tensor, params_b[name]), name

    report = se_report(src)
    out = zero_experts_model(str(src), tmp_path / "random", "random:3", se_report=report, seed=1, progress=False)
    picked = json.loads((out / "compression_report.json").read_text())["zeroed"]
    assert len(picked) == 3 and not any(p["super_expert"] for p in picked)
    out = zero_experts_model(str(src), tmp_path / "se", "se", se_report=report, progress=False)
    picked = json.loads((out / "compression_report.json").read_text())["zeroed"]
    assert {(p["layer"], p["expert"]) for p in picked} == {(2, 5), (3, "shared")}
    with pytest.raises(SECompressError, match="not an MoE layer|routed experts"):
        zero_experts_model(str(src), tmp_path / "bad", "2:16", progress=False)
    with pytest.raises(SECompressError, match="bad --zero item"):
        zero_experts_model(str(src), tmp_path / "bad", "2-5", progress=False)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(fraction=1.0), "--fraction must be in (0, 1)"),
    (dict(fraction=0.01), "rounds to none removed"),
    (dict(keep=16), "removes nothing"),
    (dict(fraction=0.25, keep=4), "exactly one of --fraction"),
    (dict(keep=4, criterion="size"), "unknown --criterion"),
    (dict(keep=4, se_policy="keep"), "unknown --se-policy"),
])
def test_bad_requests_are_refused_before_any_work(kwargs, needle, tiny_model, tmp_path):
    with pytest.raises(SECompressError) as err:
        prune_model(str(tiny_model("qwen3_moe")), tmp_path / "out", progress=False, **kwargs)
    assert needle in str(err.value) and not (tmp_path / "out").exists()


def test_se_report_of_another_model_is_refused(tiny_model, tmp_path):
    report = se_report(tiny_model("qwen3_moe"))
    with pytest.raises(SECompressError, match="made for a qwen3_moe model"):
        prune_model(str(tiny_model("mixtral")), tmp_path / "out", keep=8, se_report=report, progress=False)


def test_cli_prune_and_one_line_errors(tiny_model, tmp_path):
    src = str(tiny_model("qwen3_moe"))
    code, _, err = run_cli("prune", src, "--out", str(tmp_path / "a"), "--fraction", "1")
    assert_one_line_error(code, err, "--fraction must be in (0, 1)")
    code, _, err = run_cli("prune", src, "--out", str(tmp_path / "b"), "--keep", "1")
    assert_one_line_error(code, err, "below num_experts_per_tok=2", "keep at least 2")
    report_dir = tmp_path / "report"
    report_dir.mkdir()
    (report_dir / "se_report.json").write_text(json.dumps(se_report(src)))
    code, out, err = run_cli("prune", src, "--out", str(tmp_path / "c"), "--keep", "8", "--criterion", "frequency",
                             "--se-report", str(report_dir))
    assert code == 0, err
    assert "16 -> 8 routed experts" in out and "Super Experts (2,5)" in out and "removed: none" in out
    assert load(tmp_path / "c").config.num_experts == 8
