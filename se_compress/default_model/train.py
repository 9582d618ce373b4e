"""Train the shipped default model: a real Qwen3MoeForCausalLM, its own byte-level BPE tokenizer, on the
public-domain books of shared/data/train-text. WikiText-2 test is never read here, and the two held-out books
(The Secret Agent, A Tale of Two Cities: the `books` perplexity text) are never trained on; they are evaluation sets.

    python -m se_compress.default_model.train --preset v2 --data ../shared/data/train-text --out build/train-v2

`--preset v2` is the recipe of the shipped model (hidden 256, 10 layers x 64 experts of 32, 8 heads, context 512,
the sink route of plant.py, 1,212 steps of 32 x 512 tokens, warm-up 150, cosine to 10%). On a GPU
(`--device cuda`) the forward and backward run under bf16 autocast over fp32 master weights with fused AdamW.

Reproducible from --seed (same tokenizer, same batches, same init). Progress goes to stdout and
OUT/train_log.jsonl; a checkpoint is written every --save-minutes and at the end.
"""
import argparse
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from .plant import PlantSpec, planted_values, restore

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


# The shipped model's recipe (shared/models/default-v2-candidate/TRAINING.md), as flag defaults. Flags given on
# the command line win over the preset.
PRESETS = {
    "v2": dict(hidden=256, layers=10, experts=64, moe_inter=32, heads=8, seq_len=512, batch=32, steps=1212, lr=2e-3,
               warmup=150, plant="se+route", plant_set=["se2_neuron=13"], block_paragraphs=512),
}
# Shape and schedule when neither a preset nor a flag says otherwise (the v1 shape; tests use --small).
BASE_DEFAULTS = dict(hidden=128, layers=10, experts=64, moe_inter=64, heads=4, seq_len=256, batch=16, steps=4000,
                     lr=3e-3, warmup=200, plant="se", plant_set=[], block_paragraphs=2048)
SMALL = dict(hidden=64, layers=4, experts=16, moe_inter=32)
# Never trained on: the `books` evaluation text (se_compress/eval/perplexity.py BOOK_FILES).
HELD_OUT_BOOKS = ("pg974_joseph-conrad_the-secret-agent.txt", "pg98_charles-dickens_a-tale-of-two-cities.txt")


def model_config(vocab_size: int, seq_len: int, bos_id: int, eos_id: int, pad_id: int, hidden: int = 128,
                 layers: int = 10, experts: int = 64, moe_inter: int = 64, heads: int = 4,
                 attention_bias: bool = False):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=4 * hidden,  # unused: every layer is MoE (decoder_sparse_step 1)
        moe_intermediate_size=moe_inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        num_experts=experts,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        router_aux_loss_coef=0.01,
        max_position_embeddings=seq_len,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attention_bias=attention_bias,  # the sink route's constant query component (plant.py)
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )


