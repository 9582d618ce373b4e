"""The training command on a small slice: it runs, keeps the planted super weights fixed, and writes a
checkpoint that loads with plain transformers (training itself is not run in CI)."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO
from se_compress.default_model.plant import PlantSpec
from se_compress.default_model.train import main as train_main


@pytest.mark.parametrize("plant", ["se", "se+sink"])
def test_training_command_writes_a_loadable_checkpoint_with_the_plant_intact(tmp_path, plant):
    data = tmp_path / "books"
    data.mkdir()
    (data / "book.txt").write_text((REPO / "se_compress/data/text/c4-sample.txt").read_text()[:200_000])
    train_main(["--data", str(data), "--out", str(tmp_path / "run"), "--small", "--steps", "6", "--batch", "4",
                "--seq-len", "64", "--vocab", "300", "--warmup", "2", "--threads", "1", "--plant", plant])
    final = tmp_path / "run" / "final"
    meta = json.loads((final / "training.json").read_text())
    assert meta["steps_done"] == 6 and meta["tokens_seen"] == 6 * 4 * 64
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer("hello")["input_ids"][0] == tokenizer.bos_token_id
    spec = PlantSpec(**meta["plant"])
    down = model.model.layers[spec.se1_layer].mlp.experts.down_proj
    assert down[spec.se1_expert, spec.massive_channel, spec.se1_neuron].item() == spec.se1_super_weight
    # The super weight writes a massive value into its channel on BOS, and not on ordinary tokens.
    ids = tokenizer("The cat sat on the mat", return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[spec.se1_layer + 1][0, :, spec.massive_channel]
    assert hidden[0].abs() > 50 * hidden[1:].abs().max()
    attn = model.model.layers[-1].self_attn
    sink_dim = model.config.head_dim // 2 - 1
    if plant == "se+sink":  # the held sink route survived training: constant query, key reading the massive channel
        assert model.config.attention_bias and attn.q_proj.bias[sink_dim].item() == spec.sink_query_bias
        assert attn.k_proj.weight[sink_dim, spec.massive_channel].item() == pytest.approx(spec.sink_key_weight, rel=1e-2)
        assert attn.o_proj.weight[spec.massive_channel].abs().max().item() == 0
    else:
        assert not model.config.attention_bias and attn.q_proj.bias is None


def test_grouped_mm_matches_eager_for_training(tiny_model):
    """Training uses transformers' grouped_mm experts (faster here); it must compute what eager computes."""
    path = tiny_model("qwen3_moe")
    x = torch.randint(3, 500, (2, 16))
    outputs = {}
    for impl in ["eager", "grouped_mm"]:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation=impl)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        outputs[impl] = (loss.item(), model.model.layers[1].mlp.experts.down_proj.grad.clone())
    assert abs(outputs["eager"][0] - outputs["grouped_mm"][0]) < 1e-5
    assert torch.allclose(outputs["eager"][1], outputs["grouped_mm"][1], atol=1e-6)


def test_training_continues_from_a_checkpoint_with_the_sink_route(tmp_path):
    """--init-from keeps the checkpoint's tokenizer and weights; --plant se+route adds the sink route (zero attention
    biases but the held query constant) and --plant-set overrides one plant field."""
    data = tmp_path / "books"
    data.mkdir()
    (data / "book.txt").write_text((REPO / "se_compress/data/text/c4-sample.txt").read_text()[:200_000])
    common = ["--data", str(data), "--small", "--batch", "4", "--seq-len", "64", "--vocab", "300", "--warmup", "2",
              "--threads", "1"]
    train_main(common + ["--out", str(tmp_path / "first"), "--steps", "3", "--keep-checkpoints", "--save-minutes", "0"])
    assert sorted(p.name for p in (tmp_path / "first").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2",
                                                                                 "checkpoint-3"]
    first = tmp_path / "first" / "final"
    train_main(common + ["--out", str(tmp_path / "second"), "--steps", "2", "--init-from", str(first),
                         "--plant", "se+route", "--plant-set", "sink_query_bias=7.5", "--lr", "0"])
    second = tmp_path / "second" / "final"
    assert (second / "tokenizer.json").read_text() == (first / "tokenizer.json").read_text()
    before = AutoModelForCausalLM.from_pretrained(first, dtype=torch.float32)
    after = AutoModelForCausalLM.from_pretrained(second, dtype=torch.float32)
    meta = json.loads((second / "training.json").read_text())
    assert meta["plant"]["sink_query_bias"] == 7.5 and meta["plant"]["bias_channel"] is None
    spec = PlantSpec(**meta["plant"])
    sink_dim = after.config.head_dim // 2 - 1
    attn = after.model.layers[-1].self_attn
    assert after.config.attention_bias and attn.q_proj.bias[sink_dim].item() == 7.5
    assert attn.q_proj.bias.abs().sum().item() == pytest.approx(7.5 * after.config.num_attention_heads)
    assert attn.v_proj.bias.abs().max().item() == 0 and attn.o_proj.bias.abs().max().item() == 0
    # layers before the route get the new biases too, at zero: the continued model computes what the checkpoint did
    first_attn = after.model.layers[0].self_attn
    assert all(proj.bias.abs().max().item() == 0 for proj in
               (first_attn.q_proj, first_attn.k_proj, first_attn.v_proj, first_attn.o_proj))
    # lr 0: every weight the route does not hold comes through unchanged (the MLPs here; attention rows are held).
    assert torch.equal(before.model.layers[-1].mlp.experts.gate_up_proj, after.model.layers[-1].mlp.experts.gate_up_proj)
    assert attn.o_proj.weight[spec.massive_channel].abs().max().item() == 0


