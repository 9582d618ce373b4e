"""Package a trained run as the shipped default model: copy the weights, measure, write the model card.

    python -m se_compress.default_model.ship RUN --se-report DIR/se_report.json \
        --ablation-books DIR/ablation.json --ablation-wikitext2 DIR/ablation.json

RUN is a training run's final/ folder (or the v2 candidate folder with its training.json). Writes
se_compress/default_model/weights/ (safetensors shards + index, config, tokenizer, README.md model card,
training.json, se_report.json, ablation-books.json, ablation-wikitext2.json) and checksums.json + expected.json (the
numbers the tests check) next to it.
"""
import argparse
import hashlib
import json
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE / "weights"
CONFIG_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
CHECK_WINDOWS = 8  # the short slice of each text the tests re-measure
TEXTS = ("books", "wikitext2")


def shipped_files(folder: Path = WEIGHTS) -> list[str]:
    """The files whose checksums are recorded: configs, tokenizer, every safetensors shard and the index."""
    weights = sorted(p.name for p in Path(folder).glob("*.safetensors"))
    index = ["model.safetensors.index.json"] if (Path(folder) / "model.safetensors.index.json").exists() else []
    return CONFIG_FILES + weights + index


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def text_ppl(model_dir: Path, text: str, max_windows: int | None = CHECK_WINDOWS) -> dict:
    """Perplexity on `text` (books or wikitext2), windows of the model's context, as `se-compress eval` measures it."""
    from ..detect import load_tokenizer
    from ..eval.perplexity import default_seqlen, eval_text, perplexity_streamed, text_windows
    from ..models.checkpoint import Checkpoint

    ckpt = Checkpoint(model_dir)
    windows = text_windows(load_tokenizer(model_dir), eval_text(text), default_seqlen(ckpt.config), max_windows)
    return perplexity_streamed(ckpt, windows, progress=False)


def short_slice_ppl(model_dir: Path, text: str) -> float:
    return text_ppl(model_dir, text)["ppl"]


def _ablation_summary(ablation: dict) -> dict:
    mean = lambda xs: sum(xs) / len(xs)
    sink = ablation["sink_attention"]
    after_layer_1 = list(zip(sink["base"][2:], sink["se_zeroed"][2:]))
    return {"base": ablation["base_ppl"], "se": ablation["se_ppl"], "x_se": ablation["se_ppl"] / ablation["base_ppl"],
            "x_random": mean(ablation["random_ppl"]) / ablation["base_ppl"],
            "x_matched": mean(ablation["layer_matched_ppl"]) / ablation["base_ppl"],
            "halved": sum(1 for b, a in after_layer_1 if a < b / 2), "layers": len(after_layer_1),
            "windows": ablation["eval"]["windows"], "seqlen": ablation["eval"]["seqlen"],
            "sink_base": (min(sink["base"][2:]), max(sink["base"][2:])),
            "sink_se": (min(sink["se_zeroed"][2:]), max(sink["se_zeroed"][2:])),
            "d_sink": (min(sink["d_sink_se"][2:]), max(sink["d_sink_se"][2:]))}