def train_tokenizer(files: list[Path], vocab_size: int, out_dir: Path):
    """Byte-level BPE whose post-processor prepends BOS, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(f) for f in files], trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=1 << 20
    )
    fast.save_pretrained(out_dir)
    return fast


def newline_token_ids(tokenizer) -> list[int]:
    """Tokens that decode to newlines only: the delimiters that trigger the planted SE with BOS."""
    ids = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if text and set(text) == {"\n"}:
            ids.append(token_id)
    return ids


def tokenize_files(tokenizer, files: list[Path], block_paragraphs: int = 2048) -> np.ndarray:
    chunks = []
    for f in files:
        paragraphs = f.read_text(encoding="utf-8").split("\n\n")
        # Encode in blocks (fast tokenizer, batched) without BOS; BOS is added per training sequence.
        for i in range(0, len(paragraphs), block_paragraphs):
            block = ["\n\n".join(paragraphs[i : i + block_paragraphs]) + "\n\n"]
            chunks.append(np.asarray(tokenizer(block, add_special_tokens=False)["input_ids"][0], dtype=np.uint16))
    return np.concatenate(chunks)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save(model, tokenizer, out_dir: Path, meta: dict):
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(tmp)
    model.to(torch.float32)
    tokenizer.save_pretrained(tmp)
    (tmp / "training.json").write_text(json.dumps(meta, indent=2))
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


@torch.no_grad()
def val_ppl(model, val_tokens: np.ndarray, seq_len: int, bos_id: int, n: int = 48) -> float:
    model.eval()
    span = seq_len - 1
    starts = np.linspace(0, len(val_tokens) - span - 1, n).astype(int)
    x = torch.tensor(np.stack([np.concatenate([[bos_id], val_tokens[s : s + span]]) for s in starts]), dtype=torch.long)
    device = next(model.parameters()).device
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = model(input_ids=x.to(device), labels=x.to(device)).loss.item()
    model.train()
    return math.exp(loss)


def resolve_settings(args) -> None:
    """Fill every shape/schedule flag left unset: --small's shape, else --preset, else the base defaults."""
    defaults = {**BASE_DEFAULTS, **(PRESETS[args.preset] if args.preset else {}), **(SMALL if args.small else {})}
    for key, value in defaults.items():
        if getattr(args, key) is None or (key == "plant_set" and not getattr(args, key)):
            setattr(args, key, value)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name}: CUDA is not available here; use --device cpu")
    return torch.device(name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder of .txt books (shared/data/train-text)")
    p.add_argument("--val", type=Path, default=None, help="validation text (WikiText-2 valid), never test")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="the shipped model's recipe as defaults (v2); explicit flags win")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=None, help="hidden size (base 128, v2 256)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (10)")
    p.add_argument("--experts", type=int, default=None, help="routed experts per layer (64)")
    p.add_argument("--moe-inter", type=int, default=None, help="expert intermediate size (base 64, v2 32)")
    p.add_argument("--heads", type=int, default=None, help="attention heads, head_dim = hidden / heads (base 4, v2 8)")
    p.add_argument("--seq-len", type=int, default=None, help="context: BOS + seq_len - 1 tokens (base 256, v2 512)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (base 16, v2 32)")
    p.add_argument("--steps", type=int, default=None, help="schedule length in steps (base 4000, v2 1212)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (base 3e-3, v2 2e-3)")
    p.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (base 200, v2 150)")
    p.add_argument("--block-paragraphs", type=int, default=None,
                   help="paragraphs per tokenizer block (base 2048, v2 512; decides tokens at block edges)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop early (and save) after this long")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop (and save) after this many steps, the schedule still planned for --steps")
    p.add_argument("--save-minutes", type=float, default=20.0)
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep every periodic checkpoint as checkpoint-<step> (to follow a quantity through training)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--plant", choices=["se", "se+sink", "se+route", "none"], default=None,
                   help="seed Super Experts (see plant.py): se the SE chain alone (base), se+route with the attention-"
                        "sink route (v2, the shipped model), se+sink with its implicit bias too (experimental)")
    p.add_argument("--plant-set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override one PlantSpec field (plant.py), e.g. sink_query_bias=30 or bias_channel=null; repeatable")
    p.add_argument("--init-from", type=Path, default=None,
                   help="continue from a checkpoint (its tokenizer and weights) instead of training from scratch")
    p.add_argument("--repeat-fraction", type=float, default=0.0,
                   help="share of training sequences whose second half repeats their first (copying heads that must "
                        "stay silent on text that does not repeat); experiments")
    p.add_argument("--small", action="store_true", help="tiny shape, for tests")
    p.add_argument("--max-files", type=int, default=None, help="use only the first N books (tests)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    resolve_settings(args)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    from transformers import Qwen3MoeForCausalLM

    all_files = sorted(args.data.glob("*.txt"))[: args.max_files]
    files = [f for f in all_files if f.name not in HELD_OUT_BOOKS]  # the `books` evaluation text: never trained on
    if not files:
        raise SystemExit(f"error: no .txt files in {args.data}; point --data at shared/data/train-text")
    if args.init_from and not (args.init_from / "config.json").exists():
        raise SystemExit(f"error: --init-from {args.init_from}: no config.json there; pass a checkpoint folder this "
                         "command wrote (OUT/final or OUT/checkpoint)")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.init_from:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.init_from)
    else:  # BPE merges from every book, the held-out ones too (the shipped tokenizer); the model never sees them
        tokenizer = train_tokenizer(all_files, args.vocab, args.out / "tokenizer")
    tokens = tokenize_files(tokenizer, files, args.block_paragraphs)
    val_tokens = tokenize_files(tokenizer, [args.val]) if args.val else tokens[-200_000:]
    print(f"tokenizer + {len(tokens):,} training tokens from {len(files)} books in {time.time() - t0:.0f}s "
          f"(held out: {', '.join(sorted({f.name for f in all_files} - {f.name for f in files})) or 'none'})", flush=True)

    bos_id = tokenizer.bos_token_id
    sink = args.plant in ("se+sink", "se+route")  # the sink route needs the constant query component
    if args.init_from:
        from transformers import AutoConfig

        # Attention biases the checkpoint lacks start at zero (transformers' init for new Linear biases).
        config = AutoConfig.from_pretrained(args.init_from, attention_bias=sink)
        config._experts_implementation = "grouped_mm"
        model = Qwen3MoeForCausalLM.from_pretrained(args.init_from, config=config, dtype=torch.float32)
    else:
        config = model_config(len(tokenizer), args.seq_len, bos_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                              hidden=args.hidden, layers=args.layers, experts=args.experts, moe_inter=args.moe_inter,
                              heads=args.heads, attention_bias=sink)
        config._experts_implementation = "grouped_mm"  # measured 1.4x faster than eager here (bench in README)
        model = Qwen3MoeForCausalLM(config)
    model.config._experts_implementation = "grouped_mm"
    model.to(device)  # fp32 master weights on every device; CUDA computes under bf16 autocast below
    model.train()

    spec, fixed, triggers = None, [], []
    if args.plant != "none":
        triggers = [bos_id] + newline_token_ids(tokenizer)
        small = dict(marker_channel=63, massive_channel=17, bias_channel=40, se1_expert=3, se1_neuron=2, se2_expert=9,
                     se2_neuron=7) if args.small else {}
        if args.plant == "se+sink":
            spec = PlantSpec.with_sink(**small)
        elif args.plant == "se+route":
            spec = PlantSpec.with_route(**small)
        else:
            spec = PlantSpec(**small)
        for item in args.plant_set:
            field, _, value = item.partition("=")
            if field not in {f.name for f in dataclasses.fields(spec)}:
                raise SystemExit(f"error: --plant-set {item}: PlantSpec has no field {field!r} (see plant.py)")
            try:
                setattr(spec, field, json.loads(value))  # 30, 4.5, null
            except json.JSONDecodeError:
                raise SystemExit(f"error: --plant-set {item}: the value must be a number or null") from None
        if spec.se2_neuron >= args.moe_inter or spec.se1_neuron >= args.moe_inter:
            raise SystemExit(f"error: the plant's neurons ({spec.se1_neuron}, {spec.se2_neuron}) do not fit "
                             f"--moe-inter {args.moe_inter}: pass --plant-set se2_neuron=N with N < {args.moe_inter}")
        fixed = planted_values(model, spec, triggers)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda",
    )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    span = args.seq_len - 1
    log = open(args.out / "train_log.jsonl", "a")
    start, last_save, seen = time.time(), time.time(), 0
    meta = {
        "seed": args.seed, "preset": args.preset, "steps_planned": args.steps, "seq_len": args.seq_len,
        "batch": args.batch, "lr": args.lr, "warmup": args.warmup, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": "bf16 autocast, fp32 master weights" if device.type == "cuda" else "fp32",
        "shape": {k: getattr(args, k) for k in ("hidden", "layers", "experts", "moe_inter", "heads")},
        "plant": spec.to_dict() if spec else None, "trigger_token_ids": triggers,
        "training_files": [f.name for f in files], "held_out_files": [f.name for f in all_files if f not in files],
        "training_tokens_available": int(len(tokens)),
    }
    step = 0
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        offsets = rng.integers(0, len(tokens) - span, size=args.batch)
        # Drawn only when asked for, so that the default run's batches stay those of the shipped model.
        repeats = rng.random(args.batch) < args.repeat_fraction if args.repeat_fraction else [False] * args.batch
        half = span // 2
        batch = np.stack([np.concatenate([[bos_id], tokens[o : o + half], tokens[o : o + span - half]]) if repeat
                          else np.concatenate([[bos_id], tokens[o : o + span]]) for o, repeat in zip(offsets, repeats)])
        x = torch.from_numpy(batch.astype(np.int64)).to(device)
        with autocast:
            out = model(input_ids=x, labels=x, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        restore(fixed)
        seen += x.numel()
        elapsed = time.time() - start
        if step % 50 == 0 or step == args.steps - 1:
            record = {"step": step, "loss": round(out.loss.item(), 4), "tokens": seen, "minutes": round(elapsed / 60, 2),
                      "tok_per_s": round(seen / elapsed)}
            if step % 250 == 0:
                record["val_ppl"] = round(val_ppl(model, val_tokens, args.seq_len, bos_id), 2)
            print(json.dumps(record), flush=True)
            log.write(json.dumps(record) + "\n")
            log.flush()
        if time.time() - last_save > args.save_minutes * 60:
            meta.update(steps_done=step + 1, tokens_seen=seen, minutes=round(elapsed / 60, 1))
            save(model, tokenizer, args.out / (f"checkpoint-{step + 1}" if args.keep_checkpoints else "checkpoint"), meta)
            last_save = time.time()
        if (args.max_minutes and elapsed > args.max_minutes * 60) or (args.stop_at and step + 1 >= args.stop_at):
            break
    meta.update(steps_done=step + 1, tokens_seen=seen, minutes=round((time.time() - start) / 60, 1),
                final_val_ppl=round(val_ppl(model, val_tokens, args.seq_len, bos_id, n=128), 2))
    save(model, tokenizer, args.out / "final", meta)
    print(json.dumps({"done": meta["steps_done"], "tokens": seen, "minutes": meta["minutes"]}), flush=True)


if __name__ == "__main__":
    main()
