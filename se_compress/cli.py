"""se-compress: find and protect the Super Experts of MoE language models while compressing them.

Every error caused by input (a missing folder, an unknown architecture, a corrupt file, a bad option) is
printed as one line naming the problem and the fix, and the command exits with status 2.
"""
import argparse
import json
import os
import sys
from pathlib import Path

from . import distributed
from .errors import SECompressError
from .signals import EXIT_TERMINATED, Terminated, received, terminate_like_interrupt
from .options import add_options, from_args
from .recipe import (AblateStage, CalibrationOptions, DetectOptions, EvaluateOptions, MergeStage, PruneStage,
                     QuantizeStage, ZeroStage)
from .validate import HelpFormatter, OneLineParser, check_args, group_size, positive_int


def _model_args(p):
    p.add_argument("model", nargs="?", default="default",
                   help="local checkpoint folder, Hugging Face Hub id, or 'default' (the shipped model)")
    p.set_defaults(checks_model=True)
    p.add_argument("--allow-pickle", action="store_true", help="accept pickle .bin weights (can run code: trusted sources only)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom modeling code from the checkpoint")


def _device_arg(p):
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help="where the model runs: auto (default: CUDA when available, else cpu), cpu, cuda or cuda:N; "
                        "bf16 on a GPU, fp32 on the CPU; statistics, Hessians and GPTQ solves in fp32")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for torch (default: torch's own, all physical cores, or OMP_NUM_THREADS when set; "
                        "on a machine busy with other jobs, 1 can be many times faster)")


def _set_threads(threads: int | None) -> None:
    """torch.set_num_threads(--threads); without it torch's default stands (all physical cores, or OMP_NUM_THREADS,
    which torchrun sets per rank), and a caller that chose a count in-process keeps it."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _calib_args(p):
    """The calibration options (recipe.CalibrationOptions: a recipe's `detect:` keys), and the batch size."""
    add_options(p, CalibrationOptions)
    p.add_argument("--batch-size", type=positive_int, default=8, help="calibration sequences per forward pass")


def _criterion_args(p):
    add_options(p, DetectOptions, skip=tuple(CalibrationOptions.model_fields))


def _criterion(args):
    return from_args(DetectOptions, args, "detect").criterion()


def _export_tools(text: str) -> list[str]:
    from .peers.export import EXPORTS

    tools = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in tools if t not in EXPORTS]
    if bad or not tools:
        raise argparse.ArgumentTypeError(f"unknown export '{','.join(bad) or text}': use {', '.join(EXPORTS)}")
    return tools