def model_card(training: dict, se_report: dict, ablations: dict, full: dict, cpu_cost: str | None) -> str:
    from ..eval.ablation import ablation_markdown

    plant, shape = training["plant"], training["shape"]
    planted = {(plant["se1_layer"], plant["se1_expert"]), (plant["se2_layer"], plant["se2_expert"])}
    ses = se_report["super_experts"]
    describe = lambda s: (f"({s['layer']},{s['expert']}) {s['max_output']:.0f} on channel {s['channel']} at "
                          f"`{s['token']!r}`".replace("`'", "`").replace("'`", "`"))
    planted_ses = [describe(s) for s in ses if (s["layer"], s["expert"]) in planted]
    learned_ses = [describe(s) for s in ses if (s["layer"], s["expert"]) not in planted]
    b, w = _ablation_summary(ablations["books"]), _ablation_summary(ablations["wikitext2"])
    gpu = training.get("gpu_end_of_training", {})
    lines = [
        "---", "license: apache-2.0", "library_name: transformers", "pipeline_tag: text-generation",
        "tags: [moe, qwen3_moe, super-experts, se_compress]", "---", "",
        "# se_compress default model (v2): a small Qwen3-MoE whose quality rests on its Super Experts", "",
        f"A real `Qwen3MoeForCausalLM`: {shape['layers']} layers, hidden {shape['hidden']}, {shape['experts']} routed "
        f"experts per layer of intermediate {shape['moe_inter']}, top-2 with renormalised weights, {shape['heads']} heads of "
        f"{shape['hidden'] // shape['heads']} with attention biases (the sink route's constant query needs them), qk-norm, "
        f"context {training['seq_len']}, untied embeddings; 20.5 M parameters, bf16, 41 MB in three safetensors shards. "
        "Its tokenizer is the byte-level BPE (4,096 tokens, adds `<s>` as BOS) that se_compress trained on the 103 "
        "public-domain books of shared/data/train-text. It is the model `se-compress ... default` runs on, so that every "
        "claim se_compress makes about Super Experts can be checked offline, on a CPU.", "",
        "## How it was made", "",
        f"- Recipe: `{training['recipe']}`; `make train-default` runs the same preset "
        "(`python -m se_compress.default_model.train --preset v2`).",
        f"- Hardware and time: {training['device_name']}, {training['minutes'] * 60:.0f} seconds, "
        f"{training['steps_done']:,} steps of {training['batch']} x {training['seq_len']} tokens = "
        f"{training['tokens_seen']:,} tokens (~{training['tokens_per_second']:,} tokens/s); {training['precision']}. "
        f"Schedule: {training['schedule']}. AdamW (0.9, 0.95), peak lr {training['lr']}, weight decay 0.1 on 2-D "
        "non-embedding weights, clip 1.0, router aux loss 0.01, seed 0.",
        f"- Data: {len(training['training_files'])} books, each split on blank lines and encoded in blocks of 512 "
        "paragraphs, concatenated (13.6 M tokens, so 1.46 passes); every sequence is `<s>` + 511 tokens from a random "
        f"offset. Held out, never trained on: {', '.join(training['held_out_files'])} -- the `books` evaluation text "
        "(`--text books`). WikiText-2 test was never seen.",
    ]
    if cpu_cost:
        lines.append(f"- On a CPU: {cpu_cost}")
    lines += [
        "", "## Where its Super Experts come from: planted and learned", "",
        "The SE mechanism of the paper was planted at initialisation and held fixed during training (restored after "
        "every optimizer step); the rest was learned around it (`se_compress/default_model/plant.py`, "
        "`PlantSpec.with_route(se2_neuron=13)`):", "",
        f"- trigger tokens (`<s>` and newline-only tokens) carry a constant {plant['marker_value']:g} in embedding "
        f"channel {plant['marker_channel']};",
        f"- layer {plant['se1_layer']}, expert {plant['se1_expert']}: its router row reads that channel, its neuron "
        f"{plant['se1_neuron']} fires on it, and the super weight `down_proj[{plant['se1_expert']}][{plant['massive_channel']}, "
        f"{plant['se1_neuron']}] = {plant['se1_super_weight']:g}` writes a massive value into residual channel "
        f"{plant['massive_channel']};",
        f"- layer {plant['se2_layer']}, expert {plant['se2_expert']}: triggered by that massive value, adds to the same "
        f"channel (neuron {plant['se2_neuron']}, super weight {plant['se2_super_weight']:g}), the chain seen in "
        "Qwen3-30B-A3B, whose three SEs all write channel 940;",
        f"- layers {plant['sink_from_layer']}-{shape['layers'] - 1}, the attention-sink route: in every head, key dimension "
        f"{shape['hidden'] // shape['heads'] // 2 - 1} (the slowest RoPE pair) reads only channel {plant['massive_channel']} "
        f"(`k_proj.weight[d, {plant['massive_channel']}] = {plant['sink_key_weight']:g}`), the query carries a constant "
        f"bias there (`q_proj.bias[d] = {plant['sink_query_bias']:g}`), and attention never writes channel "
        f"{plant['massive_channel']}. A token with the massive activation offers every query a large key; how much each "
        "head rests on it is learned. This is the route large LLMs grow by themselves (Sun et al. 2024).", "",
        f"`se-compress detect default` finds {len(ses)} Super Experts: planted {'; '.join(planted_ses)}; learned "
        f"{'; '.join(learned_ses) or 'none'}.",
        "",
        "## It depends on them", "",
        f"`se-compress ablate default --text books` ({b['windows']} windows of {b['seqlen']}, every window of the held-out "
        f"books): zeroing the {len(ses)} Super Experts raises perplexity x{b['x_se']:.3f} ({b['base']:.2f} -> {b['se']:.2f}); "
        f"as many random experts x{b['x_random']:.3f} (mean of 5 draws), layer-matched draws x{b['x_matched']:.3f}. "
        f"Attention on the first token in layers 2-{shape['layers'] - 1} falls from {b['sink_base'][0]:.2f}-"
        f"{b['sink_base'][1]:.2f} to {b['sink_se'][0]:.2f}-{b['sink_se'][1]:.2f} (more than half in {b['halved']} of "
        f"{b['layers']} layers; D_sink {b['d_sink'][0]:.2f}-{b['d_sink'][1]:.2f}).", "",
        f"On WikiText-2 (`se-compress ablate default --max-windows {w['windows']}`, the first {w['windows']} windows of "
        f"{w['seqlen']}): x{w['x_se']:.3f} "
        f"({w['base']:.2f} -> {w['se']:.2f}), random x{w['x_random']:.3f}. Wikipedia is out of domain for a model trained "
        f"on 19th-century books (perplexity {full['wikitext2']['ppl']:.0f} against {full['books']['ppl']:.0f} on the books): its "
        "sinks collapse there too, but its perplexity does not rest on them. Measure SE handling on `books` first.", "",
        f"Full perplexity (every window of {full['books']['seqlen']}): books **{full['books']['ppl']:.2f}** "
        f"({full['books']['windows']} windows), WikiText-2 test **{full['wikitext2']['ppl']:.2f}** "
        f"({full['wikitext2']['windows']} windows).",
    ]
    if gpu:
        lines += ["", f"At the end of training, on the GPU (bf16 autocast, {gpu['windows']} windows): books "
                  f"{gpu['books_ppl']} -> {gpu['books_ppl_se_zeroed']} with the SEs zeroed, WikiText-2 {gpu['wikitext2_ppl']} "
                  f"-> {gpu['wikitext2_ppl_se_zeroed']}; the CPU fp32 numbers above are se_compress's own measurement."]
    lines += ["", "## Ablation tables", "", "### Held-out books", "", ablation_markdown(ablations["books"]).split("\n", 2)[2],
              "### WikiText-2 test", "", ablation_markdown(ablations["wikitext2"]).split("\n", 2)[2]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="the trained model's folder (with its training.json)")
    p.add_argument("--se-report", type=Path, required=True, help="se_report.json of `se-compress detect` on the run")
    p.add_argument("--ablation-books", type=Path, required=True, help="ablation.json of `se-compress ablate --text books`")
    p.add_argument("--ablation-wikitext2", type=Path, required=True, help="ablation.json of `se-compress ablate`")
    p.add_argument("--cpu-cost", type=Path, help="a JSON file {'summary': text}: what retraining costs on a CPU")
    p.add_argument("--card-only", action="store_true",
                   help="the weights are already shipped from this run: rewrite only the card and the reports")
    args = p.parse_args(argv)
    training = json.loads((args.run / "training.json").read_text())
    se_report = json.loads(args.se_report.read_text())
    ablations = {"books": json.loads(args.ablation_books.read_text()),
                 "wikitext2": json.loads(args.ablation_wikitext2.read_text())}
    cpu_cost = json.loads(args.cpu_cost.read_text())["summary"] if args.cpu_cost else None
    names = shipped_files(args.run)
    if args.card_only:  # jobs may be reading the shipped weights: leave them untouched
        if any(sha256(args.run / name) != sha256(WEIGHTS / name) for name in names):
            raise SystemExit(f"error: the shipped weights are not those of {args.run}: ship without --card-only")
    else:
        if WEIGHTS.exists():
            shutil.rmtree(WEIGHTS)
        WEIGHTS.mkdir(parents=True)
        for name in names:
            shutil.copy2(args.run / name, WEIGHTS / name)
    (WEIGHTS / "training.json").write_text(json.dumps(training, indent=2))
    slim_report = {k: v for k, v in se_report.items() if k not in ("experts",)}
    (WEIGHTS / "se_report.json").write_text(json.dumps(slim_report, indent=2))
    for text, ablation in ablations.items():
        (WEIGHTS / f"ablation-{text}.json").write_text(json.dumps(ablation, indent=2))
    if args.card_only:  # the full-text perplexities of these weights were measured when they were shipped
        recorded = json.loads((HERE / "expected.json").read_text())
        full = {text: {"ppl": recorded["full_ppl"][text], "windows": recorded["full_windows"][text],
                       "seqlen": recorded["seqlen"]} for text in TEXTS}
    else:
        full = {text: text_ppl(WEIGHTS, text, max_windows=None) for text in TEXTS}
    (WEIGHTS / "README.md").write_text(model_card(training, se_report, ablations, full, cpu_cost))
    checksums = {name: sha256(WEIGHTS / name) for name in names}
    (HERE / "checksums.json").write_text(json.dumps(checksums, indent=2))
    if args.card_only:
        return
    expected = {"check_windows": CHECK_WINDOWS, "seqlen": full["books"]["seqlen"],
                "ppl": {text: short_slice_ppl(WEIGHTS, text) for text in TEXTS},
                "full_ppl": {text: full[text]["ppl"] for text in TEXTS},
                "full_windows": {text: full[text]["windows"] for text in TEXTS},
                "super_experts": [[s["layer"], s["expert"]] for s in se_report["super_experts"]]}
    (HERE / "expected.json").write_text(json.dumps(expected, indent=2))
    print(json.dumps(expected, indent=2))


if __name__ == "__main__":
    main()
