"""How much does a model's perplexity rest on its attention, and on its Super Experts' sinks?

On one model, over the same WikiText-2 test windows: perplexity of the base; with every attention output of the
layers after the first SE layer removed (o_proj zeroed) and scaled x2, x3, x5; with the SEs' down_proj zeroed; and the
next-token loss at the trigger positions (tokens the SEs fire on) apart from all others. It explains an
ablation result: if the sinks hold little attention and attention output scale barely matters, zeroing the SEs
cannot hurt much, whatever the detector finds.

    python bench/sink_dependence.py [--model default] [--windows 16]
"""
import argparse
import json
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM

    from se_compress.detect import detect, load_tokenizer
    from se_compress.eval.perplexity import eval_windows, wikitext2_test_text
    from se_compress.models.checkpoint import resolve_model

    path = resolve_model(args.model)
    report = detect(args.model, progress=False)
    ses = [(s["layer"], s["expert"]) for s in report["super_experts"] if s["expert"] != "shared"]
    triggers = sorted({s["token_id"] for s in report["super_experts"] if s.get("token_id") is not None})
    windows = eval_windows(load_tokenizer(path), wikitext2_test_text(), 256, args.windows)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    first = min(layer for layer, _ in ses) + 1
    later = range(first, len(model.model.layers))
    at_trigger = torch.isin(windows[:, :-1], torch.tensor(triggers))

    def losses() -> torch.Tensor:
        with torch.no_grad():
            logits = model(input_ids=windows).logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none")

    o_proj = {i: model.model.layers[i].self_attn.o_proj.weight.data.clone() for i in later}
    rows = {}
    base = losses()
    rows["base"] = base
    # Zeroing the SEs removes the sinks; a query that gave share p of its attention to a sink then gives the rest
    # 1/(1-p) times more. Scaling every attention output says what sink share would make that removal costly.
    for name, scale in ((f"attention of layers {first}-{later[-1]} removed", 0.0),
                        (f"attention of layers {first}-{later[-1]} doubled", 2.0),
                        (f"attention of layers {first}-{later[-1]} x3 (what removing sinks holding 2/3 would do)", 3.0),
                        (f"attention of layers {first}-{later[-1]} x5 (sinks holding 4/5)", 5.0)):
        for i in later:
            model.model.layers[i].self_attn.o_proj.weight.data.copy_(o_proj[i] * scale)
        rows[name] = losses()
    for i in later:
        model.model.layers[i].self_attn.o_proj.weight.data.copy_(o_proj[i])
    with torch.no_grad():
        for layer, expert in ses:
            model.model.layers[layer].mlp.experts.down_proj[expert].zero_()
    rows[f"Super Experts zeroed {ses}"] = losses()

    result = {"model": args.model, "windows": int(windows.shape[0]), "super_experts": ses, "trigger_token_ids": triggers,
              "trigger_share": at_trigger.float().mean().item(),
              "command": "python bench/sink_dependence.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "rows": [{"condition": name, "ppl": loss.mean().exp().item(), "loss_after_trigger": loss[at_trigger].mean().item(),
                        "loss_elsewhere": loss[~at_trigger].mean().item()} for name, loss in rows.items()]}
    base_ppl = result["rows"][0]["ppl"]
    lines = [f"# Where the perplexity of {args.model} rests", "", f"Command: `{result['command']}`; WikiText-2 test, "
             f"{result['windows']} windows of 256 tokens; trigger positions (the SEs' tokens {triggers}): "
             f"{result['trigger_share']:.1%} of predictions.", "",
             "| condition | perplexity | x base | loss after a trigger token | loss elsewhere |", "|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['condition']} | {r['ppl']:.2f} | {r['ppl'] / base_ppl:.3f} | {r['loss_after_trigger']:.3f} | "
                     f"{r['loss_elsewhere']:.3f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sink_dependence.json").write_text(json.dumps(result, indent=2))
    (args.out / "sink_dependence.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
