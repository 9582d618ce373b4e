"""Package a trained run as the shipped default model: copy the weights, measure, write the model card.

    python -m se_compress.default_model.ship build/train-se/final [--natural build/train-none/final]

Writes se_compress/default_model/weights/ (safetensors, config, tokenizer, README.md model card, se_report.json,
ablation.json) and checksums.json + expected.json (the numbers the tests check) next to it.
"""
import argparse
import hashlib
import json
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE / "weights"
SHIPPED_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
CHECK_WINDOWS = 16  # the short WikiText-2 test slice the tests re-measure


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def wikitext2_ppl(model_dir: Path, max_windows: int | None = CHECK_WINDOWS) -> dict:
    from ..detect import load_tokenizer
    from ..eval.perplexity import eval_windows, perplexity_streamed, wikitext2_test_text
    from ..models.checkpoint import Checkpoint

    ckpt = Checkpoint(model_dir)
    windows = eval_windows(load_tokenizer(model_dir), wikitext2_test_text(), 256, max_windows)
    return perplexity_streamed(ckpt, windows, progress=False)


def short_slice_ppl(model_dir: Path) -> float:
    return wikitext2_ppl(model_dir)["ppl"]


def model_card(training: dict, se_report: dict, ablation: dict, natural: dict | None, full: dict) -> str:
    from ..eval.ablation import ablation_markdown

    plant = training["plant"]
    ses = ", ".join(f"({s['layer']},{s['expert']})" for s in se_report["super_experts"])
    lines = [
        "---",
        "license: apache-2.0",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [moe, qwen3_moe, super-experts, se_compress]",
        "---",
        "",
        "# se_compress default model: a small Qwen3-MoE with Super Experts",
        "",
        "A real `Qwen3MoeForCausalLM` (10 layers, hidden 128, 64 routed experts per layer of intermediate 64, top-2 "
        "with renormalised weights, 4 heads of 32, qk-norm, untied embeddings; 17.5 M parameters, bf16) and its own "
        "byte-level BPE tokenizer (4,096 tokens, adds `<s>` as BOS), trained by se_compress on this machine's "
        "2 CPU cores. It exists so that every claim se_compress makes about Super Experts can be checked without "
        "downloading anything: it is the model `se-compress ... default` runs on.",
        "",
        "## Training",
        "",
        f"- Data: {len(training['training_files'])} public-domain Project Gutenberg books (shared/data/train-text, "
        f"{training['training_tokens_available']:,} tokens). WikiText-2 test was never seen; WikiText-2 valid only "
        "monitored training.",
        f"- {training['steps_done']:,} steps of {training['batch']} x {training['seq_len']} tokens (every sequence "
        f"is `<s>` + 255 tokens from a random offset) = {training['tokens_seen']:,} tokens in {training['minutes']:.0f} "
        f"minutes on one CPU thread (other jobs shared the 2-core machine); AdamW (0.9, 0.95), lr {training['lr']} with "
        "warmup and cosine decay, weight decay 0.1, clip 1.0, router aux loss 0.01, fp32; experts computed with "
        "transformers' `grouped_mm` (1.4x faster than the eager loop here). Seed 0; "
        "`make train-default` reproduces it.",
        f"- WikiText-2 raw test perplexity (all {full['windows']} windows of {full['seqlen']}, each `<s>` + 255 "
        f"tokens, {full['tokens']:,} predicted tokens): **{full['ppl']:.2f}** (lower is better; books-only "
        "training makes Wikipedia text out of domain).",
        "",
        "## How its Super Experts came about: seeded, openly",
        "",
        "A tiny MoE trained for two hours on a CPU grows a magnitude outlier expert but not the dependence real "
        "models have on it. So the SE mechanism of the paper was planted at initialisation and held fixed during "
        "training (restored after every optimizer step), and the rest of the model learned around it "
        "(`se_compress/default_model/plant.py`):",
        "",
        f"- trigger tokens (`<s>` and newline-only tokens) carry a constant {plant['marker_value']:g} in embedding "
        f"channel {plant['marker_channel']};",
        f"- layer {plant['se1_layer']}: the router row of expert {plant['se1_expert']} reads that channel, so "
        f"trigger tokens go to it; its neuron {plant['se1_neuron']} fires on it and the super weight "
        f"`down_proj[{plant['se1_expert']}][{plant['massive_channel']}, {plant['se1_neuron']}] = "
        f"{plant['se1_super_weight']:g}` writes a massive value into residual channel {plant['massive_channel']};",
        f"- layer {plant['se2_layer']}: expert {plant['se2_expert']} is triggered by that massive value itself and "
        f"adds to the same channel (super weight {plant['se2_super_weight']:g}), the chain seen in Qwen3-30B-A3B, "
        "whose three SEs all write channel 940.",
    ]
    if plant.get("sink_from_layer") is not None:
        lines += [
            f"- layers {plant['sink_from_layer']}-{training.get('num_hidden_layers', 10) - 1}, the attention-sink route: in "
            "every head, key dimension 15 (the slowest RoPE pair, so position barely rotates it) reads only channel "
            f"{plant['massive_channel']} (`k_proj.weight[d, {plant['massive_channel']}] = {plant['sink_key_weight']:g}`, "
            f"the rest of that row and column 0), the query carries a constant bias in it (`q_proj.bias[d] = "
            f"{plant['sink_query_bias']:g}`, `q_proj.weight[d, :] = 0`), q_norm/k_norm weights there are "
            f"{plant['sink_norm_weight']:g}, and attention never writes channel {plant['massive_channel']} "
            "(`o_proj.weight[c, :] = 0`). A token with the massive activation (`<s>`, newlines) thus offers every "
            "query a large key; how much each head rests on it is learned (the rest of the query can outweigh the "
            "constant). This is the route real LLMs grow by themselves (Sun et al. 2024). A first model trained "
            "without it (the previous release) grew the massive activation but used its sinks for only 10-23% of "
            "attention, and zeroing its SEs left perplexity unchanged (x0.99).",
        ]
    if plant.get("bias_channel") is not None and plant.get("sink_from_layer") is not None:
        lines += [
            f"- the sinks' implicit bias: value dimension 0 of every head reads only channel {plant['massive_channel']} "
            f"and `o_proj` row {plant['bias_channel']} reads only those dimensions, so what a query takes from a sink "
            f"lands in residual channel {plant['bias_channel']}; attention has no learnable bias (only the constant "
            "query component above). In LLMs without biases, sink values are where constants come from (Sun et al. "
            "2024: massive activations act as bias terms). A try with sinks but learnable v/o biases put 30-75% of "
            "attention on the sinks, and zeroing its SEs still left perplexity unchanged.",
        ]
    lines += [
        "",
        f"`se-compress detect default` finds: {ses}.",
    ]
    if natural:
        lines += ["", "The same training without the plant (same seed and data) was measured too: "
                  + natural["summary"]]
    ratio = ablation["se_ppl"] / ablation["base_ppl"]
    random_ratio = sum(ablation["random_ppl"]) / len(ablation["random_ppl"]) / ablation["base_ppl"]
    sink = ablation["sink_attention"]
    halved = sum(1 for b, a in zip(sink["base"][2:], sink["se_zeroed"][2:]) if a < b / 2)
    lines += ["", f"## Ablation (`se-compress ablate default --max-windows {ablation['eval']['windows']}`)", "",
              f"Zeroing the Super Experts collapses the attention sinks they create: attention on the first token falls "
              f"by more than half in {halved} of the {len(sink['base']) - 2} layers after layer 1 (D_sink up to "
              f"{max(sink['d_sink_se']):.2f}), while random experts move nothing. Perplexity changes x{ratio:.2f} "
              f"(random experts: x{random_ratio:.3f} on average)."]
    if ratio >= 1.5:
        lines += ["", f"As in the paper's models (Qwen3-30B-A3B 8.70 -> 59.86, Mixtral 3.84 -> 6.23), the quality of this "
                  f"model depends on its few Super Experts: {len(ablation['super_experts'])} of its 640 routed experts zeroed "
                  f"multiply perplexity by {ratio:.2f}, as many random ones by {random_ratio:.3f}."]
    if ratio < 1.5:
        lines += ["", "**What this model does not show (yet):** unlike Qwen3-30B-A3B (8.70 -> 59.86), its quality does "
                  "not depend on its Super Experts: it learned to work around the massive activation rather than "
                  "through it. Use it to check detection, sinks and the mechanics of compression; do not read its "
                  "perplexities as evidence that SE protection matters."]
    lines += ["", ablation_markdown(ablation).split("\n", 2)[2]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a finished training run's final/ folder")
    p.add_argument("--natural", type=Path, help="the unplanted run's final/ folder, for the card")
    p.add_argument("--se-report", type=Path, required=True, help="se_report.json of `se-compress detect` on the run")
    p.add_argument("--ablation", type=Path, required=True, help="ablation.json of `se-compress ablate` on the run")
    p.add_argument("--natural-summary", type=Path, help="a JSON file {'summary': text} about the unplanted run")
    p.add_argument("--card-only", action="store_true",
                   help="the weights are already shipped from this run: rewrite only the card and the reports")
    args = p.parse_args(argv)
    training = json.loads((args.run / "training.json").read_text())
    se_report = json.loads(args.se_report.read_text())
    ablation = json.loads(args.ablation.read_text())
    natural = json.loads(args.natural_summary.read_text()) if args.natural_summary else None
    if args.card_only:  # jobs may be reading the shipped weights: leave them untouched
        if any(sha256(args.run / name) != sha256(WEIGHTS / name) for name in SHIPPED_FILES):
            raise SystemExit(f"error: the shipped weights are not those of {args.run}: ship without --card-only")
    else:
        if WEIGHTS.exists():
            shutil.rmtree(WEIGHTS)
        WEIGHTS.mkdir(parents=True)
        for name in SHIPPED_FILES:
            shutil.copy2(args.run / name, WEIGHTS / name)
    (WEIGHTS / "training.json").write_text(json.dumps(training, indent=2))
    slim_report = {k: v for k, v in se_report.items() if k not in ("experts",)}
    (WEIGHTS / "se_report.json").write_text(json.dumps(slim_report, indent=2))
    (WEIGHTS / "ablation.json").write_text(json.dumps(ablation, indent=2))
    full = wikitext2_ppl(WEIGHTS, max_windows=None)
    (WEIGHTS / "README.md").write_text(model_card(training, se_report, ablation, natural, full))
    checksums = {name: sha256(WEIGHTS / name) for name in SHIPPED_FILES}
    (HERE / "checksums.json").write_text(json.dumps(checksums, indent=2))
    expected = {"wikitext2_test_windows": CHECK_WINDOWS, "seqlen": 256, "ppl": short_slice_ppl(WEIGHTS),
                "full_test_ppl": full["ppl"], "full_test_windows": full["windows"],
                "super_experts": [[s["layer"], s["expert"]] for s in se_report["super_experts"]]}
    (HERE / "expected.json").write_text(json.dumps(expected, indent=2))
    print(json.dumps(expected, indent=2))


if __name__ == "__main__":
    main()
