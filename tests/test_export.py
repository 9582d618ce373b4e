"""The streamed writer: a layer-by-layer copy reloads in plain transformers with identical logits."""
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from se_compress.errors import SECompressError
from se_compress.export import CheckpointWriter
from se_compress.models.checkpoint import Checkpoint
from se_compress.models.streaming import StreamedModel


def copy_streamed(src, out, **kwargs):
    ckpt = Checkpoint(src)
    sm = StreamedModel(ckpt)
    with CheckpointWriter(ckpt, out, copy.deepcopy(ckpt.config), **kwargs) as writer:
        writer.add_outside_layers(sm.model)
        for i in range(len(sm.layers)):
            writer.add_module(f"model.layers.{i}", sm.load_layer(i))
            sm.free_layer(i)
        return writer.finish()


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3"])
def test_round_trip_keeps_keys_and_logits(model_type, tiny_model, tmp_path):
    src = tiny_model(model_type)
    out = copy_streamed(src, tmp_path / "copy")
    assert set(Checkpoint(out).weight_map) == set(Checkpoint(src).weight_map)
    assert (out / "tokenizer.json").exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())
    x = torch.randint(3, 500, (2, 12))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(src)(x).logits
        b = AutoModelForCausalLM.from_pretrained(out)(x).logits
    assert torch.equal(a, b)


def test_sharded_input_gives_sharded_output(tiny_model, tmp_path):
    src = tiny_model("qwen3_moe", max_shard_size="200KB")
    assert len(Checkpoint(src).files) > 1
    out = copy_streamed(src, tmp_path / "copy")
    assert (out / "model.safetensors.index.json").exists()
    assert len(Checkpoint(out).files) == len(Checkpoint(src).files)


def test_refuses_to_overwrite_input_or_existing_output(tiny_model, tmp_path):
    src = tiny_model("qwen3_moe")
    with pytest.raises(SECompressError, match="overwrite the input"):
        CheckpointWriter(Checkpoint(src), src, Checkpoint(src).config)
    (tmp_path / "exists").mkdir()
    with pytest.raises(SECompressError, match="--force"):
        CheckpointWriter(Checkpoint(src), tmp_path / "exists", Checkpoint(src).config)


def test_failed_write_leaves_nothing_that_looks_complete(tiny_model, tmp_path):
    src = tiny_model("qwen3_moe")
    ckpt = Checkpoint(src)
    with pytest.raises(RuntimeError):
        with CheckpointWriter(ckpt, tmp_path / "out", copy.deepcopy(ckpt.config)) as writer:
            writer.add("model.norm.weight", torch.ones(4))
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
