"""The grouped routed-experts forward (models/expert_forward.py) that detection and Hessian collection share:
the layer's output equals transformers' own eager experts loop (to fp32 rounding) on real MoE blocks (fused and gpt-oss's transposed
layout with biases), each expert sees exactly its routed tokens in token order, expert-parallel sentinels belong
to no expert, the all-expert Hessians are the plain X^T X of every expert's intermediate, and an SE expert that no
token is routed to still gets the trigger tokens' Hessian; solve_chunk keeps a batched CPU step near the cache."""
import pytest
import torch
from transformers import GptOssConfig, Qwen3MoeConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from se_compress.models.expert_forward import expert_intermediate, group_by_expert, routed_experts_forward
from se_compress.models.placement import Placement, use_device
from se_compress.quant.gptq import CPU_ROWS_PER_STEP, solve_chunk
from se_compress.quant.hessian import ExpertCollector, use_collector


def _block(kind):
    torch.manual_seed(0)
    if kind == "qwen3_moe":
        config = Qwen3MoeConfig(hidden_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2)
        block = Qwen3MoeSparseMoeBlock(config)
    else:
        config = GptOssConfig(hidden_size=64, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)
        block = GptOssMLP(config)
    for p in block.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    return block.eval()


def _routing(tokens=40, experts=8, k=2, seed=1, unused=6):
    """Top-k routing table [tokens, k] (distinct experts per token) that never picks expert `unused`."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.tensor([e for e in range(experts) if e != unused])
    index = torch.stack([pick[torch.randperm(len(pick), generator=g)[:k]] for _ in range(tokens)])
    return index, torch.rand(tokens, k, generator=g)


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_output_equals_the_eager_experts_loop(kind):
    experts = _block(kind).experts
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(2))
    index, weights = _routing()  # expert 6: no token
    experts.config._experts_implementation = "eager"
    with torch.no_grad():
        eager = experts(x, index, weights)
        ours, groups = routed_experts_forward(experts, x, index, weights)
    # same math, same expert order; eager's rows are slot-major, ours token-major, and a BLAS row's last bit can
    # depend on its place in the block (CI's CPU differed where ours did not): equal to fp32 rounding
    torch.testing.assert_close(ours, eager, rtol=1e-6, atol=1e-6)
    assert groups.bounds[7] == groups.bounds[6]  # expert 6 got no token
    for e in range(8):
        assert groups.tokens[groups.rows(e)].tolist() == (index == e).any(-1).nonzero().flatten().tolist()


def test_sentinel_experts_belong_to_no_group():
    index = torch.tensor([[0, 8], [8, 2], [2, 0]])  # 8: an expert-parallel sentinel of a layer with 8 experts
    groups = group_by_expert(index, 8)
    assert groups.bounds[-1] == 4 and groups.bounds[1] == 2
    assert groups.tokens[groups.rows(0)].tolist() == [0, 2] and groups.tokens[groups.rows(2)].tolist() == [1, 2]
    assert (index.reshape(-1)[groups.slots[:4]] < 8).all()


def test_all_expert_hessians_are_every_experts_plain_xtx():
    experts = _block("qwen3_moe").experts
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(3))
    index, weights = _routing()
    collector = ExpertCollector(experts, "all", set(), {})
    with torch.no_grad(), use_collector(experts, collector):
        experts(x, index, weights)
        for e in range(8):
            h = expert_intermediate(experts, e, x)
            assert torch.allclose(collector.down[e].final(), h.T @ h / 40, atol=1e-6, rtol=1e-4)
    assert collector.count.tolist() == [int((index == e).sum()) for e in range(8)]
    assert torch.allclose(collector.shared_in.final(), x.T @ x / 40, atol=1e-6, rtol=1e-4)


def test_routed_mode_gives_an_unrouted_se_expert_the_trigger_tokens():
    experts = _block("qwen3_moe").experts
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(4))
    index, weights = _routing()  # no token routed to expert 6, which is an SE with trigger tokens 0 and 9
    trigger = torch.zeros(40, dtype=torch.bool)
    trigger[[0, 9]] = True
    collector = ExpertCollector(experts, "routed", {6}, {"mask": trigger})
    with torch.no_grad(), use_collector(experts, collector):
        experts(x, index, weights)
        h = expert_intermediate(experts, 6, x[trigger])
    assert collector.tokens(6) == 0 and collector.down[6].nt == 2
    assert torch.allclose(collector.down[6].Ht.float(), h.T @ h, atol=1e-6, rtol=1e-4)
    assert torch.allclose(collector.expert_in[6].Ht.float(), x[trigger].T @ x[trigger], atol=1e-6, rtol=1e-4)
    assert collector.down[5].nt == 0 and collector.down[5].n == int((index == 5).sum())


def test_solve_chunk_keeps_a_cpu_step_near_the_cache_and_a_budget_bound():
    with use_device(Placement(torch.device("cpu"))):
        assert solve_chunk(128, 2048, 768, own_hessian=True) == CPU_ROWS_PER_STEP // 2048
        assert solve_chunk(128, 32, 256, own_hessian=True) == 128
        assert solve_chunk(3, 32, 256, own_hessian=True) == 3
    with use_device(Placement(torch.device("cpu"), work_budget=1)):
        assert solve_chunk(128, 32, 256, own_hessian=True) == 1  # never more than the memory budget