def cmd_detect(args):
    from .detect import detect, write_report
    from .detect.stability import run_stability

    options = from_args(DetectOptions, args, "detect")
    if distributed.active() and (args.stability or args.in_memory):
        raise SECompressError("--stability and --in-memory run in one process: launch them without torchrun")
    common = dict(samples=options.samples, seqlen=options.seqlen, criterion=options.criterion(),
                  batch_size=args.batch_size, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    report = detect(args.model, calib=options.calib, seed=options.seed, streamed=not args.in_memory, **common)
    out = Path(args.out)
    write_report(report, out)
    ses = ", ".join(f"({s['layer']},{s['expert']}) max {s['max_output']:.4g} ch {s['channel']} at {s['token']!r}"
                    for s in report["super_experts"]) or "none"
    print(f"{len(report['super_experts'])} Super Experts: {ses}")
    for note in report["notes"]:
        print(f"note: {note}")
    if args.stability:
        result = run_stability(args.model, out, base_calib=options.calib, **common)
        print(f"stability: SE set {'stable' if result['stable'] else 'CHANGES'}; smallest budget with the full set: "
              f"{result['smallest_full_budget']} tokens (see {out}/stability.md)")
    if args.export:
        from .output import write_files_into
        from .peers.export import export_text

        files = dict(export_text(report, tool, args.export_bits, args.export_group_size, args.export_mode,
                                 args.export_scope) for tool in args.export)
        write_files_into(out, files)
        print(f"export: {', '.join(f'{out}/{name}' for name in files)}")
    print(f"report: {out}/se_report.md")


def cmd_ablate(args):
    from .detect import detect, write_report
    from .eval.ablation import ablate, ablation_markdown, write_ablation

    from .eval.perplexity import eval_text

    eval_text(args.text)  # a bad --text is one line before the detection pass
    out = Path(args.out)
    common = dict(allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    if args.se_report:
        from .prune.common import read_se_report

        se_report = read_se_report(args.se_report)
    else:
        se_report = detect(args.model, **from_args(CalibrationOptions, args).model_dump(), criterion=_criterion(args),
                           batch_size=args.batch_size, **common)
        write_report(se_report, out)
    o = from_args(AblateStage, args, "ablate")
    result = ablate(args.model, se_report=se_report, draws=o.draws, seed=args.seed, seqlen=o.eval_seqlen,
                    max_windows=o.max_windows, text=o.text)
    write_ablation(result, out)
    print(ablation_markdown(result))
    print(f"written: {out}/ablation.json, ablation.md, ablation.png")


def cmd_train_default(args):
    from .default_model.train import main as train_main

    # `se-compress train-default -- --help`: the "--" only separates our options from the trainer's.
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    train_main(train_args)


def cmd_compress(args):
    from .driver import compress

    out = compress(args.recipe, model=args.model, out=args.out, force=args.force, evaluate=not args.no_eval,
                   device=distributed.device_spec(args.device))
    print(f"checkpoint: {out}" + ("" if args.no_eval or not (out / "compare.md").exists() else
                                  f"\ncomparison: {out}/compare.md, {out}/compare.png"))


def cmd_compare(args):
    from .compare import markdown
    from .driver import compare

    if args.setup_peers:
        from .peers import PEERS, setup_peer

        for name in PEERS:
            print(f"peer {name}: {setup_peer(name)}")
        if not args.recipes:
            return
    recipes = [r.strip() for r in (args.recipes or "").split(",") if r.strip()]
    if not recipes:
        raise SECompressError("--recipes is empty: give a comma list of recipe names, e.g. qwen3-int4-se-protect,qwen3-int4-naive")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    table = compare(recipes, model=args.model, out=Path(args.out), tasks=tasks,
                    limit=args.limit, max_windows=args.max_windows, device=distributed.device_spec(args.device))
    print(markdown(table))
    print(f"written: {table['out']}/compare.md, compare.json, compare.png")


def cmd_quantize(args):
    from .quant import quantize_model

    from .prune.common import read_se_report

    se_report = read_se_report(args.se_report) if args.se_report else None
    out = Path(args.out)
    options = from_args(QuantizeStage, args, "quantize")
    result = quantize_model(
        args.model, out, **options.model_dump(), se_report=se_report, **from_args(CalibrationOptions, args).model_dump(),
        force=args.force, batch_size=args.batch_size, allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code)
    if not distributed.is_main():
        return  # torchrun: rank 0 wrote the checkpoint and reports it
    report = json.loads((result / "compression_report.json").read_text())
    load = report["loading"]
    print(f"{report['method']} int{report['bits']} ({report['output_format']}), SE policy {'+'.join(report['se_policy'])}: "
          f"{report['size_bytes'] / 2**20:.1f} MiB (input {report['source_size_bytes'] / 2**20:.1f} MiB), "
          f"{report['seconds']:.0f} s")
    print(f"loads in transformers: {load['transformers']}; vLLM: {load['vllm']}")
    for note in report["notes"] + report["warnings"][:5]:
        print(f"note: {note}")
    print(f"written: {result} (compression_report.json, README.md)")


def _size_label(args):
    return f"f{args.fraction:g}" if args.fraction is not None else f"k{args.keep}"


def _print_compression(result, method):
    report = json.loads((result / "compression_report.json").read_text())
    ses = ", ".join(f"({s['layer']},{s['expert']})" for s in report.get("super_experts", [])) or "none"
    lost = report.get("super_experts_removed", report.get("super_experts_merged", []))
    print(f"{method}: {report['experts_before']} -> {report['experts_after']} routed experts per MoE layer; "
          f"Super Experts {ses}; {'removed' if method == 'prune' else 'merged with others'}: "
          f"{', '.join('({layer},{expert})'.format(**x) for x in lost) or 'none'}")
    print(f"written: {result} (compression_report.json, README.md)")


def cmd_prune(args):
    from .prune import prune_model, zero_experts_model
    from .prune.common import read_se_report

    se_report = read_se_report(args.se_report) if args.se_report else None
    common = dict(se_report=se_report, **from_args(CalibrationOptions, args).model_dump(), force=args.force, batch_size=args.batch_size, allow_pickle=args.allow_pickle,
                  trust_remote_code=args.trust_remote_code)
    if args.experts:
        if args.fraction is not None or args.keep is not None:
            raise SECompressError("--zero keeps every expert (it zeroes down_proj): leave out --fraction/--keep")
        out = Path(args.out)
        result = zero_experts_model(args.model, out, from_args(ZeroStage, args, "prune --zero").experts, **common)
        zeroed = json.loads((result / "compression_report.json").read_text())["zeroed"]
        print(f"zeroed the down_proj of {len(zeroed)} experts: "
              + ", ".join(f"({z['layer']},{z['expert']})" for z in zeroed[:20]) + (" ..." if len(zeroed) > 20 else ""))
        print(f"written: {result} (compression_report.json, README.md)")
        return
    out = Path(args.out)
    result = prune_model(args.model, out, **from_args(PruneStage, args, "prune").model_dump(), **common)
    _print_compression(result, "prune")


def cmd_merge(args):
    from .merge import merge_model
    from .prune.common import read_se_report

    se_report = read_se_report(args.se_report) if args.se_report else None
    out = Path(args.out)
    result = merge_model(args.model, out, **from_args(MergeStage, args, "merge").model_dump(), se_report=se_report,
                         **from_args(CalibrationOptions, args).model_dump(), force=args.force,
                         batch_size=args.batch_size, allow_pickle=args.allow_pickle,
                         trust_remote_code=args.trust_remote_code)
    _print_compression(result, "merge")


def cmd_eval(args):
    from .eval.run import evaluate_checkpoint, read_eval

    baseline = read_eval(args.baseline) if args.baseline else None
    out = Path(args.out)
    texts = [t.strip() for t in args.text.split(",") if t.strip()] if args.text else None
    if texts:
        from .eval.perplexity import eval_text

        for t in texts:
            eval_text(t)  # a bad --text is one line before any work
    o = from_args(EvaluateOptions, args, "eval")
    evaluate_checkpoint(args.model, o.tasks, o.limit, out, seqlen=o.seqlen, texts=texts,
                        max_windows=o.max_windows, batch_size=args.batch_size, task_source=args.task_source,
                        baseline=baseline, label=args.label, allow_pickle=args.allow_pickle,
                        trust_remote_code=args.trust_remote_code)
    # Printed here, not by evaluate_checkpoint: the driver evaluates in a work folder that is renamed afterwards.
    print(f"written: {out}/eval.json, {out}/eval.md")


def cmd_push(args):
    from .publish import push_checkpoint

    push_checkpoint(args.checkpoint, args.repo_id, private=args.private, dry_run=args.dry_run,
                    token_env=args.token_env, eval_file=args.eval, base_model=args.base_model, license=args.license)


def _name(args) -> str:
    return Path(args.model).name or "model"


# Default output folder of each command, given (args, the resolved model folder): validate.check_args fills in
# args.out with it, then checks it, before any model work.
DEFAULT_OUT = {
    "detect": lambda a, path: f"checkpoints/{_name(a)}-se-report",
    "ablate": lambda a, path: f"checkpoints/{_name(a)}-ablation",
    "quantize": lambda a, path: f"checkpoints/{_name(a)}-w{a.bits}-{a.method}",
    "prune": lambda a, path: (f"checkpoints/{_name(a)}-zero" if a.experts else
                              f"checkpoints/{_name(a)}-prune-{a.criterion}-{a.se_policy}-{_size_label(a)}"),
    "merge": lambda a, path: f"checkpoints/{_name(a)}-merge-{a.se_policy}-{_size_label(a)}",
    "eval": lambda a, path: _eval_out(a, path),
    "compare": lambda a, path: f"checkpoints/compare-{_model_label(a.model)}",
}


def _eval_out(args, path):
    from .eval.run import default_out

    return default_out(args.model, path)


def _model_label(model):
    from .compare import model_label

    return model_label(model)


def _outputs(p, command, kind):
    """kind: 'checkpoint' (replaced whole, --force) or 'report' (files written into the folder): output.py."""
    p.set_defaults(output_kind=kind, default_out=DEFAULT_OUT[command])


def build_parser():
    parser = OneLineParser(prog="se-compress", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--nproc", type=positive_int, default=None, metavar="N",
                        help="run detect/quantize/compress in N processes (GPUs) through torchrun's launcher; the "
                             "same as `torchrun --nproc-per-node N -m se_compress COMMAND ...`")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add = sub.add_parser
    sub.add_parser = lambda *a, **k: _add(*a, formatter_class=HelpFormatter, **k)  # defaults shown in every --help
    p = sub.add_parser("detect", help="find the Super Experts of a model; writes se_report.json/.md and plots",
                       description="Run calibration text through the model one decoder layer at a time, measure every "
                                   "expert's max |down_proj output| over every routed token, and apply the paper's rule.")
    _model_args(p)
    p.add_argument("--out", help="report folder (default checkpoints/<model>-se-report)")
    _calib_args(p)
    _criterion_args(p)
    p.add_argument("--in-memory", action="store_true", help="load the whole model instead of streaming layers (small models)")
    p.add_argument("--stability", action="store_true",
                   help="repeat detection over seeds, both shipped calibration sets and smaller token budgets")
    p.add_argument("--export", type=_export_tools, default=[], metavar="TOOL[,TOOL]",
                   help="also write the Super Experts as an llm-compressor recipe (llmcompressor) and/or a GPTQModel "
                        "dynamic dict (gptqmodel) into the report folder")
    p.add_argument("--export-bits", type=int, choices=[2, 3, 4, 8], default=4, help="bits of every other Linear in the export")
    p.add_argument("--export-group-size", type=group_size, default=32, help="group size in the export")
    p.add_argument("--export-mode", choices=["int8", "keep"], default="int8",
                   help="SE experts at 8 bits (int8) or left in bf16 (keep: llm-compressor ignore / GPTQModel skip)")
    p.add_argument("--export-scope", choices=["expert", "layer"], default="expert",
                   help="the SE experts only (transformers), or every expert of their layers (vLLM: one scheme per MoE layer)")
    _device_arg(p)
    p.set_defaults(func=cmd_detect)
    _outputs(p, "detect", "report")

    p = sub.add_parser("ablate", help="the paper's study: perplexity with the SEs zeroed vs as many random experts",
                       description="Zero the Super Experts' down_proj, then as many random non-SE experts (5 seeded "
                                   "draws, and draws matched layer by layer); WikiText-2 perplexity and attention on "
                                   "the first token for each. Writes ablation.json, ablation.md and ablation.png.")
    _model_args(p)
    p.add_argument("--out", help="folder (default checkpoints/<model>-ablation)")
    p.add_argument("--se-report", help="reuse a se_report.json instead of running detection")
    add_options(p, AblateStage)
    _calib_args(p)
    _criterion_args(p)
    _device_arg(p)
    p.set_defaults(func=cmd_ablate)
    _outputs(p, "ablate", "report")

    p = sub.add_parser("compress", help="run a recipe: detect, compress, write, evaluate against the naive twin",
                       description="Run a recipe from recipes/ (or a YAML file): one detection pass, the stages in order, "
                                   "the checkpoint written atomically, then evaluation beside the base model and the "
                                   "recipe's naive baselines.")
    p.add_argument("--recipe", required=True, help="recipe name in recipes/ or a path to a YAML file")
    p.add_argument("--model", default=None, help="checkpoint folder, Hub id or 'default' (default: the recipe's, else the shipped model)")
    p.add_argument("--out", default=None, help="output folder (default checkpoints/<model>-<recipe>)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder that se_compress wrote "
                   "(any other folder or file is never replaced)")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation beside the base model and naive twins")
    _device_arg(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("compare", help="run or reuse several recipes on one model; one table and a quality/size chart",
                       description="Run each recipe on MODEL (reusing checkpoints/<model>-<recipe> when it was made "
                                   "from the same recipe and weights), evaluate every result and the base model with "
                                   "the same settings, and write compare.md (method, SE policy, size, perplexity, "
                                   "task scores, sink, D_sink, repetition, time), compare.json and compare.png.")
    p.add_argument("--setup-peers", action="store_true", help="create the peers' own venvs (llm-compressor "
                   "0.14.0.1, GPTQModel 7.6.0; build/<peer>-venv) for peer-* recipes, then run --recipes if given")
    p.add_argument("--recipes", default=None, help="comma list of recipe names or YAML paths, or 'all' (every shipped "
                   "recipe except studies)")
    p.add_argument("--model", default="default", help="checkpoint folder, Hub id or 'default' (the shipped model)")
    p.add_argument("--out", default=None, help="folder for the table (default checkpoints/compare-<model>)")
    p.add_argument("--tasks", default=None, help="comma list of evaluations (default: the first recipe's)")
    p.add_argument("--limit", type=positive_int, default=None, help="at most N examples per lm-eval task (default: the first recipe's)")
    p.add_argument("--max-windows", type=positive_int, default=None, help="only the first N perplexity windows (default: the first recipe's)")
    _device_arg(p)
    p.set_defaults(func=cmd_compare, checks_model=True)
    _outputs(p, "compare", "report")

    p = sub.add_parser("train-default", help="retrain the shipped default model (--preset v2: ~200 s on one H200 GPU, "
                                             "hours on a CPU; see README)",
                       description="Arguments after train-default go to the trainer, e.g. `se-compress train-default -- "
                                   "--preset v2 --data ../shared/data/train-text --out build/train-v2`; see "
                                   "`se-compress train-default -- --help`.")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="the trainer's options (see -- --help)")
    p.set_defaults(func=cmd_train_default)

    p = sub.add_parser("quantize", help="RTN/GPTQ int2/3/4/8 with Super Expert policies; compressed-tensors output",
                       description="Quantize the model one decoder layer at a time (GPTQ: inputs of each layer from the "
                                   "already quantized layers). Routers, shared-expert gates, embeddings and lm_head stay "
                                   "unquantized. Writes the checkpoint, compression_report.json and a model card.")
    _model_args(p)
    p.add_argument("--out", help="output folder (default checkpoints/<model>-w<bits>-<method>)")
    add_options(p, QuantizeStage)
    p.add_argument("--se-report", help="se_report.json (or its folder) from se-compress detect; default: detect first")
    p.add_argument("--force", action="store_true", help="replace an existing output folder that se_compress wrote "
                   "(any other folder or file is never replaced)")
    _calib_args(p)
    _device_arg(p)
    p.set_defaults(func=cmd_quantize)
    _outputs(p, "quantize", "checkpoint")
    p = sub.add_parser("prune", help="remove routed experts (same count per layer), never a Super Expert; or --zero",
                       description="Remove --fraction or --keep routed experts per MoE layer by a saliency criterion "
                                   "measured with real routing; --se-policy protect never removes a Super Expert. "
                                   "Writes a smaller standard checkpoint (renumbered experts, sliced router, config "
                                   "updated), compression_report.json and a model card. --zero instead zeroes the "
                                   "down_proj of the given experts and keeps every shape (the SE paper's ablation).")
    _model_args(p)
    p.add_argument("--out", help="output folder (default checkpoints/<model>-prune-<criterion>-<policy>-<size>)")
    add_options(p, PruneStage)
    add_options(p, ZeroStage)  # --zero: the zero stage, on the prune command
    p.add_argument("--se-report", help="se_report.json (or its folder): its SEs and per-expert statistics; no calibration pass")
    p.add_argument("--force", action="store_true", help="replace an existing output folder that se_compress wrote "
                   "(any other folder or file is never replaced)")
    _calib_args(p)
    _device_arg(p)
    p.set_defaults(func=cmd_prune)
    _outputs(p, "prune", "checkpoint")

    p = sub.add_parser("merge", help="merge routed experts by output similarity into fewer; SEs stay alone",
                       description="Cluster each MoE layer's experts by the similarity of their outputs on calibration "
                                   "tokens (average linkage) down to --fraction/--keep, merge each cluster's weights "
                                   "and router rows weighted by routing frequency. --se-policy singleton keeps each "
                                   "Super Expert alone. Writes a smaller standard checkpoint.")
    _model_args(p)
    p.add_argument("--out", help="output folder (default checkpoints/<model>-merge-<policy>-<size>)")
    add_options(p, MergeStage)
    p.add_argument("--se-report", help="se_report.json (or its folder) whose SE set to use (the pass still runs)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder that se_compress wrote "
                   "(any other folder or file is never replaced)")
    _calib_args(p)
    _device_arg(p)
    p.set_defaults(func=cmd_merge)
    _outputs(p, "merge", "checkpoint")
    p = sub.add_parser("eval", help="perplexity, lm-eval tasks (offline copies shipped), attention sink, repetition",
                       description="WikiText-2 perplexity (GPTQ convention, streamed), lm-eval-harness tasks through its "
                                   "Python API (ARC-Easy/Challenge, PIQA, WinoGrande, a GSM8K subset: shipped data, no "
                                   "network; other lm-eval task names need the Hub), attention on the first token per "
                                   "layer, and the repetition rate of greedy generations. No chat template. Writes "
                                   "eval.json and eval.md.")
    _model_args(p)
    add_options(p, EvaluateOptions)
    p.add_argument("--text", default=None,
                   help="perplexity text(s), comma list: wikitext2, books (the default model's held-out books) or a "
                        "UTF-8 text file; replaces the perplexity entries of --tasks (default: those in --tasks)")
    p.add_argument("--out", help="folder for eval.json/eval.md (default <checkpoint>/eval, checkpoints/default-eval)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="lm-eval batch size")
    p.add_argument("--task-source", choices=["auto", "local", "hub"], default="auto",
                   help="arc/piqa/winogrande/gsm8k from the shipped copies (local), lm-eval's Hub datasets (hub), or "
                        "the Hub when it answers, else the shipped copies (auto)")
    p.add_argument("--baseline", help="eval.json (or its folder) of the model this one was made from: adds D_sink")
    p.add_argument("--label", help="name of this model in tables (default: the folder name)")
    _device_arg(p)
    p.set_defaults(func=cmd_eval)
    _outputs(p, "eval", "report")

    p = sub.add_parser("push", help="write the model card, then upload the checkpoint to the Hugging Face Hub",
                       description="Writes README.md (Hub metadata: base_model, base_model_relation for quantized "
                                   "models, library_name, tags, the base model's license; the compression and SE "
                                   "reports, evaluation against the base and the naive twin, how to load it) into the "
                                   "checkpoint folder, then uploads exactly the folder's files with huggingface_hub. "
                                   "The token is read from --token-env or the HF cache and never printed.")
    p.add_argument("checkpoint", help="local checkpoint folder")
    p.add_argument("--repo-id", required=True, help="ORG/NAME of the Hub model repo (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its visibility)")
    p.add_argument("--dry-run", action="store_true", help="write the card and list the files; upload nothing")
    p.add_argument("--token-env", default="HF_TOKEN", help="environment variable holding the token (else the HF cache)")
    p.add_argument("--eval", help="eval.json or compare.json for the card (default: found next to the checkpoint)")
    p.add_argument("--base-model", help="Hub id of the base model (default: from compression_report.json)")
    p.add_argument("--license", help="license id for the card (default: copied from the base model's card)")
    p.set_defaults(func=cmd_push)
    return parser


class _InterruptFlag:
    """Ctrl-C raises KeyboardInterrupt as usual, and is remembered: native code (safetensors, torch) can turn the
    KeyboardInterrupt it is handed into another exception type, which must still read as an interruption."""

    def __init__(self):
        self.hit = False

    def __enter__(self):
        import signal
        import threading

        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        import signal

        self.hit = True
        signal.default_int_handler(signum, frame)

    def __exit__(self, *exc):
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


def _out_of_memory(exc: BaseException) -> bool:
    """torch's CPU allocator raises RuntimeError("... can't allocate memory ..."), CUDA torch.OutOfMemoryError."""
    import torch

    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def _one_line(exc: BaseException, interrupted: bool) -> int:
    """The exit status for an exception, after printing it as one line; anything unexpected is re-raised."""
    if isinstance(exc, SystemExit):  # a torchrun rank's failure, already said once (distributed.session), or the
        return exc.code if isinstance(exc.code, int) else 2  # trainer's own argparse (train-default -- --help)
    if isinstance(exc, Terminated) or received():  # SIGTERM ends a command as Ctrl-C does (signals.py)
        print("\nerror: terminated (SIGTERM); nothing was left half-written (outputs go through a temporary folder)",
              file=sys.stderr)
        return EXIT_TERMINATED
    if isinstance(exc, KeyboardInterrupt) or interrupted:
        # a progress bar is usually mid-line when Ctrl-C comes: the error starts a line of its own
        print("\nerror: interrupted; nothing was left half-written (outputs go through a temporary folder)", file=sys.stderr)
        return 130
    if isinstance(exc, SECompressError):
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if isinstance(exc, OSError):  # late: disk full, a folder made read-only meanwhile; outputs stay in temporary folders
        where = f" {exc.filename}" if exc.filename else ""
        print(f"error: could not read or write{where}: {exc.strerror or exc}; nothing that looks complete was left",
              file=sys.stderr)
        return 2
    if _out_of_memory(exc):  # the budget checks are lower bounds: what still does not fit is one line too
        print("\nerror: out of memory (" + str(exc).splitlines()[0][:120] + "): lower --samples, --seqlen or "
              "--batch-size, or use a machine with more memory; nothing that looks complete was left", file=sys.stderr)
        return 2
    raise exc


def main(argv=None):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad option (2, one line: validate.OneLineParser)
        return exc.code
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    with _InterruptFlag() as flag, terminate_like_interrupt():
        try:
            if args.nproc is not None and not os.environ.get("RANK"):
                check_args(args)  # every option and input, before any process is started (validate.py)
                rest = list(sys.argv[1:] if argv is None else argv)
                at = next(i for i, a in enumerate(rest) if a.startswith("--nproc"))
                del rest[at: at + (1 if "=" in rest[at] else 2)]
                return distributed.launch(args.nproc, rest)
            from .models.placement import use_device

            if hasattr(args, "threads"):
                _set_threads(args.threads)
            device = getattr(args, "device", None)
            with distributed.session(args.command, device):  # torchrun: join the group; a failed rank ends every rank
                check_args(args)  # every option and input, before any model work (validate.py)
                with use_device(distributed.device_spec(device)):  # one placement for the whole command (placement.py)
                    args.func(args)
        except BaseException as exc:  # noqa: BLE001: _one_line re-raises what it does not know
            return _one_line(exc, flag.hit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
