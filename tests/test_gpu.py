"""CPU vs GPU on the same tiny planted models (run by bench/gpu_checks.sh; skipped where CUDA is absent):
the same SE set and statistics, GPTQ codes that agree, and a pack-quantized checkpoint written on the GPU that
plain transformers loads on the CPU with the logits of its own fake-quant twin."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from se_compress.models.placement import Placement, use_device

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SE_REPORT = {"super_experts": [{"layer": 2, "expert": 5, "channel": 7, "token_id": 0, "position": 0}]}
CPU = lambda: Placement(torch.device("cpu"))  # noqa: E731
GPU = lambda **kw: Placement(torch.device("cuda"), **kw)  # noqa: E731


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v2", "mixtral"])
@pytest.mark.parametrize("activations", ["device", "host"])
def test_detect_same_super_experts_and_statistics(model_type, activations, tiny_model):
    from se_compress.detect import detect

    src = str(tiny_model(model_type))
    kw = dict(samples=8, seqlen=64, progress=False)
    with use_device(CPU()):
        cpu = detect(src, **kw)
    with use_device(GPU(activations=activations)) as p:
        gpu = detect(src, **kw)
        assert p.describe()["activations"].startswith(activations)
    assert [(s["layer"], s["expert"]) for s in cpu["super_experts"]] == [(s["layer"], s["expert"]) for s in gpu["super_experts"]]
    a = torch.tensor([e["max_output"] for e in cpu["experts"]])
    b = torch.tensor([e["max_output"] for e in gpu["experts"]])
    assert torch.allclose(a, b, rtol=0.05, atol=0.05 * float(a.median()))  # bf16 on the GPU, fp32 on the CPU
    counts_equal = sum(x["count"] == y["count"] for x, y in zip(cpu["experts"], gpu["experts"])) / len(cpu["experts"])
    assert counts_equal >= 0.9  # bf16 can flip a near-tied top-k choice for a few tokens


def test_gptq_on_gpu_matches_cpu():
    from se_compress.quant.gptq import gptq_quantize_batched, prepare_hessians
    from se_compress.quant.rtn import QuantSpec

    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 128, 256, generator=g) * 0.02
    X = torch.randn(16, 512, 256, generator=g)
    H = X.transpose(1, 2) @ X / 512
    spec = QuantSpec(4, 64, True)
    for act_order in (False, True):
        cpu = gptq_quantize_batched(W, prepare_hessians(H, act_order=act_order), spec, torch.float32)
        gpu = gptq_quantize_batched(W.cuda(), prepare_hessians(H.cuda(), act_order=act_order), spec, torch.float32)
        same = sum(int((c.q == q.q.cpu()).sum()) for c, q in zip(cpu, gpu)) / W.numel()
        assert same > 0.99  # fp32 reductions in another order flip a rare rounding tie, and GPTQ carries it on
        err_cpu = sum(float((c.dequantize() - w).pow(2).sum()) for c, w in zip(cpu, W))
        err_gpu = sum(float((q.dequantize().cpu() - w).pow(2).sum()) for q, w in zip(gpu, W))
        assert abs(err_gpu - err_cpu) <= 0.02 * err_cpu


def test_pack_quantized_written_on_gpu_loads_on_cpu_with_fake_quant_logits(tiny_model, tokenizer, tmp_path):
    from se_compress.quant import quantize_model

    src = tiny_model("qwen3_moe", dtype=torch.bfloat16)
    kw = dict(method="gptq", bits=4, group_size=16, se_policy="noclip,calib", se_report=SE_REPORT, samples=4, seqlen=32,
              progress=False)
    with use_device(GPU()):
        packed = quantize_model(str(src), tmp_path / "packed", **kw)
        fake = quantize_model(str(src), tmp_path / "fake", output_format="fake-quant", **kw)
    x = torch.randint(3, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    x[:, 0] = tokenizer.bos_token_id
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(packed, dtype=torch.float32)(x).logits
        b = AutoModelForCausalLM.from_pretrained(fake, dtype=torch.float32)(x).logits
    assert torch.isfinite(a).all()
    assert torch.allclose(a, b, atol=2e-2 * float(b.abs().max()))