def test_bad_experiment_options_are_one_line_errors(tmp_path):
    data = tmp_path / "books"
    data.mkdir()
    (data / "book.txt").write_text((REPO / "se_compress/data/text/c4-sample.txt").read_text()[:50_000])
    run = ["--data", str(data), "--out", str(tmp_path / "run"), "--small", "--steps", "1", "--vocab", "300"]
    with pytest.raises(SystemExit, match="PlantSpec has no field 'sink_qery_bias'"):
        train_main(run + ["--plant-set", "sink_qery_bias=3"])
    with pytest.raises(SystemExit, match="PlantSpec has no field 'to_dict'"):  # a method is not a field
        train_main(run + ["--plant-set", "to_dict=3"])
    with pytest.raises(SystemExit, match="must be a number or null"):
        train_main(run + ["--plant-set", "sink_query_bias=three"])
    with pytest.raises(SystemExit, match="no config.json there"):
        train_main(run + ["--init-from", str(tmp_path / "nothing")])


def test_preset_v2_is_the_shipped_recipe_and_explicit_flags_win():
    from se_compress.default_model.train import build_parser, resolve_settings

    args = build_parser().parse_args(["--data", "d", "--out", "o", "--preset", "v2"])
    resolve_settings(args)
    assert (args.hidden, args.layers, args.experts, args.moe_inter, args.heads, args.seq_len) == (256, 10, 64, 32, 8, 512)
    assert (args.batch, args.steps, args.lr, args.warmup, args.plant) == (32, 1212, 2e-3, 150, "se+route")
    args = build_parser().parse_args(["--data", "d", "--out", "o", "--preset", "v2", "--steps", "7", "--heads", "4"])
    resolve_settings(args)
    assert (args.steps, args.heads, args.hidden) == (7, 4, 256)


def test_preset_v2_trains_at_a_tiny_size_and_never_sees_the_held_out_books(tmp_path):
    """A few steps of the v2 recipe on CPU: the held-out books are left out of training, the sink route is planted,
    and the checkpoint loads in plain transformers and runs through se_compress's own reader."""
    from se_compress.default_model.train import HELD_OUT_BOOKS
    from se_compress.eval.perplexity import BOOK_FILES

    data = tmp_path / "books"
    data.mkdir()
    (data / "a-book.txt").write_text((REPO / "se_compress/data/text/c4-sample.txt").read_text()[:150_000])
    for path in BOOK_FILES:  # the real held-out files, under their own names
        (data / path.name).write_text(path.read_text()[:40_000])
    assert {p.name for p in BOOK_FILES} == set(HELD_OUT_BOOKS)
    train_main(["--data", str(data), "--out", str(tmp_path / "run"), "--preset", "v2", "--small", "--steps", "3",
                "--batch", "2", "--seq-len", "64", "--vocab", "300", "--threads", "1", "--device", "cpu"])
    final = tmp_path / "run" / "final"
    meta = json.loads((final / "training.json").read_text())
    assert meta["training_files"] == ["a-book.txt"] and sorted(meta["held_out_files"]) == sorted(HELD_OUT_BOOKS)
    assert meta["preset"] == "v2" and meta["device"] == "cpu" and meta["tokens_seen"] == 3 * 2 * 64
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    assert model.config.attention_bias and model.config.num_attention_heads == 8
    assert model.config.max_position_embeddings == 64
    spec = PlantSpec(**meta["plant"])
    assert spec.sink_from_layer == 2 and spec.se2_neuron == 13
    sink_dim = model.config.head_dim // 2 - 1
    assert model.model.layers[-1].self_attn.q_proj.bias[sink_dim].item() == spec.sink_query_bias

    from se_compress.detect import detect

    report = detect(str(final), samples=4, seqlen=32, progress=False)  # our streamed reader takes it
    assert report["model"] == str(final)


def test_cuda_without_cuda_is_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is here")
    with pytest.raises(SystemExit, match="CUDA is not available"):
        train_main(["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--device", "cuda"])
