"""se-compress: find and protect the Super Experts of MoE language models while compressing them.

Every error caused by input (a missing folder, an unknown architecture, a corrupt file, a bad option) is
printed as one line naming the problem and the fix, and the command exits with status 2.
"""
import argparse
import json
import sys
from pathlib import Path

from .errors import SECompressError


def _model_args(p):
    p.add_argument("model", nargs="?", default="default",
                   help="local checkpoint folder, Hugging Face Hub id, or 'default' (the shipped model)")
    p.add_argument("--allow-pickle", action="store_true", help="accept pickle .bin weights (can run code: trusted sources only)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom modeling code from the checkpoint")


def _calib_args(p, samples=64, seqlen=256):
    p.add_argument("--calib", default="wikitext2",
                   help="calibration text: 'wikitext2' (valid split, shipped), 'c4' (shipped sample), a text file, or a Hub dataset org/name[:split]")
    p.add_argument("--samples", type=int, default=samples, help="number of calibration sequences")
    p.add_argument("--seqlen", type=int, default=seqlen, help="tokens per calibration sequence")
    p.add_argument("--seed", type=int, default=0, help="seed for picking calibration sequences")
    p.add_argument("--batch-size", type=int, default=8)


def _criterion_args(p):
    p.add_argument("--quantile", type=float, default=0.995, help="a(l,e) must exceed this quantile of all a (paper: 0.995)")
    p.add_argument("--max-fraction", type=float, default=0.1, help="a(l,e) must exceed max(a) times this (paper: 0.1)")
    p.add_argument("--layers", default="auto",
                   help="layers the rule applies to: auto (where massive activations are seen), paper (first 75%%), all, or '1,2,3'")
    p.add_argument("--massive-ratio", type=float, default=100.0, help="auto layers: max|h| >= this x median|h|")


def _criterion(args):
    from .detect.rule import Criterion

    if not 0 < args.quantile < 1:
        raise SECompressError(f"--quantile must be between 0 and 1 (got {args.quantile}); the paper uses 0.995")
    if not 0 < args.max_fraction <= 1:
        raise SECompressError(f"--max-fraction must be in (0, 1] (got {args.max_fraction}); the paper uses 0.1")
    layers = args.layers
    if layers not in ("auto", "paper", "all") and not all(x.strip().isdigit() for x in layers.split(",")):
        raise SECompressError(f"--layers must be auto, paper, all or a list like 1,2,3 (got '{layers}')")
    return Criterion(args.quantile, args.max_fraction, layers, args.massive_ratio)


def cmd_detect(args):
    from .detect import detect, write_report
    from .detect.stability import run_stability

    criterion = _criterion(args)
    common = dict(samples=args.samples, seqlen=args.seqlen, criterion=criterion, batch_size=args.batch_size,
                  allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    report = detect(args.model, calib=args.calib, seed=args.seed, streamed=not args.in_memory, **common)
    out = Path(args.out or f"checkpoints/{Path(args.model).name or 'model'}-se-report")
    write_report(report, out)
    ses = ", ".join(f"({s['layer']},{s['expert']}) max {s['max_output']:.4g} ch {s['channel']} at {s['token']!r}"
                    for s in report["super_experts"]) or "none"
    print(f"{len(report['super_experts'])} Super Experts: {ses}")
    for note in report["notes"]:
        print(f"note: {note}")
    if args.stability:
        result = run_stability(args.model, out, base_calib=args.calib, **common)
        print(f"stability: SE set {'stable' if result['stable'] else 'CHANGES'}; smallest budget with the full set: "
              f"{result['smallest_full_budget']} tokens (see {out}/stability.md)")
    print(f"report: {out}/se_report.md")


def cmd_ablate(args):
    from .detect import detect, write_report
    from .eval.ablation import ablate, ablation_markdown, write_ablation

    out = Path(args.out or f"checkpoints/{Path(args.model).name or 'model'}-ablation")
    common = dict(allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    if args.se_report:
        se_report = _read_json(args.se_report)
    else:
        se_report = detect(args.model, calib=args.calib, samples=args.samples, seqlen=args.seqlen, seed=args.seed,
                           criterion=_criterion(args), batch_size=args.batch_size, **common)
        write_report(se_report, out)
    result = ablate(args.model, se_report=se_report, draws=args.draws, seed=args.seed, seqlen=args.eval_seqlen,
                    max_windows=args.max_windows)
    write_ablation(result, out)
    print(ablation_markdown(result))
    print(f"written: {out}/ablation.json, ablation.md, ablation.png")


def cmd_train_default(args):
    from .default_model.train import main as train_main

    train_main(args.train_args)


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SECompressError(f"file not found: {path}") from None
    except ValueError:
        raise SECompressError(f"{path} is not valid JSON: pass the se_report.json written by se-compress detect") from None


def build_parser():
    parser = argparse.ArgumentParser(prog="se-compress", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
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
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("ablate", help="the paper's study: perplexity with the SEs zeroed vs as many random experts",
                       description="Zero the Super Experts' down_proj, then as many random non-SE experts (5 seeded "
                                   "draws, and draws matched layer by layer); WikiText-2 perplexity and attention on "
                                   "the first token for each. Writes ablation.json, ablation.md and ablation.png.")
    _model_args(p)
    p.add_argument("--out", help="folder (default checkpoints/<model>-ablation)")
    p.add_argument("--se-report", help="reuse a se_report.json instead of running detection")
    p.add_argument("--draws", type=int, default=5, help="random draws of each kind")
    p.add_argument("--eval-seqlen", type=int, default=None, help="perplexity window (default: the model's context, at most 2048)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows (quick runs)")
    _calib_args(p)
    _criterion_args(p)
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("train-default", help="retrain the shipped default model (hours on 2 CPU cores)",
                       description="Arguments after train-default go to the trainer; see "
                                   "`se-compress train-default -- --help`.")
    p.add_argument("train_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_train_default)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        args.func(args)
    except SECompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was left half-written (outputs go through a temporary folder)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
