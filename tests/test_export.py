"""The streamed writer: a layer-by-layer copy reloads in plain transformers with identical logits."""
import copy
import shutil

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


def test_studies_of_the_input_model_are_not_copied(tiny_model, tmp_path):
    """The shipped default model's folder holds its training log and ablation; a compressed copy must not carry them
    as if they described it. Tokenizer and generation files do travel."""
    src = tmp_path / "src"
    shutil.copytree(tiny_model("qwen3_moe"), src)
    for name in ["ablation.json", "training.json", "se_report.json", "compression_report.json"]:
        (src / name).write_text("{}")
    out = copy_streamed(src, tmp_path / "copy")
    copied = {f.name for f in out.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= copied
    assert not copied & {"ablation.json", "training.json", "se_report.json", "compression_report.json"}


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


def test_a_loaded_layer_owns_its_memory_and_leaves_no_mapping_of_its_shard(tiny_model):
    """Issue 19 (peak RSS): the file pages a layer was read from count in RSS while they stay mapped; a loaded layer
    holds copies, so its shard is unmapped as soon as the layer is read."""
    src = tiny_model("qwen3_moe", dtype=torch.bfloat16, max_shard_size="200KB")
    ckpt = Checkpoint(src)
    sm = StreamedModel(ckpt)
    layer = sm.load_layer(1)
    maps = open("/proc/self/maps").read()
    assert not any(f.name in maps for f in ckpt.files)
    assert layer.mlp.experts.down_proj.dtype == torch.float32  # CPU compute dtype
    held = StreamedModel(ckpt, keep_stored_dtype=True).load_layer(1)  # a pass that only edits and writes
    assert held.mlp.experts.down_proj.dtype == torch.bfloat16
    assert torch.equal(held.mlp.experts.down_proj.float(), layer.mlp.experts.down_proj)
    assert torch.equal(held.mlp.experts.gate_up_proj[3, :held.mlp.experts.down_proj.shape[-1]],
                       ckpt.get("model.layers.1.mlp.experts.3.gate_proj.weight"))


def test_output_shards_are_capped_whatever_the_input(tiny_model, tmp_path, monkeypatch):
    """A shard waits in memory until it is written: one file per input (or the input's 4-5 GB shards) would hold
    several quantized layers in RAM, so shards stop at MAX_SHARD_BYTES; a small model stays one file."""
    from se_compress.export import writer

    src = tiny_model("qwen3_moe")
    assert len(Checkpoint(src).files) == 1
    assert len(Checkpoint(copy_streamed(src, tmp_path / "one")).files) == 1
    monkeypatch.setattr(writer, "MAX_SHARD_BYTES", 100_000)
    out = copy_streamed(src, tmp_path / "capped")
    files = Checkpoint(out).files
    assert len(files) > 2 and (out / "model.safetensors.index.json").exists()
    biggest_tensor = max(t.numel() * t.element_size() for t in map(Checkpoint(src).get, Checkpoint(src).weight_map))
    assert max(f.stat().st_size for f in files) < 100_000 + biggest_tensor + 50_000  # one tensor past the cap, header
    x = torch.randint(3, 500, (2, 12))
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(src)(x).logits,
                           AutoModelForCausalLM.from_pretrained(out)(x).logits)
