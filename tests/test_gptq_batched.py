"""Batched expert GPTQ (gptq_quantize_batched) gives what one expert at a time gives, on the real Hessians of a
tiny Qwen3-MoE layer: shared gate/up Hessian and per-expert down_proj Hessians, with act-order, asymmetric grids,
per-expert clip flags and a pinned super weight; an indefinite Hessian fails alone; and quantize_model with a
work budget of one expert per chunk writes the same checkpoint as the default batched run."""
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from se_compress.models.placement import Placement, use_device
from se_compress.quant import quantize_model
from se_compress.quant.gptq import gptq_quantize, gptq_quantize_batched, prepare_hessian, prepare_hessians
from se_compress.quant.hessian import ExpertCollector, expert_weights, use_collector
from se_compress.quant.policies import super_weight_mask
from se_compress.quant.rtn import QuantSpec

SE_REPORT = {"super_experts": [{"layer": 2, "expert": 5, "channel": 7, "token_id": 0, "position": 0}]}


@pytest.fixture(scope="module")
def layer_problem(tiny_model, tokenizer):
    """(gate_up [E, 2I, H], down [E, H, I], shared input Hessian [H, H], down Hessians [E, I, I]) of layer 2."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model("qwen3_moe")).eval()
    moe = model.model.layers[2].mlp
    experts = moe.experts
    ids = torch.randint(3, len(tokenizer), (4, 32), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = tokenizer.bos_token_id
    captured = {}
    handle = moe.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    collector = ExpertCollector(experts, "all", set(), {})
    with torch.no_grad(), use_collector(experts, collector):
        moe(captured["x"])  # the MoE block alone: the experts implementation is set on the model-wide config
    gate_up = torch.stack([expert_weights(experts, e)[0] for e in range(experts.num_experts)]).detach().clone()
    down = torch.stack([expert_weights(experts, e)[1] for e in range(experts.num_experts)]).detach().clone()
    H_down = torch.stack([collector.down[e].final() for e in range(experts.num_experts)])
    return gate_up, down, collector.shared_in.final(), H_down


def _same(batched, single):
    for b, s in zip(batched, single):
        assert torch.equal(b.scale, s.scale)
        assert torch.equal(b.q, s.q)
        assert (b.zero is None) == (s.zero is None) and (b.zero is None or torch.equal(b.zero, s.zero))


@pytest.mark.parametrize("act_order,symmetric", [(False, True), (True, True), (True, False)])
def test_batched_down_proj_equals_one_expert_at_a_time(layer_problem, act_order, symmetric):
    _, down, _, H_down = layer_problem
    E = down.shape[0]
    spec = QuantSpec(4, 8, symmetric)
    clip = torch.tensor([e % 3 == 0 for e in range(E)])
    exact = torch.zeros(down.shape, dtype=torch.bool)
    exact[5] = super_weight_mask(down[5], 7)
    assert exact[5].any()  # the planted super weight is there to protect
    batched = gptq_quantize_batched(down, prepare_hessians(H_down, act_order=act_order), spec, torch.float32,
                                    clip=clip, exact=exact)
    single = [gptq_quantize(down[e], prepare_hessian(H_down[e], act_order=act_order), spec, torch.float32,
                            clip=bool(clip[e]), exact=exact[e] if exact[e].any() else None) for e in range(E)]
    _same(batched, single)
    w = down[5][exact[5]]
    assert torch.equal(batched[5].dequantize()[exact[5]], w)  # the super weight comes back exactly


def test_batched_gate_up_with_one_shared_hessian_equals_one_expert_at_a_time(layer_problem):
    gate_up, _, H_in, _ = layer_problem
    spec = QuantSpec(4, 16, True)
    prepared = prepare_hessian(H_in)  # batch of one, broadcast over the experts
    batched = gptq_quantize_batched(gate_up, prepared, spec, torch.bfloat16)
    single = [gptq_quantize(gate_up[e], prepared, spec, torch.bfloat16) for e in range(gate_up.shape[0])]
    _same(batched, single)


def test_an_indefinite_hessian_fails_alone(layer_problem):
    _, down, _, H_down = layer_problem
    H = H_down[:4].clone()
    n = H.shape[-1]
    H[2] = 100 * torch.ones(n, n) - 99 * torch.eye(n)  # diagonal 1, eigenvalues -99: 1000x damping (10) cannot help
    prepared = prepare_hessians(H)
    assert prepared["ok"].tolist() == [True, True, False, True]
    for e in (0, 1, 3):
        one = prepare_hessian(H_down[e])
        assert torch.equal(prepared["U"][e], one["U"][0])


def test_quantize_model_one_expert_per_chunk_writes_the_same_checkpoint(tiny_model, tmp_path):
    src = tiny_model("qwen3_moe")
    kw = dict(method="gptq", bits=4, group_size=16, se_policy="noclip,calib", se_report=SE_REPORT, samples=4,
              seqlen=32, progress=False)
    batched = quantize_model(str(src), tmp_path / "batched", **kw)
    with use_device(Placement(torch.device("cpu"), work_budget=1)):  # room for one expert: chunks of one
        alone = quantize_model(str(src), tmp_path / "alone", **kw)
    a, b = load_file(batched / "model.safetensors"), load_file(alone / "model.safetensors")
    assert a.keys() == b.keys() and any(".experts.5.down_proj.weight_packed" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
